"""Shared helper of the benchmark scripts (run them as `python benchmarks/<script>.py`)."""
from __future__ import annotations

import time


def timed(function):
    """(result, wall seconds) of calling `function()`."""
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start
