"""The README's quick starts run as written: each ```python block after a
``<!-- quickstart: NAME [torchrun=N] -->`` marker is written to a file and run (with torchrun
when the marker says so), and its printed output is checked."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
MARKER = re.compile(r"<!-- quickstart: (\S+)( torchrun=(\d+))? -->\n```python\n(.*?)```", re.S)
EXPECT = {
    "client-server": ["{'step': 1, 'grad': tensor([1., 1., 1.])}"],
    "tree": ["[tensor([3., 3., 3., 3.]), tensor([3., 3., 3., 3.])]"],
    "map": ["tensor([0]) tensor([0, 1]) tensor([0, 1, 2])"],
    "workqueue": ["[4.0, 9.0]"],
    "backend": ["0 tensor([3., 3., 3., 3.])", "1 tensor([3., 3., 3., 3.])"],
}


def quickstarts() -> dict[str, tuple[int, str]]:
    found = {m[1]: (int(m[3] or 0), m[4]) for m in MARKER.finditer(README.read_text())}
    return found


def test_the_readme_has_a_quick_start_for_every_primitive_and_two_setup_commands() -> None:
    assert set(quickstarts()) == set(EXPECT)
    text = README.read_text()
    setup = text[text.index("## Set-up commands") :]
    block = setup[setup.index("```bash") + 7 : setup.index("```", setup.index("```bash") + 7)]
    commands = [ln for ln in block.splitlines() if ln.strip()]
    assert len(commands) == 2 and text.count("```bash") == 1, commands


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_readme_quick_start_runs_as_written(name: str, tmp_path: pathlib.Path) -> None:
    nproc, code = quickstarts()[name]
    script = tmp_path / f"{name}.py"
    script.write_text(code)
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
        # --tee: torchrun relays each rank's output with its prefix ("[default0]:..."), a chunk at
        # a time as it arrives: a line of one rank can be cut by another's (see by_rank).
        cmd += ["--tee", "3"]
        cmd.append(str(script))
    else:
        cmd = [sys.executable, str(script)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    out = "\n".join(by_rank(p.stdout).values()) if nproc else p.stdout
    for line in EXPECT[name]:
        assert line in out, (line, p.stdout, p.stderr)


def by_rank(relayed: str) -> dict[int, str]:
    """Each rank's own output from torchrun's --tee relay, which prefixes every chunk it relays
    with "[defaultN]:" (so "[default0]:0 [default1]:1 x\n[default0]:x\n" is rank 0's "0 x\n"
    and rank 1's "1 x\n")."""
    streams: dict[int, str] = {}
    parts = re.split(r"\[default(\d+)\]:", relayed)
    for rank, text in zip(parts[1::2], parts[2::2], strict=True):
        streams[int(rank)] = streams.get(int(rank), "") + text
    return streams


def test_by_rank_joins_a_line_cut_by_another_ranks_chunk() -> None:
    relayed = "[default0]:0 [default1]:1 tensor([3.])\n[default0]:tensor([3.])\n"
    assert by_rank(relayed) == {0: "0 tensor([3.])\n", 1: "1 tensor([3.])\n"}


TUTORIAL = README.parent / "docs" / "tutorial.md"
TUTORIAL_BLOCK = re.compile(r"<!-- tutorial: (\S+) -->\n```python\n(.*?)```", re.S)
TUTORIAL_STEPS = ["first-all-reduce", "parameter-server", "map", "workqueue-training"]


def test_the_tutorial_has_its_runnable_steps() -> None:
    assert [m[1] for m in TUTORIAL_BLOCK.finditer(TUTORIAL.read_text())] == TUTORIAL_STEPS


@pytest.mark.parametrize("name", TUTORIAL_STEPS)
def test_tutorial_step_runs_as_written(name: str, tmp_path: pathlib.Path) -> None:
    code = {m[1]: m[2] for m in TUTORIAL_BLOCK.finditer(TUTORIAL.read_text())}[name]
    script = tmp_path / f"{name.replace('-', '_')}.py"
    script.write_text(code)
    p = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=180, cwd=tmp_path
    )
    assert p.returncode == 0, p.stdout + p.stderr


OUTSIDE = re.compile(
    r"\.\./shared|/work/|(?<![\w/])shared/|DESIGN\.md|STYLE\.md|research/|performance-anchors|HELPERS\.md"
)


def test_no_doc_mentions_paths_outside_the_repository_or_internal_design_files() -> None:
    docs = [README, *sorted((README.parent / "docs").glob("*.md"))]
    found = [
        f"{path.name}:{n}: {m.group(0)}"
        for path in docs
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        for m in [OUTSIDE.search(line)]
        if m
    ]
    assert not found, found
