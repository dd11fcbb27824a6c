#!/usr/bin/env bash
# python -m bench.gpu on a GPU machine that has python3 with torch, torchvision, onnx and the CUDA 13
# libraries (nvidia-* wheels) but not svertka's venv, and no network: what it lacks comes in BUNDLE.
#
#   bash bench/gpu_machine.sh BUNDLE RESULTS [python -m bench.gpu flags]
#
# BUNDLE (made here by bench/gpu_bundle.sh) holds ort.tar.xz.part* (onnxruntime-gpu's package, split
# into pieces small enough to copy) and rest.tar.xz (site/: grpcio, protobuf, simplejpeg, prometheus-client and the gRPC health and
# reflection packages for that python; bin/perf_analyzer from the tritonclient wheel; lib/: the
# libcudart.so.12 and libb64 that perf_analyzer links). RESULTS gets gpu.json, benchmarks-gpu.md and
# the server logs, also when the run fails or is cut short.
set -euo pipefail
bundle=$1 results=$2
shift 2
root=/tmp/svertka-gpu
rm -rf "$root" && mkdir -p "$root/site" "$results"
xz -dc "$bundle/rest.tar.xz" | tar -C "$root" -xf -
cat "$bundle"/ort.tar.xz.part* | xz -dc | tar -C "$root/site" -xf -
export PYTHONPATH="$root/site" PYTHONUNBUFFERED=1 PERF_ANALYZER="$root/bin/perf_analyzer"
# onnxruntime's CUDA provider opens libcudart/cublas/cudnn/cufft/curand by name: every lib folder of the
# nvidia-* packages goes on the search path.
nvlibs=$(python3 -c '
import glob, importlib.util, os
spec = importlib.util.find_spec("nvidia")
dirs = {os.path.dirname(so) for base in (spec.submodule_search_locations if spec else [])
        for so in glob.glob(os.path.join(base, "**", "lib*.so*"), recursive=True)}
print(":".join(sorted(dirs)))')
export LD_LIBRARY_PATH="$root/lib:$nvlibs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
collect() {
    cp "$root/out/gpu.json" "$root/out/benchmarks-gpu.md" "$results/" 2>/dev/null || true
    for f in "$root"/out/work/logs/*.log; do [ -f "$f" ] && tail -c 200000 "$f" >"$results/$(basename "$f")"; done
    true
}
trap collect EXIT
python3 -c 'import onnxruntime as o, grpc, google.protobuf as p; print("onnxruntime", o.__version__, o.get_available_providers(), "grpc", grpc.__version__, "protobuf", p.__version__)'
python3 -m bench.gpu --out "$root/out" "$@"
