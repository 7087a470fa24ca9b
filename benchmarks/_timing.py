"""Timing shared by the benchmark scripts: variants interleaved call by call.

Every call of every variant is timed, and the variants are called in a new
random order each time round: so all of them see the same machine from one
microsecond to the next, a neighbour's burst on a shared machine lands on all of
them alike, and none is always the one that runs after the variant that leaves
the caches coldest. Report medians.

Example:
    >>> times = interleaved({"a": lambda: None, "b": lambda: None}, calls=10, blocks=2)
    >>> [len(blocks) for blocks in times.values()], len(times["a"][0])
    ([2, 2], 5)
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Callable, Mapping

__all__ = ["block_differences", "interleaved", "medians"]


def interleaved(
    variants: Mapping[str, Callable[[], object]], calls: int, blocks: int
) -> dict[str, list[list[int]]]:
    """Nanoseconds of each call, per variant and block (``calls`` per variant in all)."""
    names = list(variants)
    order = names.copy()
    shuffle = random.Random(0).shuffle
    clock = time.perf_counter_ns
    times: dict[str, list[list[int]]] = {name: [] for name in names}
    for _ in range(blocks):
        block: dict[str, list[int]] = {name: [] for name in names}
        gc.collect()
        gc.disable()
        try:
            for _ in range(max(1, calls // blocks)):
                shuffle(order)
                for name in order:
                    fn = variants[name]
                    start = clock()
                    fn()
                    block[name].append(clock() - start)
        finally:
            gc.enable()
        for name in names:
            times[name].append(block[name])
    return times


def medians(times: dict[str, list[list[int]]]) -> dict[str, float]:
    """Median seconds per call of each variant, over all its blocks."""
    return {
        name: statistics.median(t for block in per for t in block) / 1e9
        for name, per in times.items()
    }


def block_differences(times: dict[str, list[list[int]]], a: str, b: str) -> list[float]:
    """Median of ``a`` minus median of ``b`` in each block, in microseconds."""
    return [
        (statistics.median(x) - statistics.median(y)) / 1e3
        for x, y in zip(times[a], times[b], strict=True)
    ]
