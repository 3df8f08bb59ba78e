"""The "Upgrading torch / CUDA" walkthrough: it exists and every bgeserve command in it parses."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from bgeserve.cli.ops import register

REPO = Path(__file__).resolve().parents[2]


def operate_text() -> str:
    """The README, which holds the upgrade walkthrough."""
    return (REPO / "README.md").read_text(encoding="utf-8")


def ops_commands(text: str) -> list[list[str]]:
    """`bgeserve doctor ...` and `bgeserve env ...` lines inside the walkthrough's code blocks."""
    section = text[text.index("## Upgrading torch / CUDA") :]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            line = re.sub(r"^(\w+=\S+\s+)+", "", line)  # DEVICE=cuda:0 bgeserve ...
            if line.startswith(("bgeserve doctor", "bgeserve env")):
                commands.append(shlex.split(line)[1:])
    return commands


def test_walkthrough_covers_the_whole_upgrade_path() -> None:
    text = operate_text()
    for heading in ("## Upgrading torch / CUDA", "## Running the GPU check"):
        assert heading in text
    section = text[text.index("## Upgrading torch / CUDA") : text.index("## Running the GPU check")]
    order = [
        "bgeserve env snapshot",
        "bgeserve doctor",
        "--index-url https://download.pytorch.org/whl/cu128",
        "doctor --model",
        "bgeserve bench",
        "bgeserve env rollback",
    ]
    positions = [section.index(step) for step in order]
    assert positions == sorted(positions), "the walkthrough's steps are out of order"
    assert "scripts/gpu_check.sh" in text


@pytest.mark.parametrize("argv", ops_commands(operate_text()), ids=" ".join)
def test_every_documented_command_parses(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bgeserve", exit_on_error=False)
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    assert callable(args.func)
