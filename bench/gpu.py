"""``python -m bench.gpu``: the serving benchmark on a GPU (CUDA execution provider, IO binding).

One run, on the GPU machine, for resnet50 fp32 and fp16 (``svertka export
--weights random --fp16``; speed does not depend on the weights) and fp16 taking
uint8 NHWC pixels (``--input uint8-nhwc``, a quarter of the bytes per request):

1. the ceiling: the server's own session (``service.engine.runtime.Session``: CUDA,
   IO binding, one copy in and one out per batch) at batch 1, 2, 4, ...,
   ``max_batch_size``; and the same graph with input and output left on the
   device (no host copies), which is what the GPU alone does;
2. ``svertka serve`` on that model under perf_analyzer, closed loop, with the
   tensors in the gRPC messages and in system shared memory; then, for the fp16
   model, the same server with one setting changed at a time (:data:`VARIANTS`:
   padding off, pageable instead of pinned batch buffers, CUDA graphs on, the
   TensorRT provider), each with its own ceiling and shared-memory sweep;
3. the image API with the benchmark's 1024x768 JPEGs, closed loop (for the fp16 model on CUDA
   also with ``--image-decoder gpu``), and the two JPEG decoders' top-1 agreement
   (``bench.decode_agreement``);
4. whether the TensorRT execution provider loads (before the TensorRT variant);
5. ``svertka serve --frontends N`` for N in 1, 2, 4, 8, 12, on the null model
   (``bench.models.null_model``: the serving path alone) and on the fp16
   model: requests/s, server CPU per request, served/ceiling.

Results go to ``OUT/gpu.json`` after every step (a run cut short keeps what it
measured); ``--report-only`` turns results files into ``docs/benchmarks-gpu.md`` (with ``bench/gpu_findings.md``).
``--providers cpu --arch resnet18 --image-size 64 --quick`` runs the same
pipeline on a machine without a GPU, which is how it is tested (there the first
model gets the one variant a CPU can run, padding off).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench import ceiling, images, loadgen, machine, models, perf, target

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class GpuPlan:
    max_batch_size: int
    instances: int
    ceiling_s_per_batch: float
    perf: perf.PerfSettings
    concurrencies: tuple[int, ...]
    image_concurrencies: tuple[int, ...]
    load_s: float
    #: ``svertka serve --frontends N`` for each N, at one concurrency, each perf_analyzer context on
    #: a connection of its own (SO_REUSEPORT balances connections).
    frontends: tuple[int, ...]
    frontends_concurrency: int


FULL = GpuPlan(
    max_batch_size=64,
    instances=2,
    ceiling_s_per_batch=0.7,
    perf=perf.PerfSettings(measurement_interval_ms=1500, stability_percentage=20, max_trials=4),
    concurrencies=(1, 4, 16, 64),
    image_concurrencies=(16, 64),
    load_s=3.0,
    frontends=(1, 2, 4, 8, 12),
    frontends_concurrency=128,
)
QUICK = GpuPlan(
    max_batch_size=8,
    instances=1,
    ceiling_s_per_batch=0.2,
    perf=perf.PerfSettings(measurement_interval_ms=500, stability_percentage=50, max_trials=3),
    concurrencies=(4,),  # one level: the pipeline is what the quick run proves
    image_concurrencies=(4,),
    load_s=1.0,
    frontends=(1, 2),
    frontends_concurrency=4,
)


def log(message: str) -> None:
    print(f"[bench.gpu {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _asdict(obj):
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def gpu_description() -> dict:
    """nvidia-smi's name, memory and driver of GPU 0 (empty without one)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return {}
    line = out.stdout.strip().splitlines()[:1]
    if out.returncode != 0 or not line:
        return {}
    name, memory, driver = (part.strip() for part in line[0].split(","))
    return {"name": name, "memory": memory, "driver": driver}


