"""`bgeserve env snapshot | diff | rollback`: the pure parts, then a real round trip in a throwaway venv."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bgeserve.cli.ops import register
from bgeserve.ops import environment
from bgeserve.ops.environment import Package, Snapshot

# `pip inspect` entries as pip writes them (trimmed to the fields we read).
INSPECT_ENTRIES = [
    {"metadata": {"name": "six", "version": "1.16.0"}},
    {"metadata": {"name": "torch", "version": "2.5.1+cu121"}},
    {
        "metadata": {"name": "bgeserve", "version": "0.1.0"},
        "direct_url": {"url": "file:///work/main", "dir_info": {"editable": True}},
    },
    {
        "metadata": {"name": "mylib", "version": "1.0"},
        "direct_url": {"url": "file:///tmp/wheels/mylib-1.0-py3-none-any.whl", "archive_info": {}},
    },
    {
        "metadata": {"name": "tool", "version": "0.3"},
        "direct_url": {
            "url": "https://github.com/org/tool",
            "vcs_info": {"vcs": "git", "commit_id": "abc123"},
        },
    },
]


def snapshot_of(*packages: Package) -> Snapshot:
    return Snapshot("2025-01-01T00:00:00+00:00", "/venv/bin/python", "3.11.7", {p.key: p for p in packages})


def test_classify_tells_where_each_package_came_from() -> None:
    six, torch, bgeserve, mylib, tool = (environment.classify(e) for e in INSPECT_ENTRIES)
    assert (six.source, six.index_url, six.requirement()) == ("index", None, "six==1.16.0")
    assert torch.index_url == "https://download.pytorch.org/whl/cu121"
    assert torch.requirement() == "torch==2.5.1+cu121"
    assert (bgeserve.source, bgeserve.requirement()) == ("editable", "-e /work/main")
    assert mylib.source == "local"
    assert mylib.requirement() == "mylib @ file:///tmp/wheels/mylib-1.0-py3-none-any.whl"
    assert tool.requirement() == "tool @ git+https://github.com/org/tool@abc123"


def test_requirements_file_keeps_the_pytorch_index_and_reads_back(tmp_path: Path) -> None:
    snapshot = snapshot_of(*(environment.classify(e) for e in INSPECT_ENTRIES))
    snapshot.torch = {
        "installed": True,
        "version": "2.5.1+cu121",
        "cuda": "12.1",
        "cudnn": 90100,
        "arch_list": ["sm_80", "sm_90"],
    }
    text_path, json_path = environment.write_snapshot(snapshot, tmp_path / "backup.txt")
    assert json_path == tmp_path / "backup.json"
    text = text_path.read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cu121" in text
    assert "torch==2.5.1+cu121" in text
    assert "# torch 2.5.1+cu121, CUDA 12.1" in text
    assert text.rstrip().endswith("-e /work/main")  # editables last, after their pins' dependencies
    # Both files describe the same packages.
    from_text = environment.parse_requirements(text)
    from_json = environment.load_snapshot(json_path)
    assert environment.diff(from_json.packages, from_text.packages) == []
    assert from_text.packages["torch"].index_url == "https://download.pytorch.org/whl/cu121"
    assert from_text.packages["bgeserve"].version == "0.1.0"


def test_diff_kinds() -> None:
    before = {
        p.key: p
        for p in [
            Package("six", "1.16.0"),
            Package("idna", "3.7"),
            Package("numpy", "2.1.0"),
            Package("torch", "2.5.1+cu121", index_url="https://download.pytorch.org/whl/cu121"),
            Package("bgeserve", "0.1.0", "editable", "/work/main"),
            Package("gone", "1.0"),
        ]
    }
    after = {
        p.key: p
        for p in [
            Package("six", "1.17.0"),
            Package("idna", "3.7"),
            Package("numpy", "1.26.4"),
            Package("torch", "2.5.1+cu128", index_url="https://download.pytorch.org/whl/cu128"),
            Package("bgeserve", "0.1.0"),
            Package("new_pkg", "0.1"),
        ]
    }
    kinds = {c.name: c.kind for c in environment.diff(before, after)}
    assert kinds == {
        "six": "upgraded",
        "numpy": "downgraded",
        "torch": "changed",  # same version, another CUDA build
        "bgeserve": "changed",  # same version, no longer editable
        "new_pkg": "added",
        "gone": "removed",
    }
    text = environment.render_diff(environment.diff(before, after))
    assert "upgraded    six" in text and "1.16.0 -> 1.17.0" in text
    assert "2.5.1+cu121 (from https://download.pytorch.org/whl/cu121) -> 2.5.1+cu128" in text


def test_rollback_commands_restore_torch_from_its_index() -> None:
    snapshot = snapshot_of(
        Package("six", "1.16.0"),
        Package("torch", "2.5.1+cu121", index_url="https://download.pytorch.org/whl/cu121"),
        Package("bgeserve", "0.1.0", "editable", "/work/main"),
    )
    now = {
        p.key: p
        for p in [
            Package("six", "1.17.0"),
            Package("torch", "2.9.1+cu130", index_url="https://download.pytorch.org/whl/cu130"),
            Package("nvidia-cublas", "13.0.0.19"),
            Package("pip", "25.0"),
            Package("bgeserve", "0.1.0"),
        ]
    }
    changes = environment.diff(snapshot.packages, now)
    commands = environment.rollback_commands("/venv/bin/python", snapshot, changes)
    assert commands[0] == ["/venv/bin/python", "-m", "pip", "uninstall", "-y", "nvidia-cublas"]  # never pip
    install = ["/venv/bin/python", "-m", "pip", "install", "--no-deps", "--force-reinstall"]
    assert [*install, "six==1.16.0"] in commands
    assert [
        *install,
        "--index-url",
        "https://download.pytorch.org/whl/cu121",
        "torch==2.5.1+cu121",
    ] in commands
    assert [*install, "-e", "/work/main"] in commands


def test_nothing_to_roll_back_when_nothing_changed() -> None:
    snapshot = snapshot_of(Package("six", "1.16.0"))
    assert environment.diff(snapshot.packages, dict(snapshot.packages)) == []


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bgeserve")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


def pip(python: Path, *args: str) -> None:
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
        check=True,
        capture_output=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def throwaway_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with two small pure-Python packages from PyPI."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=300)
    python = root / "bin" / "python"
    pip(python, "six==1.16.0", "iniconfig==2.0.0")
    return python


@pytest.mark.slow
def test_snapshot_diff_rollback_round_trip(
    throwaway_venv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    python = str(throwaway_venv)
    backup = tmp_path / "backup.txt"
    assert run_cli(["env", "snapshot", "--python", python, "--out", str(backup)]) == 0
    assert "six==1.16.0" in backup.read_text().splitlines()
    details = json.loads(backup.with_suffix(".json").read_text())
    assert details["torch"]["installed"] is False
    assert {p["name"]: p["source"] for p in details["packages"]}["six"] == "index"
    assert run_cli(["env", "diff", str(backup), "--python", python]) == 0
    assert "No difference" in capsys.readouterr().out

    # The "upgrade": one package up, one new, one gone.
    pip(throwaway_venv, "six==1.17.0", "idna==3.7")
    subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", "iniconfig"], check=True, capture_output=True)

    assert run_cli(["env", "diff", str(backup), "--python", python]) == 1
    out = capsys.readouterr().out
    assert "upgraded    six" in out and "1.16.0 -> 1.17.0" in out
    assert "added       idna" in out
    assert "removed     iniconfig" in out

    assert run_cli(["env", "diff", str(backup), "--python", python, "--json"]) == 1
    kinds = {c["name"]: c["kind"] for c in json.loads(capsys.readouterr().out)}
    assert kinds == {"six": "upgraded", "idna": "added", "iniconfig": "removed"}

    # Without --yes nothing changes.
    assert run_cli(["env", "rollback", str(backup), "--python", python]) == 0
    out = capsys.readouterr().out
    assert "pip uninstall -y idna" in out
    assert "six==1.16.0" in out and "iniconfig==2.0.0" in out
    assert "Dry run" in out
    assert run_cli(["env", "diff", str(backup), "--python", python]) == 1
    capsys.readouterr()

    assert run_cli(["env", "rollback", str(backup), "--yes", "--python", python]) == 0
    assert "Restored: the environment matches the snapshot" in capsys.readouterr().out
    assert run_cli(["env", "diff", str(backup.with_suffix(".json")), "--python", python]) == 0
    assert run_cli(["env", "rollback", str(backup), "--python", python]) == 0
    assert "Nothing to roll back" in capsys.readouterr().out


@pytest.mark.slow
def test_rollback_reports_what_it_could_not_restore(
    throwaway_venv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    python = str(throwaway_venv)
    backup = tmp_path / "backup.txt"
    assert run_cli(["env", "snapshot", "--python", python, "--out", str(backup)]) == 0
    # A snapshot pinning a version that does not exist cannot be restored: say so, exit 1.
    details = json.loads(backup.with_suffix(".json").read_text())
    for package in details["packages"]:
        if package["name"] == "six":
            package["version"] = "0.0.0.1"
    backup.with_suffix(".json").write_text(json.dumps(details))
    assert run_cli(["env", "rollback", str(backup), "--yes", "--python", python]) == 1
    captured = capsys.readouterr()
    assert "Still different from the snapshot" in captured.out
    assert "six" in captured.out
    assert "failed:" in captured.err
