"""The engine's private directory under ``offload_dir``, and cleanup of crashed ones."""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import tempfile

import torch.distributed as dist

log = logging.getLogger(__name__)

_NAME = re.compile(r"fxoffload-(?:rank\d+-)?(\d+)-\w+")
"""``fxoffload-<pid>-XXXX`` or, in a distributed job, ``fxoffload-rank<R>-<pid>-XXXX``."""


def make_private_dir(root: str) -> str:
    """Create ``root/fxoffload-[rank<R>-]<pid>-<random>`` with mode 0700 and return its path.

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
    try:
        path = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root)
    except OSError as e:
        raise ValueError(f"fxoffload cannot create a directory in {root!r}: {e}") from e
    os.chmod(path, stat.S_IRWXU)
    return path


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


def remove_private_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def remove_stale_dirs(root: str) -> list[str]:
    """Remove private directories in ``root`` left by processes of ours that are gone.

    Only directories named by this module, owned by this user, not symlinks,
    whose pid no longer runs. A live process's directory is never touched
    (a reused pid errs on the side of keeping). Several processes may clean
    one ``root`` at once (the ranks of a node starting together): a directory
    another one removed first is skipped.
    """
    removed = []
    for name in os.listdir(root):
        match = _NAME.fullmatch(name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        path = os.path.join(root, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:  # another process removed it since listdir
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s, left by process %s which is gone", path, match.group(1))
        removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
