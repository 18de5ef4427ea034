"""An engine's drives: one offload directory each, with its own file and I/O threads.

``offload_dir`` may name several directories, one per drive. Each gets a
private directory (``private_dir.py``), an offload file and ``io_threads``
threads of its own, so the drives move bytes in parallel; a tensor's chunks
are split over them by :class:`Striping`, in proportion to each drive's
write rate.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from fxoffload.runtime import private_dir
from fxoffload.runtime.offload_file import OffloadFile
from fxoffload.runtime.transfers import ChunkedFile

_DIRECT = {"auto": None, "direct": True, "buffered": False}


@dataclasses.dataclass(eq=False)
class Drive:
    """One offload directory (``root``, as ``offload_dir`` names it) in use by an engine."""

    root: str
    directory: str
    """The engine's private directory in ``root``, removed by :meth:`close`."""
    file: OffloadFile
    pool: ThreadPoolExecutor
    chunked: ChunkedFile
    _private_dir: private_dir.PrivateDir

    @classmethod
    def open(cls, root: str, *, io_mode: str, io_threads: int, chunk_bytes: int, verify: bool):
        """Check ``root`` and make a private directory and an offload file in it.

        Raises ``ValueError`` naming ``root`` if it is unusable, leaving nothing behind.
        """
        made = private_dir.make_private_dir(root)
        try:
            file = OffloadFile(made.path, direct=_DIRECT[io_mode])
        except OSError as e:
            made.remove()
            raise ValueError(
                f"fxoffload cannot use {io_mode} I/O in offload_dir {root!r}: {e}"
            ) from e
        pool = ThreadPoolExecutor(io_threads, thread_name_prefix="fxoffload-io")
        chunked = ChunkedFile(file, pool, chunk_bytes, verify=verify, root=root)
        return cls(root, made.path, file, pool, chunked, made)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.directory).free

    def close(self) -> None:
        """Finish queued I/O, then remove the file and the private directory."""
        self.pool.shutdown(wait=True)
        self.file.close()
        self._private_dir.remove()


def open_drives(roots: Sequence[str], **settings) -> tuple[Drive, ...]:
    """A drive per root (``Drive.open``'s settings); if one fails, those made are closed."""
    drives: list[Drive] = []
    try:
        for root in roots:
            drives.append(Drive.open(root, **settings))
    except BaseException:
        for drive in drives:
            drive.close()
        raise
    return tuple(drives)


@dataclasses.dataclass(frozen=True)
class Share:
    """Bytes ``start`` to ``start + length`` of a tensor, to be written to drive ``drive``."""

    drive: int
    start: int
    length: int


class Striping:
    """Splits tensors into shares, one run of whole chunks per drive, so that each drive's
    bytes, over the tensors stored so far, follow its weight.

    Each chunk goes to the drive furthest below its weighted share of the
    bytes assigned until then; a tensor's chunks on one drive are one run,
    so one slot holds them. One drive takes every tensor whole.
    Not thread-safe: the engine calls :meth:`split` under its lock.
    """

    def __init__(self, weights: Sequence[float], chunk_bytes: int) -> None:
        if not weights or min(weights) <= 0:
            raise ValueError(f"drive weights must be positive, got {list(weights)}")
        self.weights = tuple(weights)
        self._chunk = chunk_bytes
        self._assigned = [0] * len(weights)

    def split(self, nbytes: int) -> list[Share]:
        """The shares of a tensor of ``nbytes``, in byte order; each starts at a multiple of
        ``chunk_bytes`` (the one with the short last chunk comes last)."""
        if len(self.weights) == 1 or nbytes == 0:
            return [Share(0, 0, nbytes)]
        lengths = [0] * len(self.weights)
        for start in range(0, nbytes, self._chunk):
            chunk = min(self._chunk, nbytes - start)
            drive = min(
                range(len(self.weights)),
                key=lambda d: (self._assigned[d] + chunk) / self.weights[d],
            )
            lengths[drive] += chunk
            self._assigned[drive] += chunk
        used = [d for d, length in enumerate(lengths) if length]
        shares, start = [], 0
        for drive in sorted(used, key=lambda d: lengths[d] % self._chunk != 0):
            shares.append(Share(drive, start, lengths[drive]))
            start += lengths[drive]
        return shares