def make_models(repository: Path, arch: str, image_size: int) -> dict[str, Path]:
    """``ARCH`` fp32 and ``ARCH-fp16`` with random weights, and ``ARCH-u8-fp16``, the fp16 model
    taking uint8 NHWC pixels (``--input uint8-nhwc``: a quarter of the bytes per request), made
    once by svertka's own exporter (the same seed, so the same weights)."""
    fp32 = repository / arch / "1" / "model.onnx"
    fp16 = repository / f"{arch}-fp16" / "1" / "model.onnx"
    u8 = repository / "u8" / f"{arch}-u8-fp16" / "1" / "model.onnx"
    for paths, name, extra in (((fp32, fp16), arch, ()), ((u8,), f"{arch}-u8", ("--input", "uint8-nhwc"))):
        if all(p.is_file() for p in paths):
            continue
        target = repository if not extra else repository / "u8"
        cmd = [
            sys.executable, "-m", "service", "export", "--weights", "random", "--arch", arch,
            "--image-size", str(image_size), "--dataset", "random weights (benchmark)",
            "--repository", str(target), "--name", name, "--version", "1", "--overwrite", "--fp16", *extra,
        ]  # fmt: skip
        result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
        log(result.stdout.strip().splitlines()[-1])
    return {arch: fp32, f"{arch}-fp16": fp16, f"{arch}-u8-fp16": u8}


#: One setting changed from the baseline's config.yaml, and what the report calls it.
VARIANTS = {
    "unpadded": ({"padded_batch_sizes": "[]"}, "padded batch sizes off (`padded_batch_sizes: []`)"),
    "pageable": ({"pinned_memory": "false"}, "batch buffers in pageable memory (`pinned_memory: false`)"),
    "cuda_graphs": ({"cuda_graphs": "true"}, "CUDA graphs replayed per padded size (`cuda_graphs: true`)"),
    "tensorrt": ({"providers": "[tensorrt, cuda]"}, "the TensorRT provider (`providers: [tensorrt, cuda]`)"),
}


def variants_for(name: str, index: int, providers: tuple[str, ...]) -> tuple[str, ...]:
    """The variants a model is served with: all for the fp16 model on CUDA; padding off on a CPU."""
    if "cuda" in providers:
        return tuple(VARIANTS) if name.endswith("-fp16") and "-u8-" not in name else ()
    return ("unpadded",) if index == 0 else ()


def write_config(
    model_dir: Path, plan: GpuPlan, providers: tuple[str, ...], changes: dict[str, str] | None = None
) -> None:
    """The model's config.yaml: the baseline, with ``changes`` (a variant's settings) applied."""
    settings = {
        "max_batch_size": str(plan.max_batch_size),
        "instances": str(plan.instances),
        "providers": f"[{', '.join(providers)}]",
        **(changes or {}),
    }
    (model_dir / "config.yaml").write_text("".join(f"{k}: {v}\n" for k, v in settings.items()))


def device_resident(path: Path, max_batch_size: int, seconds: float) -> list[dict]:
    """The graph alone on the GPU: input bound once on the device, output left there.

    What the GPU does per batch without the host copies the server makes (the
    difference to the ceiling is the copy in and out).
    """
    import onnxruntime as ort

    from service.engine import runtime
    from service.modelmeta import read_model_file

    meta = read_model_file(str(path))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=[(runtime.CUDA, dict(runtime.CUDA_OPTIONS))])
    points = []
    rng = np.random.default_rng(0)
    for b in ceiling.batch_sizes(max_batch_size):
        x = ort.OrtValue.ortvalue_from_numpy(
            rng.standard_normal((b, *meta.input_shape), dtype=np.float32), "cuda", 0
        )
        binding = session.io_binding()
        binding.bind_ortvalue_input(meta.input_name, x)
        binding.bind_output(meta.output_name, "cuda", 0)
        # run_with_iobinding returns when the stream is done
        point = ceiling.time_batch(
            lambda binding=binding: session.run_with_iobinding(binding), b, seconds, 10, warmup=3
        )
        points.append(dataclasses.asdict(point))
    return points


