"""The runtime's locks, and finalizers that cannot deadlock on them.

An entry is released when its handle dies, and a read buffer goes back to the
pool when the restored tensor dies, both by finalizers. When the tensor was
only reachable from a reference cycle, the garbage collector runs the
finalizer in whichever thread allocated, at any allocation: also while that
thread holds one of the runtime's locks. A finalizer that then took the same
(non-reentrant) lock would wait for itself forever.

So the locks that a finalizer's work takes are ``RuntimeLock``\\ s, which count
how many of them the current thread holds, and finalizers go through
``when_unlocked``: the work runs at once in a thread that holds none, and
otherwise as soon as that thread lets go of the last one.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

_thread = threading.local()


class RuntimeLock:
    """A non-reentrant lock that ``when_unlocked`` knows of; ``threading.Condition`` takes it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        _thread.held = getattr(_thread, "held", 0) + 1  # before: a finalizer now is deferred
        if self._lock.acquire(blocking, timeout):
            return True
        _let_go()
        return False

    def release(self) -> None:
        self._lock.release()
        _let_go()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def when_unlocked(fn: Callable[..., object], *args: object, **kwargs: object) -> None:
    """Run ``fn`` now, or, if this thread holds a ``RuntimeLock``, once it holds none."""
    if getattr(_thread, "held", 0):
        _thread.__dict__.setdefault("deferred", []).append((fn, args, kwargs))
    else:
        fn(*args, **kwargs)


def _let_go() -> None:
    _thread.held -= 1
    if _thread.held:
        return
    deferred = getattr(_thread, "deferred", None)
    while deferred:
        fn, args, kwargs = deferred.pop(0)
        try:
            fn(*args, **kwargs)
        except Exception:  # a finalizer's error is reported, never raised into the lock's user
            sys.excepthook(*sys.exc_info())
