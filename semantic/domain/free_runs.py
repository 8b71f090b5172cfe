"""The block pool's free block ids, kept as runs of consecutive ids and handed out best fit.

A store writes its new blocks fastest when they are one run of consecutive ids: on CUDA one kernel then
takes its block ids from a few numbers in the launch instead of a plan array made per store (whose copy to
the device spread the kernel's p95 several-fold, H100), and the other backends write each run as one slice.
A free list used as a stack hands back whatever was freed last: under agents coming and going (random
allocations of 12-480 blocks and releases, a pool 2,000-8,000 blocks large held at least a quarter full),
only 21-22 % of allocations were one run, and 57-59 % were six runs or more. Best fit over coalesced runs
made 98-99 % of the same allocations one run (``experiments/results/cpu-free-runs/``).

Invariants (``check``): runs are disjoint and never adjacent (a freed run merges with its neighbours), every
run is indexed by its start, by its end and in the length order, and the count is the sum of the lengths.
"""

from __future__ import annotations

import bisect
from typing import Dict, Iterator, List, Sequence, Tuple


class FreeRuns:
    """Free ids ``0 .. total - 1`` to start with; :meth:`take` and :meth:`give_back` move ids out and in."""

    def __init__(self, total: int):
        self._length: Dict[int, int] = {}  # run start -> its length
        self._start_of_end: Dict[int, int] = {}  # run end (exclusive) -> its start
        self._by_length: List[Tuple[int, int]] = []  # (length, start), sorted: best fit by bisection
        self._count = 0
        if total:
            self._add(0, total)
            self._count = total

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        for start, length in self._length.items():
            yield from range(start, start + length)

    def take(self, n: int) -> List[int]:
        """``n`` free ids (at most ``len(self)``), ascending within each run: the first ``n`` of the shortest
        run that holds them (the lowest such run among equals), else of the longest runs, fewest runs."""
        if n > self._count:
            raise AssertionError(f"{n} ids asked of {self._count} free")
        ids: List[int] = []
        by_length = self._by_length
        index = bisect.bisect_left(by_length, (n, -1))
        while len(ids) < n:
            length, start = by_length[index] if index < len(by_length) else by_length[-1]
            used = min(length, n - len(ids))
            self._remove(start, length)
            if length > used:
                self._add(start + used, length - used)
            ids.extend(range(start, start + used))
            index = len(by_length)  # what is left comes from the longest runs
        self._count -= n
        return ids

    def give_back(self, ids: Sequence[int]) -> None:
        """Make ``ids`` free again: distinct ids, none free now (the pool's reference counts guarantee it)."""
        if not ids:
            return
        ids = sorted(ids)
        n = len(ids)
        if ids[-1] - ids[0] == n - 1:  # the usual case: a handle's blocks, allocated as one run
            runs = [(ids[0], n)]
        else:
            runs, first = [], 0
            for i in range(1, n + 1):
                if i == n or ids[i] != ids[i - 1] + 1:
                    runs.append((ids[first], i - first))
                    first = i
        for start, length in runs:
            before = self._start_of_end.get(start)
            if before is not None:
                before_length = self._length[before]
                self._remove(before, before_length)
                start, length = before, length + before_length
            after = self._length.get(start + length)
            if after is not None:
                self._remove(start + length, after)
                length += after
            self._add(start, length)
        self._count += n

    def runs(self) -> List[Tuple[int, int]]:
        """``(start, length)`` of every run, by start."""
        return sorted(self._length.items())

    def check(self) -> None:
        """Raise ``AssertionError`` unless the invariants of this module's docstring hold."""
        runs = self.runs()
        assert sorted((length, start) for start, length in runs) == self._by_length, "length order out of step"
        assert self._start_of_end == {start + length: start for start, length in runs}, "end index out of step"
        assert all(length > 0 for _, length in runs), "an empty run"
        for (start, length), (next_start, _) in zip(runs, runs[1:]):
            assert start + length < next_start, f"runs at {start} and {next_start} overlap or touch"
        assert sum(length for _, length in runs) == self._count, "count != the runs' lengths"

    def _add(self, start: int, length: int) -> None:
        self._length[start] = length
        self._start_of_end[start + length] = start
        bisect.insort(self._by_length, (length, start))

    def _remove(self, start: int, length: int) -> None:
        del self._length[start]
        del self._start_of_end[start + length]
        del self._by_length[bisect.bisect_left(self._by_length, (length, start))]
