"""The engine's private directory under ``offload_dir``."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile


def make_private_dir(root: str) -> str:
    """Create ``root/fxoffload-<pid>-<random>`` with mode 0700 and return its path.

    The pid in the name lets an operator see which process owns a directory;
    the random suffix keeps two processes (or two engines) apart.
    """
    if not os.path.exists(root):
        raise ValueError(f"fxoffload offload_dir {root!r} does not exist")
    if not os.path.isdir(root):
        raise ValueError(f"fxoffload offload_dir {root!r} is not a directory")
    if not os.access(root, os.W_OK | os.X_OK):
        raise ValueError(f"fxoffload offload_dir {root!r} is not writable by this process")
    try:
        path = tempfile.mkdtemp(prefix=f"fxoffload-{os.getpid()}-", dir=root)
    except OSError as e:
        raise ValueError(f"fxoffload cannot create a directory in {root!r}: {e}") from e
    os.chmod(path, stat.S_IRWXU)
    return path


def remove_private_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
