"""The disk's timeline in one step: the one model of I/O that planning and scheduling share.

Writes run one at a time in forward, in the order the stored values are
made, each from when its bytes exist. Reads run one at a time in backward,
in the order of first use, each **as late as it can**: it ends by its first
use and by the time the next read must start. ``plan.py`` accepts a store
only if this schedule stays feasible; ``schedule.py`` issues each prefetch
at the start this schedule gives it. So what is planned is what runs.

Reading as late as possible is feasible exactly when reading in the same
order from the start of backward, back to back, ends every read by its use:
``first_use[k] >= sum(seconds[j] for j <= k)`` for every read ``k``. The
planner keeps ``first_use[k] - sum(...)`` (the read's slack) for every
accepted read in a segment tree over all candidates sorted by first use, so
that accepting one read, which takes its time from the slack of every later
one, costs O(log n).

Late reads also hold the fewest bytes read ahead of their use, so if the
latest schedule exceeds ``prefetch_budget_bytes`` no schedule in that order
fits it.
"""

from __future__ import annotations

import dataclasses
import heapq
import math


@dataclasses.dataclass(frozen=True)
class Read:
    """One read of backward: when its value is first used, how long it takes, its bytes."""

    name: str
    first_use: float
    seconds: float
    nbytes: int


def latest_starts(reads: list[Read]) -> dict[str, float]:
    """Each read's latest start (negative: it cannot end by its first use)."""
    starts: dict[str, float] = {}
    must_end = math.inf
    for read in sorted(reads, key=lambda r: r.first_use, reverse=True):
        must_end = min(read.first_use, must_end)
        must_end = starts[read.name] = must_end - read.seconds
    return starts


def peak_bytes_read_ahead(reads: list[Read], starts: dict[str, float]) -> tuple[int, list[Read]]:
    """The most bytes read and not yet used at any time, and the reads holding them then."""
    events = sorted(
        [(starts[r.name], 1, r) for r in reads] + [(r.first_use, 0, r) for r in reads],
        key=lambda e: (e[0], e[1]),
    )
    held: dict[str, Read] = {}
    peak, peak_reads = 0, []
    total = 0
    for _, begins, read in events:
        if begins:
            held[read.name] = read
            total += read.nbytes
            if total > peak:
                peak, peak_reads = total, list(held.values())
        else:
            total -= read.nbytes
            del held[read.name]
    return peak, peak_reads


class ReadQueue:
    """The reads accepted so far, for O(log n) checks of one more.

    Built once over every candidate read, sorted by first use; none is
    accepted at first. ``slack_if_added`` says how late the tightest read
    would be if one more were accepted; ``add`` accepts it.
    """

    def __init__(self, reads: list[Read]) -> None:
        ordered = sorted(reads, key=lambda r: r.first_use)
        self._slot = {r.name: i for i, r in enumerate(ordered)}
        self._reads = ordered
        size = 1
        while size < max(len(ordered), 1):
            size *= 2
        self._size = size
        self._min = [math.inf] * (2 * size)  # slack of accepted reads; inf elsewhere
        self._arg = [-1] * (2 * size)
        self._lazy = [0.0] * (2 * size)
        self._seconds = [0.0] * (len(ordered) + 1)  # Fenwick tree of accepted read times

    def slack_if_added(self, read: Read) -> tuple[float, str]:
        """The smallest slack of any accepted read, ``read`` included, were it accepted;
        and that read's name. Negative: that read would end after its first use."""
        slot = self._slot[read.name]
        own = read.first_use - self._seconds_before(slot) - read.seconds
        later, arg = self._query(slot + 1, len(self._reads))
        if later - read.seconds < own:
            return later - read.seconds, self._reads[arg].name
        return own, read.name

    def add(self, read: Read) -> None:
        slot = self._slot[read.name]
        own = read.first_use - self._seconds_before(slot) - read.seconds
        self._update(slot + 1, len(self._reads), -read.seconds)
        self._set(slot, own)
        i = slot + 1
        while i < len(self._seconds):
            self._seconds[i] += read.seconds
            i += i & -i

    def _seconds_before(self, slot: int) -> float:
        total, i = 0.0, slot
        while i > 0:
            total += self._seconds[i]
            i -= i & -i
        return total

    # A segment tree with range add and range minimum, nodes 1..2*size-1.
    def _query(self, lo: int, hi: int, node=1, left=0, right=-1) -> tuple[float, int]:
        right = self._size if right < 0 else right
        if hi <= left or right <= lo:
            return math.inf, -1
        if lo <= left and right <= hi:
            return self._min[node], self._arg[node]
        mid = (left + right) // 2
        a = self._query(lo, hi, 2 * node, left, mid)
        b = self._query(lo, hi, 2 * node + 1, mid, right)
        best = a if a[0] <= b[0] else b
        return best[0] + self._lazy[node], best[1]

    def _update(
        self, lo: int, hi: int, delta: float, node: int = 1, left: int = 0, right: int = -1
    ):
        right = self._size if right < 0 else right
        if hi <= left or right <= lo:
            return
        if lo <= left and right <= hi:
            self._min[node] += delta
            self._lazy[node] += delta
            return
        mid = (left + right) // 2
        self._update(lo, hi, delta, 2 * node, left, mid)
        self._update(lo, hi, delta, 2 * node + 1, mid, right)
        self._pull(node)

    def _set(self, slot: int, value: float) -> None:
        path = []
        node, left, right = 1, 0, self._size
        while right - left > 1:
            path.append(node)
            mid = (left + right) // 2
            node, left, right = (2 * node, left, mid) if slot < mid else (2 * node + 1, mid, right)
        value -= sum(self._lazy[n] for n in path)  # stored below the pending adds above it
        self._min[node], self._arg[node] = value, slot
        for n in reversed(path):
            self._pull(n)

    def _pull(self, node: int) -> None:
        a, b = 2 * node, 2 * node + 1
        best = a if self._min[a] <= self._min[b] else b
        self._min[node] = self._min[best] + self._lazy[node]
        self._arg[node] = self._arg[best]


class WriteQueue:
    """Writes in forward, one at a time in production order: when each would end, and
    how many bytes are still waiting to be written when the next value is made."""

    def __init__(self) -> None:
        self.free_at = 0.0
        self.peak_bytes = 0
        """The most bytes ever waiting or being written at once: staging memory held."""
        self._pending: list[tuple[float, int]] = []  # (end, bytes), a heap
        self._pending_bytes = 0

    def end_if_added(self, produced: float, seconds: float) -> float:
        return max(produced, self.free_at) + seconds

    def bytes_waiting(self, at: float) -> int:
        while self._pending and self._pending[0][0] <= at:
            self._pending_bytes -= heapq.heappop(self._pending)[1]
        return self._pending_bytes

    def add(self, produced: float, seconds: float, nbytes: int) -> float:
        self.peak_bytes = max(self.peak_bytes, self.bytes_waiting(produced) + nbytes)
        self.free_at = end = self.end_if_added(produced, seconds)
        heapq.heappush(self._pending, (end, nbytes))
        self._pending_bytes += nbytes
        return end


__all__ = ["Read", "ReadQueue", "WriteQueue", "latest_starts", "peak_bytes_read_ahead"]
