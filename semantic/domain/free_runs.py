"""The block pool's free block ids, kept as runs of consecutive ids and handed out best fit.

A store writes its new blocks fastest when they are one run of consecutive ids: on CUDA one kernel then
takes its block ids from a few numbers in the launch instead of a plan array made per store (whose copy to
the device spread the kernel's p95 several-fold, H100), and the other backends write each run as one slice.
A free list used as a stack hands back whatever was freed last: under agents coming and going (random
allocations of 12-480 blocks and releases in pools of 2,000 and 8,000 blocks, a release whenever fewer than
500 were free), only 21-22 % of allocations were one run, and 57-59 % were six runs or more. Best fit over coalesced runs
made 98-99 % of the same allocations one run (``experiments/results/cpu-free-runs/``).

Invariants (``check``): runs are disjoint and never adjacent (a freed run merges with its neighbours), every
run is indexed by its start, by its end and by its length, and the count is the sum of the lengths.
"""

from __future__ import annotations

import bisect
from typing import Dict, Iterator, List, Sequence, Set, Tuple


def id_runs(block_ids: Sequence[int], lo: int, hi: int) -> Iterator[Tuple[int, int, int]]:
    """Split ``block_ids[lo:hi]`` into runs of consecutive ids: yields ``(run_lo, run_hi, first id)``."""
    start = lo
    for k in range(lo + 1, hi + 1):
        if k == hi or block_ids[k] != block_ids[k - 1] + 1:
            yield start, k, block_ids[start]
            start = k


class FreeRuns:
    """Free ids ``0 .. total - 1`` to start with; :meth:`take` and :meth:`give_back` move ids out and in.

    Runs are found by length through one set of starts per length and a sorted list of the lengths present:
    a run added or removed costs a set operation, and a list operation only when its length is the first or
    last of its kind. Taking back 2,000 scattered ids into a pool of 100,000 blocks in ~48,000 runs took 18.8 ms
    with one sorted list of all runs, 2.2 ms this way (CPU).
    """

    def __init__(self, total: int):
        self._length: Dict[int, int] = {}  # run start -> its length
        self._start_of_end: Dict[int, int] = {}  # run end (exclusive) -> its start
        self._starts: Dict[int, Set[int]] = {}  # length -> the starts of the runs that long
        self._lengths: List[int] = []  # the keys of _starts, sorted: best fit by bisection
        self._count = 0
        if total:
            self._add(0, total)
            self._count = total

    @classmethod
    def of(cls, free_ids: Sequence[int]) -> "FreeRuns":
        """Free runs holding exactly ``free_ids`` (distinct, ascending): the pool's recount after an interrupt."""
        runs = cls(0)
        runs.give_back(free_ids)
        return runs

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        for start, length in self._length.items():
            yield from range(start, start + length)

    def take(self, n: int) -> Sequence[int]:
        """``n`` free ids (at most ``len(self)``), ascending within each run: the first ``n`` of a shortest run
        that holds them, as a ``range`` (a store's writes then know they are one run without comparing ids),
        else a list of the first ids of the longest runs, fewest runs."""
        if n > self._count:
            raise AssertionError(f"{n} ids asked of {self._count} free")
        if n == 0:
            return range(0)
        lengths = self._lengths
        index = bisect.bisect_left(lengths, n)
        if index < len(lengths):
            length = lengths[index]
            start = self._pop(length)
            if length > n:
                self._add(start + n, length - n)
            self._count -= n
            return range(start, start + n)
        ids: List[int] = []
        while len(ids) < n:  # no run is long enough: the longest ones
            length = lengths[-1]
            start = self._pop(length)
            used = min(length, n - len(ids))
            if length > used:
                self._add(start + used, length - used)
            ids.extend(range(start, start + used))
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
            runs = [(first_id, hi - lo) for lo, hi, first_id in id_runs(ids, 0, n)]
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
        by_length: Dict[int, Set[int]] = {}
        for start, length in runs:
            by_length.setdefault(length, set()).add(start)
        assert self._starts == by_length and self._lengths == sorted(by_length), "length index out of step"
        assert self._start_of_end == {start + length: start for start, length in runs}, "end index out of step"
        assert all(length > 0 for _, length in runs), "an empty run"
        for (start, length), (next_start, _) in zip(runs, runs[1:]):
            assert start + length < next_start, f"runs at {start} and {next_start} overlap or touch"
        assert sum(length for _, length in runs) == self._count, "count != the runs' lengths"

    def _add(self, start: int, length: int) -> None:
        self._length[start] = length
        self._start_of_end[start + length] = start
        starts = self._starts.get(length)
        if starts is None:
            starts = self._starts[length] = set()
            bisect.insort(self._lengths, length)
        starts.add(start)

    def _pop(self, length: int) -> int:
        """The start of a run ``length`` long, removed."""
        start = self._starts[length].pop()
        self._forget(start, length)
        return start

    def _remove(self, start: int, length: int) -> None:
        self._starts[length].remove(start)
        self._forget(start, length)

    def _forget(self, start: int, length: int) -> None:
        """The rest of removing a run whose start has left its length's set."""
        del self._length[start]
        del self._start_of_end[start + length]
        if not self._starts[length]:
            del self._starts[length]
            del self._lengths[bisect.bisect_left(self._lengths, length)]
