"""Build the repositories the engine benchmarks in docs/engine.md ran on (needs torch).

Backs docs/engine.md, "Batching policy" (the models behind its numbers), for
``bench.research.engine_batching``. ::

    .venv/bin/python -m bench.research.engine_models --out /tmp/eng

writes ``/tmp/eng/repo`` (resnet20 at 32x32 and torchvision resnet18 at 224x224,
untrained: compute cost is what the benchmarks measure, exported with
svertka's own exporter) and ``/tmp/eng/tinyrepo`` (the tiny test model).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import onnx
import torch
import torchvision

from export.models import build_model
from export.onnx_export import to_onnx
from service import modelmeta
from tests.helpers.tinymodel import make_repository


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/eng"))
    args = parser.parse_args()
    torch.manual_seed(0)
    for name, model, size, resize, classes in [
        ("resnet20", build_model("resnet20", 10), 32, 32, 10),
        ("resnet18", torchvision.models.resnet18(num_classes=1000), 224, 256, 1000),
    ]:
        proto = to_onnx(model.eval(), (size, size))
        meta = modelmeta.ModelMeta(
            labels=[f"c{i}" for i in range(classes)],
            crop=(size, size),
            resize=resize,
            mean=modelmeta.IMAGENET_MEAN,
            std=modelmeta.IMAGENET_STD,
            arch=name,
        )
        modelmeta.attach(proto, meta)
        path = args.out / "repo" / name / "1" / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(proto, str(path))
        print(path)
    print(make_repository(args.out / "tinyrepo", {"tiny": [1]}))


if __name__ == "__main__":
    main()
