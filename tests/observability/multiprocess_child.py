"""A stand-in for an engine or frontend process, for tests/observability/test_metrics_multiprocess.py.

``python -m tests.observability.multiprocess_child engine|frontend INDEX``,
started by the test (the "supervisor") after ``prepare_multiprocess``, so
prometheus_client is imported here with ``PROMETHEUS_MULTIPROC_DIR`` set.
It builds ``Metrics(multiprocess=True)`` and records what each line of JSON
on stdin says, answering each with one line of JSON on stdout, so the test
knows a recording is in the files before it scrapes.
"""

from __future__ import annotations

import json
import sys
import threading

from service.metrics import Metrics

MODEL = ("tiny", 1)


def main() -> None:
    role, index = sys.argv[1], int(sys.argv[2])
    m = Metrics(multiprocess=True, frontend=index if role == "frontend" else None)
    sent: list[dict] = []  # a frontend's outcomes, for the engine's statistics (the IPC message, here)
    if role == "frontend":
        m.statistics_sink = sent.append
    spinning = threading.Event()
    spun = [0]
    spinner: threading.Thread | None = None

    def spin() -> None:
        rec = m.model(*MODEL)
        while spinning.is_set():
            rec.request_series(api="image", code="OK", duration_s=0.003)
            spun[0] += 1

    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        rec = m.model(*MODEL)
        reply: dict = {"ok": True}
        if op == "load":  # what the engine's repository records when a version becomes ready
            m.set_model_info(
                *MODEL, provider="CPUExecutionProvider", precision="fp32", arch="resnet", sha256=cmd["sha"]
            )
            m.set_model_ready(*MODEL, True)
            rec.set_queue_capacity(64)
        elif op == "remove":
            m.set_model_ready(*MODEL, False)
            m.remove_model(*MODEL)
        elif op == "batches":
            for _ in range(cmd["n"]):
                rec.batch(cmd["size"], input_s=0.0, infer_s=0.002, output_s=0.0)
                rec.queued(0.001)
        elif op == "rejected":
            rec.rejected(cmd["reason"])
        elif op == "gauges":  # engine: queue depth and in-flight deltas
            rec.queue_depth.inc(cmd["depth"])
            rec.in_flight.inc(cmd["in_flight"])
        elif op == "requests":  # frontend: what a finished request records there (service/api/accounting.py)
            for _ in range(cmd["n"]):
                rec.request(
                    api=cmd["api"], code=cmd["code"], duration_s=cmd["s"], queue_s=0.001, compute_s=0.002
                )
                rec.postprocess(0.0001)
                m.grpc_started.labels("svertka.v1.ImageClassifier", "Classify", "unary").inc()
                m.grpc_handled.labels("svertka.v1.ImageClassifier", "Classify", "unary", cmd["code"]).inc()
        elif op == "sent":  # frontend: the outcomes its statistics_sink was given since the last time
            reply["outcomes"], sent[:] = list(sent), []
        elif op == "outcomes":  # engine: the statistics half, from the frontends' messages
            for outcome in cmd["outcomes"]:
                model, version = outcome.pop("model"), outcome.pop("version")
                m.model(model, version).request(**outcome, series=False)
        elif op == "accept":  # frontend: requests accepted and not answered yet
            for _ in range(cmd["n"]):
                m.frontend_request_started()
        elif op == "answer":
            for _ in range(cmd["n"]):
                m.frontend_request_finished()
        elif op == "snapshot":
            snap = rec.snapshot()
            reply.update(
                inference_count=snap.inference_count,
                execution_count=snap.execution_count,
                success=snap.success.count,
                fail=snap.fail.count,
            )
        elif op == "own":  # this process's own value of a sample (its registry, not the files' sum)
            reply["value"] = m.registry.get_sample_value(cmd["name"], cmd["labels"])
        elif op == "spin":
            spinning.set()
            spinner = threading.Thread(target=spin, daemon=True)
            spinner.start()
        elif op == "stop":
            spinning.clear()
            if spinner is not None:
                spinner.join()
            reply["spun"] = spun[0]
        else:
            reply = {"ok": False, "error": f"unknown op {op!r}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
