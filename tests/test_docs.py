"""The README and docs/ stay true: their ``python -m fxoffload`` commands parse, their
relative links (and the headings those links name) exist, and the README's test
command is the one CI runs."""

from __future__ import annotations

import json
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")

# Runs each command's argv through ``fxoffload.cli.main`` in one fresh interpreter, as
# ``python -m fxoffload`` would, and prints each exit status: one subprocess for all.
DRIVER = """
import contextlib, io, json, sys
from fxoffload.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = main(argv)
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    codes.append([code, out.getvalue()[-2000:]])
print(json.dumps(codes))
"""


def fenced_commands(text: str) -> list[list[str]]:
    """The argv after ``python -m fxoffload`` of every such command in a fenced block.

    Backslash continuations are joined, comments dropped, and leading ``VAR=value``
    environment assignments skipped (``PYTHONPATH=benchmarks python -m fxoffload ...``).
    """
    commands = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue  # not shell: Python or printed output
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                words = words[1:]
            if words[:3] == ["python", "-m", "fxoffload"]:
                commands.append(words[3:])
    return commands


def with_help(argv: list[str]) -> list[str]:
    """``argv`` that parses without running: ``--help`` appended.

    argparse stops at ``--help``: a wrong subcommand, a bad choice or an ill-typed
    value before it still fails, and ``bench NAME ... --help`` reaches the
    benchmark's own parser.
    """
    return [*argv, "--help"]


def parse_exit_codes(commands: list[list[str]]) -> list[tuple[int, str]]:
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps([with_help(argv) for argv in commands])],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return [tuple(item) for item in json.loads(done.stdout.strip().splitlines()[-1])]


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a page's headings (outside fenced blocks)."""
    anchors = set()
    for line in FENCE.sub("", text).splitlines():
        if match := re.match(r"#{1,6} +(.*?) *#*$", line):
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


def dead_links(page: pathlib.Path) -> list[str]:
    text = page.read_text()
    dead = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.is_file():
            dead.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md":
            if anchor not in heading_anchors(linked.read_text()):
                dead.append(f"{target}: no heading #{anchor} in {linked.name}")
    return dead


def test_every_fxoffload_command_in_the_docs_parses() -> None:
    commands = {tuple(argv) for page in PAGES for argv in fenced_commands(page.read_text())}
    assert commands, "no python -m fxoffload command found in README.md or docs/"
    # The README's own CLI example must be among them, or the extraction broke.
    assert any(argv[:1] == ("explain",) for argv in commands)
    ordered = [list(argv) for argv in sorted(commands)]
    results = parse_exit_codes(ordered)
    failures = [
        f"python -m fxoffload {shlex.join(with_help(argv))}: exit {code}\n{out}"
        for argv, (code, out) in zip(ordered, results, strict=True)
        if code != 0
    ]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    "argv",
    [["explian", "mypkg:make"], ["bench", "trian"], ["simulate", "m:f", "--disk", "fast"]],
    ids=["typo-subcommand", "typo-benchmark", "bad-value"],
)
def test_a_broken_command_fails_the_check(argv: list[str]) -> None:
    """The check can fail: a typo'd subcommand or benchmark, or a bad value, exits nonzero."""
    [(code, _)] = parse_exit_codes([argv])
    assert code != 0


def test_commands_are_found_across_continuations_and_environment() -> None:
    text = (
        "```bash\nPYTHONPATH=x python -m fxoffload simulate m:f \\\n    --disk 1.6  # note\n```\n"
        "```python\nprint('python -m fxoffload explain')\n```\n"
    )
    assert fenced_commands(text) == [["simulate", "m:f", "--disk", "1.6"]]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: pathlib.Path) -> None:
    assert not dead_links(page)


def test_a_dead_link_is_found(tmp_path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) [no anchor](page.md#nowhere)\n")
    assert len(dead_links(page)) == 2


def test_readme_test_command_is_what_ci_runs() -> None:
    """``.ci/run`` runs the README's test command verbatim; the two must not drift."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = ci[ci.index("# The README's test command, verbatim:") + 1]
    assert f"```bash\n{command}\n```" in (ROOT / "README.md").read_text()
