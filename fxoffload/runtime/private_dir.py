"""The engine's private directory under ``offload_dir``, and cleanup of crashed ones.

A live directory is one whose owner holds an advisory lock (``fcntl.flock``)
on the ``LOCK_NAME`` file in it. The kernel drops the lock when the owner
dies however it dies, and the lock means the same to every process on the
machine, whatever its PID namespace (a pid in a name does not: two containers
sharing an ``offload_dir`` would each see the other's pids as gone).
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import re
import shutil
import stat
import tempfile

import torch.distributed as dist

log = logging.getLogger(__name__)

_NAME = re.compile(r"fxoffload-(?:rank\d+-)?\d+-\w+")
"""``fxoffload-<pid>-XXXX`` or, in a distributed job, ``fxoffload-rank<R>-<pid>-XXXX``."""

LOCK_NAME = "owner.lock"
"""The file in a private directory whose lock its owner holds while it lives."""

_OPEN_LOCK = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW


@dataclasses.dataclass
class PrivateDir:
    """A private directory and the descriptor that holds its lock; :meth:`remove` ends both."""

    path: str
    lock_fd: int

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self.lock_fd)


def make_private_dir(root: str) -> PrivateDir:
    """Create ``root/fxoffload-[rank<R>-]<pid>-<random>`` with mode 0700, locked by this process.

    The pid in the name lets an operator see which process owns a directory,
    and the rank (present in a distributed job, see :func:`distributed_rank`)
    which rank of a job: the ranks of one node share its ``offload_dir``. The
    random suffix keeps two processes (or two engines) apart.
    """
    if not os.path.exists(root):
        raise ValueError(f"fxoffload offload_dir {root!r} does not exist")
    if not os.path.isdir(root):
        raise ValueError(f"fxoffload offload_dir {root!r} is not a directory")
    if not os.access(root, os.W_OK | os.X_OK):
        raise ValueError(f"fxoffload offload_dir {root!r} is not writable by this process")
    remove_stale_dirs(root)
    rank = distributed_rank()
    prefix = "fxoffload-" if rank is None else f"fxoffload-rank{rank}-"
    while True:
        try:
            path = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root)
            os.chmod(path, stat.S_IRWXU)
            lock = os.path.join(path, LOCK_NAME)
            fd = os.open(lock, _OPEN_LOCK | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise ValueError(f"fxoffload cannot create a directory in {root!r}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # a file system without locks
            os.close(fd)
            shutil.rmtree(path, ignore_errors=True)
            raise ValueError(f"fxoffload cannot lock a file in offload_dir {root!r}: {e}") from e
        if _same_file(lock, fd):
            return PrivateDir(path, fd)
        os.close(fd)  # a cleaner locked and removed it between its creation and our lock


def _same_file(path: str, fd: int) -> bool:
    try:
        found = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino)


def distributed_rank() -> int | None:
    """This process's global rank in a torch.distributed job, or None outside one.

    The default process group's rank once it is initialized; before that, the
    ``RANK`` environment variable that torchrun (and most launchers) set, since
    a job may compile, and so create its engine, before ``init_process_group``.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    rank = os.environ.get("RANK", "")
    return int(rank) if re.fullmatch(r"[0-9]+", rank) else None


def remove_stale_dirs(root: str) -> list[str]:
    """Remove private directories in ``root`` whose lock no process holds.

    Only directories named by this module, owned by this user, not symlinks,
    with a lock file that can be locked now. A directory without one is kept:
    it is being made (its lock comes a moment later), or predates locks. Each
    is removed while its lock is held, so its owner, finding it gone once it
    has the lock, makes another. Several processes may clean one ``root`` at
    once (the ranks of a node starting together): a directory another one
    removed first is skipped.
    """
    removed = []
    for name in os.listdir(root):
        if _NAME.fullmatch(name) is None:
            continue
        path = os.path.join(root, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:  # another process removed it since listdir
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        try:
            fd = os.open(os.path.join(path, LOCK_NAME), _OPEN_LOCK)
        except OSError:  # no lock file (yet), or removed since listdir
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held: its owner lives
            os.close(fd)
            continue
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)
        log.info("removed %s, whose owner is gone", path)
        removed.append(path)
    return removed
