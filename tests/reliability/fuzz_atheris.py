"""Coverage-guided fuzzing (atheris / libFuzzer) of image decoding and tensor request parsing.

Run through ``make fuzz`` or directly::

    .venv/bin/python -m tests.reliability.fuzz_atheris decode -atheris_runs=200000
    .venv/bin/python -m tests.reliability.fuzz_atheris request -max_total_time=300

The first argument picks the target; the rest go to libFuzzer. The decode
target starts from a corpus of valid images of every accepted format
(written to build/fuzz/<target>/seeds), so the fuzzer explores the decoders'
real code paths instead of only the signature check. Any exception other than
the domain error InvalidInput, or a failed invariant (tests/reliability/
fuzzing.py), stops the run with the input saved as crash-<sha1>.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

# Pillow's format plugins (header parsing) are Python: instrument them too, not only svertka.
with atheris.instrument_imports(include=["service", "PIL"]):
    from tests.reliability import fuzzing

ROOT = Path(__file__).resolve().parents[2]


def _decode(data: bytes) -> None:
    fuzzing.check_decode(data)


def _request(data: bytes) -> None:
    fuzzing.check_request_bytes(data)
    fuzzing.check_split(data)


TARGETS = {"decode": _decode, "request": _request}


def _seeds(target: str) -> Path:
    from tests.reliability.hostile import png_claiming

    seeds = ROOT / "build" / "fuzz" / target / "seeds"
    seeds.mkdir(parents=True, exist_ok=True)
    if target == "decode":
        items = [*fuzzing.seed_images(), png_claiming(9000, 9000)]
    else:
        from tests.reliability.harness import tensor_request

        request = tensor_request()
        images = tensor_request()
        images.inputs[0].datatype = "BYTES"
        del images.inputs[0].shape[:]
        images.inputs[0].shape.append(1)
        images.raw_input_contents[0] = len(b"abc").to_bytes(4, "little") + b"abc"
        items = [request.SerializeToString(), images.SerializeToString()]
    for i, item in enumerate(items):
        (seeds / f"seed-{i}").write_bytes(item)
    return seeds


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: {argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = argv[1]
    corpus = ROOT / "build" / "fuzz" / target / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    seeds = _seeds(target)
    crashes = ROOT / "build" / "fuzz" / target
    args = [argv[0], *argv[2:], f"-artifact_prefix={crashes}/", str(corpus), str(seeds)]
    atheris.Setup(args, TARGETS[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
