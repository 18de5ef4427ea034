"""Dependencies point one way: the passes know graphs, the runtime knows bytes, ops are the seam."""

from __future__ import annotations

import pytest
from subprocess_scripts import run_python

IMPORT_WITH_BLOCKED = """
import importlib.abc, sys

blocked = sys.argv[1]

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == blocked or name.startswith(blocked + "."):
            raise ImportError(f"{name} is blocked")
        return None

sys.meta_path.insert(0, Blocker())
__import__(sys.argv[2])
print(" ".join(sorted(m for m in sys.modules if m.startswith("fxoffload"))))
"""


@pytest.mark.parametrize(
    ("blocked", "imported"),
    [("fxoffload.runtime", "fxoffload.passes"), ("fxoffload.passes", "fxoffload.runtime")],
)
def test_one_side_imports_without_the_other(blocked: str, imported: str) -> None:
    done = run_python(IMPORT_WITH_BLOCKED, blocked, imported)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = done.stdout.split()
    assert imported in loaded and "fxoffload.ops" in loaded
    assert not [m for m in loaded if m == blocked or m.startswith(blocked + ".")]


def test_every_private_torch_api_resolves() -> None:
    """This torch has each of them; a newer one that moved one fails here, by name."""
    from fxoffload import _compat

    for name in _compat.PRIVATE_APIS:
        assert getattr(_compat, name) is not None, name
