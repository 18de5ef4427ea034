"""The disk side of the engine: its private directory and whole-file I/O.

Everything here moves raw bytes between a dense CPU tensor and a file; there
is no serialisation format (and no pickle): the engine keeps shape, strides and
dtype itself and the file holds exactly ``nbytes`` bytes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import tempfile

import torch

_OPEN_FLAGS = os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


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


def _buffer(t: torch.Tensor) -> memoryview:
    """A writable byte view of a dense CPU tensor's memory, without a copy."""
    nbytes = t.numel() * t.element_size()
    array = (ctypes.c_char * nbytes).from_address(t.data_ptr())
    return memoryview(array).cast("B")


def write_file(path: str, t: torch.Tensor) -> int:
    """Write the bytes of dense CPU tensor ``t`` to a new file at ``path``.

    The file must not exist (``O_EXCL``) and is never followed through a
    symlink. On failure the partial file is removed before the error goes on.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600)
    try:
        data = _buffer(t)
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return done


def read_file(path: str, out: torch.Tensor) -> int:
    """Fill dense CPU tensor ``out`` from ``path``, which must hold exactly its bytes."""
    fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    try:
        size = os.fstat(fd).st_size
        data = _buffer(out)
        if size != len(data):
            raise OSError(
                errno.EIO,
                f"offload file holds {size} bytes, expected {len(data)}: "
                "it was changed after it was written",
                path,
            )
        done = 0
        while done < len(data):
            got = os.readv(fd, [data[done:]])
            if got == 0:
                raise OSError(errno.EIO, "offload file ended early", path)
            done += got
    finally:
        os.close(fd)
    return done
