"""tools/split_for_device.py: pieces that ``cat`` in name order gives back each file (as
tools/gpu_real_models.sh reassembles them), dealt into call folders that stay under their size."""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
import split_for_device  # noqa: E402

KIB = 1024


def test_pieces_rebuild_each_file_and_calls_stay_under_their_size(tmp_path):
    sizes = {"a.whl": 10 * KIB + 1, "b.whl": 3 * KIB, "c.whl": 4 * KIB, "empty.whl": 0}
    files = []
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(os.urandom(size))
        files.append(tmp_path / name)
    folders = split_for_device.split(files, tmp_path / "out", piece_bytes=4 * KIB, call_bytes=8 * KIB)
    assert [folder.name for folder, _ in folders] == ["call01", "call02", "call03"]  # 17 KiB + 1 byte in 8 KiB calls
    for folder, used in folders:
        assert used == sum(p.stat().st_size for p in folder.iterdir()) <= 8 * KIB
    pieces = sorted((tmp_path / "out").rglob("*.part*"), key=lambda p: p.name)
    for path in files:
        mine = [p for p in pieces if p.name.startswith(path.name + ".part")]
        assert [p.name[-6:] for p in mine] == [f"part{i:02d}" for i in range(len(mine))]
        assert b"".join(p.read_bytes() for p in mine) == path.read_bytes()
    assert len([p for p in pieces if p.name.startswith("a.whl")]) == 3


def test_refuses_a_folder_with_old_pieces_and_a_call_smaller_than_a_piece(tmp_path):
    (tmp_path / "f.whl").write_bytes(b"x" * 100)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "f.whl.part00").write_bytes(b"old")
    with pytest.raises(ValueError, match="not empty"):
        split_for_device.split([tmp_path / "f.whl"], tmp_path / "out", piece_bytes=10)
    with pytest.raises(ValueError, match="at least one piece"):
        split_for_device.split([tmp_path / "f.whl"], tmp_path / "new", piece_bytes=10, call_bytes=5)
    assert split_for_device.main(["--to", str(tmp_path / "out"), str(tmp_path / "f.whl")]) == 2
