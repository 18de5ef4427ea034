"""Bad options fail at compile time with a ValueError that names the problem."""

from __future__ import annotations

import tempfile

import pytest
import torch

from fxoffload import Options


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


def test_defaults(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("FXOFFLOAD_DIR", str(tmp_path))
    options = Options.from_dict(None)
    assert options.offload_dir == str(tmp_path)
    assert (options.policy, options.min_bytes, options.compiler) == (
        "adaptive",
        1 << 20,
        "inductor",
    )
    assert Options.from_dict({"offload_dir": None}).offload_dir == str(tmp_path)
    monkeypatch.delenv("FXOFFLOAD_DIR")
    assert Options().offload_dir == tempfile.gettempdir()
    assert Options.from_dict({"offload_dir": None}).offload_dir == tempfile.gettempdir()
