"""torch.onnx's dynamo vs TorchScript exporter on resnet20 (needs torch).

Backs docs/training.md, "Measurements" ("Exporter choice") and the exporter
choice in ``export/onnx_export.py``: ``.venv/bin/python -m bench.research.exporter_comparison``.
For each exporter: export time, the op histogram, input/output shapes, parity against torch and
batch invariance (8 images alone vs in one batch) in onnxruntime, and the warnings raised.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
import warnings
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.research.exporter_comparison",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    # After the arguments: --help answers without loading torch.
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from export.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    model.train()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    model.eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).numpy()
    tmp = Path(tempfile.mkdtemp())
    for dynamo in (True, False):
        kw: dict = dict(input_names=["input"], output_names=["logits"], opset_version=18, dynamo=dynamo)
        if dynamo:
            kw["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1)},)
            kw["external_data"] = False
        else:
            kw["dynamic_axes"] = {"input": {0: "batch"}, "logits": {0: "batch"}}
        path = tmp / f"dynamo-{dynamo}.onnx"
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.onnx.export(model, (x[:2],), str(path), **kw)
        seconds = time.perf_counter() - t0
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
        ops = collections.Counter(n.op_type for n in proto.graph.node)
        shapes = [
            (v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in [*proto.graph.input, *proto.graph.output]
        ]
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = sess.run(None, {"input": x.numpy()})[0]
        alone = np.concatenate([sess.run(None, {"input": x[i : i + 1].numpy()})[0] for i in range(8)])
        print(f"dynamo={dynamo}: {seconds:.1f} s, ops {dict(ops)}, io {shapes}")
        print(f"  parity {np.abs(out - ref).max():.1e}, batch invariance {np.abs(out - alone).max():.1e}")
        print(f"  warnings: {[str(w.message)[:90] for w in caught][:3]}")


if __name__ == "__main__":
    main()
