"""Per-request accounting: the outcome, durations and access-log line of every request, in one place.

A :class:`RequestRecord` is made once the model a request names is known;
:func:`track` finishes it with the code of whatever ends the request. The
engine records what it decides itself (queue rejections, batches, queue
waits); everything a request's caller sees is recorded here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from service import logs
from service.api import error_codes
from service.engine.interface import Model, Timings

if TYPE_CHECKING:  # prometheus_client; the frontend only records through it
    from service.metrics import Metrics


class RequestRecord:
    """Bookkeeping for one request: its outcome and timings in the metrics, the access log, the log id.

    Created once the model is known; ``finish`` must be called exactly once
    (the ``track`` context manager does it, whatever the outcome). ``timings``
    is handed to the model's infer call, which fills in where the time went.
    The recording point is the frontend's own, from ``metrics`` (the engine
    keeps its own for what it decides).
    """

    def __init__(
        self,
        metrics: Metrics,
        model: Model,
        *,
        api: str,
        method: str,
        rid: str,
        peer: str | None,
        start: float,
    ) -> None:
        self.model = model
        self._metrics = metrics
        self._recorder = metrics.model(model.name, model.version)
        metrics.frontend_request_started()
        self.api = api
        self.method = method
        self.rid = rid
        self.peer = peer
        self.start = start
        self.images: int | None = None
        self.timings = Timings()
        self.total_s = 0.0
        self._log_token = logs.bind_request_id(rid)

    def postprocessed(self, seconds: float) -> None:
        """Time spent turning the logits into the response (top-k, encoding)."""
        self._recorder.postprocess(seconds)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def finish(self, code: str) -> None:
        self._metrics.frontend_request_finished()
        duration = self.elapsed()
        self.total_s = duration
        t = self.timings
        self._recorder.request(
            api=self.api,
            code=code,
            duration_s=duration,
            queue_s=t.queue_s,
            compute_s=t.compute_s,
            compute_input_s=t.compute_input_s,
            compute_output_s=t.compute_output_s,
        )
        logs.access_log(
            request_id=self.rid,
            model=self.model.name,
            version=self.model.version,
            api=self.api,
            method=self.method,
            code=code,
            duration_ms=duration * 1000.0,
            images=self.images,
            peer=self.peer,
            sha256=self.model.sha256,
        )
        logs.reset_request_id(self._log_token)


@contextlib.contextmanager
def track(record: RequestRecord):
    """Finish ``record`` with the code of whatever ends the block (OK, a mapped error, CANCELLED)."""
    try:
        yield record
    except asyncio.CancelledError:
        record.finish("CANCELLED")
        raise
    except BaseException as exc:
        record.finish(error_codes.code_name(exc))
        raise
    else:
        record.finish("OK")
