"""The benchmark's peer: Triton Inference Server (through PyTriton) serving an ONNX file.

Runs inside the peer's own virtualenv (``bench/setup_peer.sh``), never in the
project's: it imports neither svertka nor anything the project pins. It serves
the very ONNX file svertka serves, with an onnxruntime callable under Triton's
dynamic batcher, configured like svertka (same max batch size, queue delay and
intra-op thread budget), so a perf_analyzer run against each compares the two
servers and nothing else.

Started by ``bench/peer.py``; prints ``PEER READY`` once Triton serves the model.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig


def make_session(path: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="path of the ONNX file")
    parser.add_argument("--name", required=True, help="model name to serve it under")
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--threads", type=int, required=True, help="onnxruntime intra-op threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    session = make_session(args.model, args.threads)
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    item_shape = tuple(int(d) for d in inp.shape[1:])
    classes = int(out.shape[1])
    # Warm up before serving, as svertka does.
    session.run(None, {inp.name: np.zeros((1, *item_shape), np.float32)})

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        (logits,) = session.run([out.name], {inp.name: inputs[inp.name]})
        return {out.name: logits}

    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        http_address="127.0.0.1",
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        log_verbose=0,
    )
    # PyTriton restricts the statistics protocol by default; perf_analyzer needs it.
    security = TritonSecurityConfig(restricted_endpoints=[])
    with Triton(config=config, security_config=security) as triton:
        triton.bind(
            model_name=args.name,
            infer_func=infer,
            inputs=[Tensor(name=inp.name, dtype=np.float32, shape=item_shape)],
            outputs=[Tensor(name=out.name, dtype=np.float32, shape=(classes,))],
            config=ModelConfig(
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
            ),
            strict=False,
        )
        signal.signal(signal.SIGTERM, lambda *_: triton.stop())
        triton.run()
        print("PEER READY", flush=True)
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
