"""Bad options fail at compile time with a ValueError that names the problem."""

from __future__ import annotations

import pathlib
import re
import tempfile

import pytest
import torch
from subprocess_scripts import run_python

from fxoffload import Options, config
from fxoffload.options import OPTION_NAMES
from fxoffload.runtime import EngineConfig

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def compile_and_run(options: dict) -> None:
    torch._dynamo.reset()
    model = torch.compile(torch.nn.Linear(4, 4), backend="ssdtrain", options=options)
    model(torch.randn(2, 4)).sum().backward()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"polcy": "all"}, "unknown fxoffload option 'polcy'; valid options are: offload_dir"),
        ({"policy": "some"}, "'policy' must be one of 'adaptive', 'all', 'none'; got 'some'"),
        ({"io_safety": 0.5}, "'io_safety' must be a number >= 1.0; got 0.5"),
        ({"prefetch_budget_bytes": -1}, "'prefetch_budget_bytes' must be an integer >= 0; got -1"),
        ({"read_bytes_per_s": 0}, "'read_bytes_per_s' must be a number > 0.0; got 0"),
        ({"flops_per_s": float("nan")}, "'flops_per_s' must be a number > 0.0; got nan"),
        ({"compiler": "eager"}, "'compiler' must be one of 'inductor', 'aot_eager'"),
        ({"cost_model": "kernels"}, "'cost_model' must be one of 'flops', 'profile'"),
        ({"min_bytes": -1}, "'min_bytes' must be an integer >= 0; got -1"),
        ({"min_bytes": "1MB"}, "'min_bytes' must be an integer >= 0; got '1MB'"),
        ({"io_threads": 0}, "'io_threads' must be an integer >= 1; got 0"),
        ({"offload_dir": ""}, "'offload_dir' must be a non-empty path"),
        ({"chunk_bytes": 5000}, "'chunk_bytes' must be a multiple of 4096; got 5000"),
        ({"max_inflight_bytes": 0}, "'max_inflight_bytes' must be an integer >= 1; got 0"),
        ({"io_mode": "odirect"}, "'io_mode' must be one of 'auto', 'direct', 'buffered'"),
    ],
)
def test_bad_option_raises_value_error(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Options.from_dict(options)
    # The same error reaches the user through torch.compile, at the first call.
    with pytest.raises(Exception, match="fxoffload option"):
        compile_and_run({**options, "compiler": options.get("compiler", "aot_eager")})


def test_unusable_offload_dir_fails_at_compile_time(tmp_path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(Exception, match=f"offload_dir '{missing}' does not exist"):
        compile_and_run({"offload_dir": str(missing), "compiler": "aot_eager"})
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(Exception, match="is not a directory"):
        compile_and_run({"offload_dir": str(a_file), "compiler": "aot_eager"})


def test_defaults() -> None:
    options = Options.from_dict(None)
    assert (options.policy, options.min_bytes, options.compiler) == (
        "adaptive",
        1 << 20,
        "inductor",
    )


OFFLOAD_DIR_DEFAULTS = """
from fxoffload import Options
print(Options().offload_dir, Options.from_dict({"offload_dir": None}).offload_dir)
"""


def test_offload_dir_is_fxoffload_dir_else_the_temp_dir(monkeypatch, tmp_path) -> None:
    """``FXOFFLOAD_DIR`` goes through the config module's environment support, read at import."""
    assert (
        run_python(OFFLOAD_DIR_DEFAULTS, FXOFFLOAD_DIR=str(tmp_path)).stdout.split()
        == [str(tmp_path)] * 2
    )
    monkeypatch.delenv("FXOFFLOAD_DIR", raising=False)
    assert run_python(OFFLOAD_DIR_DEFAULTS).stdout.split() == [tempfile.gettempdir()] * 2


def test_engine_config_checks_its_values_as_options_do() -> None:
    with pytest.raises(ValueError, match="'chunk_bytes' must be a multiple of 4096; got 5000"):
        EngineConfig(chunk_bytes=5000)


def readme_options_table() -> dict[str, str]:
    """The README's options table: each option's name and its default, as written."""
    section = README.read_text().split("\n## Options\n")[1].split("\n## ")[0]
    table = {}
    for names, default in re.findall(r"^\| ([^|]+) \| ([^|]+) \|", section, re.M):
        for name in re.findall(r"`(\w+)`", names):
            table[name] = default.strip()
    return table


def as_readme_writes_it(name: str, value: object) -> str:
    if name == "offload_dir":
        return "`$FXOFFLOAD_DIR`, else the system temp dir"
    if value is None:
        return "measured"
    return f'`"{value}"`' if isinstance(value, str) else f"`{value}`"


def test_readme_lists_every_option_with_its_default() -> None:
    defaults = {name: getattr(config, name) for name in OPTION_NAMES}
    assert readme_options_table() == {
        name: as_readme_writes_it(name, value) for name, value in defaults.items()
    }