def tensorrt_attempt(path: Path) -> str:
    """Whether the TensorRT provider loads this model here: 'loaded' or the reason it does not.

    In a child process: a provider that fails to initialise may take the process down with it.
    """
    code = (
        "import sys\n"
        "from service import config\n"
        "from service.engine import runtime\n"
        "try:\n"
        "    runtime.Session(sys.argv[1], config.ModelSettings(providers=('tensorrt',)), threads=1)\n"
        "except runtime.ModelLoadError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    print('loaded')\n"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", code, str(path)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        return "no answer within 300 s"
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        return (
            f"the process exited with {result.returncode}: {(result.stderr.strip().splitlines() or [''])[-1]}"
        )
    return lines[-1]


async def _image_api(url: str, model: str, jpegs: list[bytes], plan: GpuPlan) -> list[dict]:
    channel = loadgen.channel(url)
    try:
        call = loadgen.image_caller(channel, model, jpegs)
        out = []
        for c in plan.image_concurrencies:
            r = await loadgen.closed_loop(call, concurrency=c, duration_s=plan.load_s, warmup_s=1.0)
            log(f"  image c={c:2d}: {r.images_per_s:7.1f} img/s  p50 {r.latency_ms['p50']:6.1f} ms  "
                f"p99 {r.latency_ms['p99']:6.1f} ms  errors {r.errors}")  # fmt: skip
            out.append(_asdict(r))
        return out
    finally:
        await channel.close()


def bench_model(name: str, path: Path, plan: GpuPlan, providers: tuple[str, ...], jpegs: list[bytes],
                workdir: Path, save, *, variants: tuple[str, ...] = (), tensorrt: str = "") -> dict:  # fmt: skip
    repo = target.single_model_repository(path, name, workdir / "repos")
    write_config(repo / name, plan, providers)
    out: dict = {"name": name, "path": str(path)}
    _ceiling(name, repo, plan, save, out)
    if "cuda" in providers:
        log(f"{name}: the graph alone on the GPU (input and output stay on the device)")
        out["device_resident"] = device_resident(path, plan.max_batch_size, plan.ceiling_s_per_batch)
        for p in out["device_resident"]:
            log(
                f"  batch {p['batch_size']:3d}: {p['images_per_s']:8.1f} img/s  p50 {p['latency_ms']['p50']:7.2f} ms"
            )
        save()
    log(f"{name}: svertka serve")
    with target.serve(
        repo, log_path=workdir / "logs" / f"svertka-{name}.log", args=("--allow-shared-memory",)
    ) as server:
        for shm in (False, True):
            key = "perf_shm" if shm else "perf"
            log(f"  tensor API, perf_analyzer closed loop{' over system shared memory' if shm else ''}")
            points = perf.sweep(server.grpc_url, name, list(plan.concurrencies), plan.perf,
                                workdir / "perf", log, shared_memory=shm)  # fmt: skip
            out[key] = [_asdict(p) for p in points]
            save()
        out["image"] = asyncio.run(_image_api(server.grpc_url, name, jpegs, plan))
        info = [ln for ln in server.metrics_text().splitlines() if ln.startswith("svertka_model_info{")]
        out["model_info"] = info
        save()
    if "cuda" in providers and variants:  # the model the variants are for: its JPEGs decoded on the GPU
        log(f"{name}: svertka serve --image-decoder gpu (nvImageCodec)")
        try:
            with target.serve(
                repo,
                log_path=workdir / "logs" / f"svertka-{name}-gpu-decode.log",
                args=("--image-decoder", "gpu"),
            ) as server:
                out["image_gpu_decode"] = asyncio.run(_image_api(server.grpc_url, name, jpegs, plan))
        except Exception as exc:  # keep the rest; the log has the traceback
            out["image_gpu_decode_error"] = f"{type(exc).__name__}: {exc}"
            log(f"{name} --image-decoder gpu: failed: {out['image_gpu_decode_error']}")
        save()
    out["variants"] = {}
    for variant in variants:
        entry: dict = {"config": VARIANTS[variant][0]}
        out["variants"][variant] = entry
        if variant == "tensorrt" and tensorrt != "loaded":
            entry["error"] = f"the TensorRT provider does not load here: {tensorrt}"
            continue
        # The same model with one setting changed, minutes after the baseline.
        write_config(repo / name, plan, providers, VARIANTS[variant][0])
        try:
            _ceiling(name, repo, plan, save, entry)
            log(f"{name}: svertka serve with {VARIANTS[variant][0]}")
            with target.serve(
                repo,
                log_path=workdir / "logs" / f"svertka-{name}-{variant}.log",
                args=("--allow-shared-memory",),
            ) as server:
                points = perf.sweep(server.grpc_url, name, list(plan.concurrencies), plan.perf,
                                    workdir / f"perf-{variant}", log, shared_memory=True)  # fmt: skip
                entry["perf_shm"] = [_asdict(p) for p in points]
        except Exception as exc:  # keep the other variants' numbers; the log has the traceback
            entry["error"] = f"{type(exc).__name__}: {exc}"
            log(f"{name} {variant}: failed: {entry['error']}")
        save()
    write_config(repo / name, plan, providers)
    return out


def _ceiling(name: str, repo: Path, plan: GpuPlan, save, out: dict) -> None:
    """Into ``out``: the server's own session on the model's current config.yaml, batch 1..max_batch_size."""
    from service import config

    settings = config.ModelSettings.load(repo / name)
    out["settings"] = _asdict(settings)
    log(f"{name}: ceiling (the server's session, batch 1..{plan.max_batch_size})")
    measured = ceiling.measure(
        repo / name / "1" / "model.onnx",
        model=name,
        settings=settings,
        seconds_per_batch=plan.ceiling_s_per_batch,
    )
    for p in measured.points:
        log(f"  batch {p.batch_size:3d}: {p.images_per_s:8.1f} img/s  p50 {p.latency_ms['p50']:7.2f} ms")
    out["ceiling"] = _asdict(measured)
    save()


def frontends_sweep(name: str, path: Path, plan: GpuPlan, providers: tuple[str, ...], workdir: Path,
                    ceiling_images_per_s: float | None) -> list[dict]:  # fmt: skip
    """``name`` served with each ``plan.frontends`` count in turn, perf_analyzer at one concurrency."""
    from bench.frontends import SHARE_COUNT_ENV, _environment

    repo = target.single_model_repository(path, name, workdir / "repos")
    write_config(repo / name, plan, providers)
    out = []
    for count in plan.frontends:
        log(f"{name}: svertka serve --frontends {count}, perf_analyzer c={plan.frontends_concurrency}")
        with (
            target.serve(repo, log_path=workdir / "logs" / f"svertka-{name}-f{count}.log",
                         args=("--frontends", str(count))) as server,
            _environment({SHARE_COUNT_ENV: "1"}),
        ):  # fmt: skip
            point = perf.run_level(server.grpc_url, name, plan.frontends_concurrency, plan.perf,
                                   workdir / "perf-frontends" / str(count), server_pid=server.pid)  # fmt: skip
        cpu = point.cpu or {}
        rate = point.images_per_s
        out.append({
            "frontends": count,
            "concurrency": plan.frontends_concurrency,
            "images_per_s": rate,
            "p50_ms": point.latency_ms.get("p50"),
            "server_cpu_ms_per_request": 1e3 * cpu["server_s"] / cpu["images"] if cpu.get("images") else None,
            "served_over_ceiling": rate / ceiling_images_per_s if rate and ceiling_images_per_s else None,
            "error": point.error,
        })  # fmt: skip
        log(f"  {json.dumps(out[-1])}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".bench" / "gpu", help="results directory")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument(
        "--providers", default="cuda", help="comma-separated, as in a model's config (default cuda)"
    )
    parser.add_argument("--quick", action="store_true", help="seconds per step (the test's mode)")
    parser.add_argument(
        "--report-only",
        type=Path,
        nargs="+",
        metavar="GPU_JSON",
        help="only write the report from results files (one section each, in order)",
    )
    parser.add_argument("--report", type=Path, default=REPO_ROOT / "docs" / "benchmarks-gpu.md")
    args = parser.parse_args(argv)  # fmt: skip

    from bench import gpu_report

    if args.report_only:
        gpu_report.write([json.loads(p.read_text()) for p in args.report_only], args.report)
        log(f"wrote {args.report}")
        return 0
    plan = QUICK if args.quick else FULL
    providers = tuple(p for p in args.providers.split(",") if p)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "gpu.json"
    import onnxruntime as ort

    results: dict = {
        "meta": {
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine.describe(), "gpu": gpu_description(), "onnxruntime": ort.__version__,
            "available_providers": ort.get_available_providers(), "providers": list(providers),
            "plan": _asdict(plan), "perf_analyzer": perf.version(),
            "argv": ["python", "-m", "bench.gpu", *(argv if argv is not None else sys.argv[1:])],
        },
        "models": [],
    }  # fmt: skip

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=1))

    save()
    log(
        f"GPU: {results['meta']['gpu'] or 'none'}; onnxruntime {ort.__version__}: {ort.get_available_providers()}"
    )
    work = args.out / "work"
    made = make_models(work / "models", args.arch, args.image_size)
    jpegs = images.load_jpegs(work / "images")
    if "cuda" in providers:
        results["meta"]["tensorrt"] = tensorrt_attempt(made[args.arch])
        log(f"TensorRT: {results['meta']['tensorrt']}")
        save()
    # Do both JPEG decoders classify alike? nvImageCodec on the GPU (its CPU backend without one).
    try:
        from bench import decode_agreement
        from service import gpu_decode

        decoder = gpu_decode.JpegDecoder(cpu_backend="cuda" not in providers)
        results["decode_agreement"] = {
            "backend": "cpu" if "cuda" not in providers else "gpu",
            **decode_agreement.measure(decoder, REPO_ROOT / "models", REPO_ROOT / "data" / "digits" / "val",
                                       work / "images"),
        }  # fmt: skip
    except Exception as exc:  # e.g. no models/ or nvImageCodec here: keep the rest of the run
        results["decode_agreement"] = {"error": f"{type(exc).__name__}: {exc}"}
    log(f"decode agreement: {json.dumps(results['decode_agreement'])}")
    save()
    for index, (name, path) in enumerate(made.items()):
        entry: dict = {"name": name}
        results["models"].append(entry)
        try:
            entry.update(bench_model(name, path, plan, providers, jpegs, work, save,
                                     variants=variants_for(name, index, providers),
                                     tensorrt=results["meta"].get("tensorrt", "")))  # fmt: skip
        except Exception as exc:  # keep the other model's numbers; the log has the traceback
            entry["error"] = f"{type(exc).__name__}: {exc}"
            log(f"{name}: failed: {entry['error']}")
        save()
    # Frontend processes: the null model (the serving path alone) and the fp16 model.
    null = models.null_model(work / "models", image_size=args.image_size)
    fp16 = next((m for m in results["models"] if m["name"].endswith("-fp16")), {})
    fp16_ceiling = max(
        (p["images_per_s"] for p in (fp16.get("ceiling") or {}).get("points", [])), default=None
    )
    results["frontends"] = {}
    sweeps = [(null.name, null.path, None), (fp16.get("name"), made.get(fp16.get("name", "")), fp16_ceiling)]
    for name, path, ceiling_rate in sweeps if plan is FULL else sweeps[:1]:  # quick: the null model
        if path is None:
            continue
        try:
            results["frontends"][name] = frontends_sweep(name, path, plan, providers, work, ceiling_rate)
        except Exception as exc:  # keep what was measured
            results["frontends"][name] = [{"error": f"{type(exc).__name__}: {exc}"}]
            log(f"{name}: frontends sweep failed: {exc}")
        save()
    results["meta"]["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    save()
    log(f"results: {results_path}")
    gpu_report.write([json.loads(json.dumps(results))], args.out / "benchmarks-gpu.md", findings=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
