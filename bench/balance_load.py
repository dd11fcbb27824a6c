"""One client's load for ``python -m bench.frontends --balance``, in a process of its own.

    python -m bench.balance_load CLIENT URL CONCURRENCY SECONDS FRONTENDS

Connects CONCURRENCY caller threads of CLIENT to the digits model, prints
``ready``, waits for a line on stdin (the parent reads the frontends' CPU
times meanwhile), calls for SECONDS and prints ``{"calls_per_s": ...}``.
A process of its own because tritonclient's generated modules and svertka's
tensor API modules register the same protobuf package, so one process cannot
import both; this module imports neither until it knows the client.
"""

from __future__ import annotations

import json
import sys
import time

MODEL = "digits"
#: Each client, as applications commonly hold it.
CLIENTS = (
    "tritonclient: one client, shared",
    "tritonclient: a client per thread",
    "tritonclient: a client per thread, own connection",
    "svertka Client: connections=1",
    "svertka Client: connections=2N",
)


def _caller(kind: str, url: str, frontends: int, shared: list):
    """A function that makes one call with ``kind`` (made per thread; ``shared`` holds clients made
    once and closed by the caller)."""
    import numpy as np

    if kind.startswith("svertka"):
        from service.client import Client

        if not shared:
            connections = 1 if kind.endswith("=1") else 2 * frontends
            shared.append(Client(url, connections=connections))
        client, image = shared[0], _png()
        return lambda: client.classify(image)

    import tritonclient.grpc as grpcclient

    if kind.endswith("shared"):
        if not shared:
            shared.append(grpcclient.InferenceServerClient(url))
        client = shared[0]
    else:
        args = [("grpc.use_local_subchannel_pool", 1)] if kind.endswith("own connection") else None
        client = grpcclient.InferenceServerClient(url, channel_args=args)
        shared.append(client)
    meta = client.get_model_metadata(MODEL)
    (tensor,) = meta.inputs
    shape = [1, *(int(d) for d in tensor.shape[1:])]
    inputs = [grpcclient.InferInput(tensor.name, shape, tensor.datatype)]
    inputs[0].set_data_from_numpy(np.zeros(shape, np.float32))
    return lambda: client.infer(MODEL, inputs)


def _png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def main(kind: str, url: str, concurrency: int, frontends: int, seconds: float) -> None:
    """Connect ``concurrency`` callers of ``kind``, say ``ready``, wait for a line on
    stdin, call for ``seconds``, print ``{"calls_per_s": ...}``."""
    import threading

    shared: list = []
    callers = [_caller(kind, url, frontends, shared) for _ in range(concurrency)]
    for call in callers:
        call()  # connected before the window
    print("ready", flush=True)
    sys.stdin.readline()
    stop = threading.Event()
    counts = [0] * concurrency

    def run(i: int) -> None:
        while not stop.is_set():
            callers[i]()
            counts[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(concurrency)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    print(json.dumps({"calls_per_s": sum(counts) / (time.monotonic() - started)}), flush=True)
    for client in shared:
        client.close()


if __name__ == "__main__":
    kind, url, concurrency, seconds, frontends = sys.argv[1:6]
    main(kind, url, int(concurrency), int(frontends), float(seconds))
