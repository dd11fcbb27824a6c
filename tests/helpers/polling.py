"""Polling with a deadline: a condition that never comes true fails its test at once, saying what it waited for.

A bare ``while not condition: await asyncio.sleep(...)`` turns a regression
into a hang that only the suite's 600 s timeout ends, with no hint of what
was awaited.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def until(
    predicate: Callable[[], T], what: str, *, timeout_s: float = 10.0, interval_s: float = 0.005
) -> T:
    """Poll ``predicate`` on the running loop until it returns something truthy; that value.

    Raises AssertionError naming ``what`` once ``timeout_s`` has passed.
    """
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(interval_s)
    return value
