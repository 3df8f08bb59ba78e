"""Cache entries are built aside and renamed in: complete or absent, never half; keys follow the sources."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from bgeserve.cache_files import build_then_rename, exclusive_build, remove_other_keys, stamp_key


def _write(files: dict[str, str]):
    def build(staging: Path) -> None:
        for name, text in files.items():
            (staging / name).write_text(text, encoding="utf-8")

    return build


def test_built_once_then_reused(tmp_path):
    calls: list[Path] = []

    def build(staging: Path) -> None:
        calls.append(staging)
        _write({"model.onnx": "graph", "model.onnx.data": "weights"})(staging)

    target = tmp_path / "cache" / "key1-fp32"
    assert build_then_rename(target, build, "model.onnx") == target
    assert build_then_rename(target, build, "model.onnx") == target
    assert len(calls) == 1 and (target / "model.onnx.data").read_text(encoding="utf-8") == "weights"
    assert sorted(p.name for p in target.parent.iterdir()) == ["key1-fp32"], "no staging directory is left"


def test_a_failed_build_leaves_nothing(tmp_path):
    def build(staging: Path) -> None:
        (staging / "model.onnx.data").write_text("half", encoding="utf-8")
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        build_then_rename(tmp_path / "key1-fp32", build, "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_the_first_rename_wins_and_the_second_builder_uses_it(tmp_path):
    target = tmp_path / "key1-fp32"

    def racing(staging: Path) -> None:
        # Another process finishes its build while this one is still writing.
        build_then_rename(target, _write({"model.onnx": "theirs"}), "model.onnx")
        (staging / "model.onnx").write_text("ours", encoding="utf-8")

    assert build_then_rename(target, racing, "model.onnx") == target
    assert (target / "model.onnx").read_text(encoding="utf-8") == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["key1-fp32"]


def test_an_entry_without_its_marker_is_replaced(tmp_path):
    target = tmp_path / "key1-fp32"
    target.mkdir()
    (target / "model.onnx.data").write_text("what a cut-short removal left", encoding="utf-8")
    build_then_rename(target, _write({"model.onnx": "new"}), "model.onnx")
    assert sorted(p.name for p in target.iterdir()) == ["model.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["key1-fp32"]


def test_modes_follow_the_umask_and_links_are_left_alone(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("not the cache's", encoding="utf-8")
    outside.chmod(0o600)

    def build(staging: Path) -> None:
        (staging / "sub").mkdir()
        (staging / "sub" / "model.onnx").write_text("graph", encoding="utf-8")
        (staging / "link").symlink_to(outside)

    old = os.umask(0o027)
    try:
        target = build_then_rename(tmp_path / "cache" / "key1-fp32", build, "sub/model.onnx")
    finally:
        os.umask(old)
    assert (target.stat().st_mode & 0o777, (target / "sub").stat().st_mode & 0o777) == (0o750, 0o750)
    assert (target / "sub" / "model.onnx").stat().st_mode & 0o777 == 0o640
    assert outside.stat().st_mode & 0o777 == 0o600


def test_older_keys_of_the_same_entry_go_and_nothing_else(tmp_path):
    key, old_key = "a" * 20, "b" * 20
    for name in (f"{key}-int8s8", f"{old_key}-int8s8", f"{old_key}-fp32", f".{key}-int8s8.staging", "other-int8s8"):
        (tmp_path / name).mkdir()
    remove_other_keys(tmp_path / f"{key}-int8s8", key)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".{key}-int8s8.staging", f"{key}-int8s8", f"{old_key}-fp32", "other-int8s8"
    ]


def test_the_key_follows_every_source_file_and_part(tmp_path):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"1234")
    key = stamp_key([weights], ["torch 2.13"])
    assert key == stamp_key([weights], ["torch 2.13"]) and len(key) == 20
    assert stamp_key([weights], ["torch 2.14"]) != key
    weights.write_bytes(b"12345")  # size
    assert stamp_key([weights], ["torch 2.13"]) != key
    key = stamp_key([weights], ["torch 2.13"])
    stamp = weights.stat().st_mtime_ns + 1_000_000_000
    os.utime(weights, ns=(time.time_ns(), stamp))  # mtime only: same name and size
    assert stamp_key([weights], ["torch 2.13"]) != key


def test_builders_of_one_entry_wait_for_each_other_and_build_it_once(tmp_path):
    import threading

    target = tmp_path / "key1-fp32"
    builds: list[int] = []

    def build(staging: Path) -> None:
        builds.append(1)
        time.sleep(0.2)  # a second builder arriving meanwhile must wait, not start its own build
        (staging / "model.pt2").write_text("built", encoding="utf-8")

    def load() -> None:
        with exclusive_build(target):
            if not (target / "model.pt2").exists():
                build_then_rename(target, build, "model.pt2")

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert builds == [1]
    assert (target / "model.pt2").read_text(encoding="utf-8") == "built"
