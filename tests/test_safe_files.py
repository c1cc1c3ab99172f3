"""Atomic writes that never follow a planted symlink."""

import os

import pytest

from engine.safe_files import open_exclusive, replacing, write_text_atomic


def test_a_symlink_at_the_target_is_replaced_not_written_through(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    target = tmp_path / "run" / "config.toml"
    target.parent.mkdir()
    target.symlink_to(outside)
    write_text_atomic(target, "new")
    assert outside.read_text() == "precious"
    assert not target.is_symlink() and target.read_text() == "new"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.jsonl"
    target.write_text("history\n")
    with pytest.raises(RuntimeError), replacing(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed")
    assert target.read_text() == "history\n" and os.listdir(tmp_path) == ["metrics.jsonl"]


def test_exclusive_creation_refuses_an_existing_name_even_a_dangling_symlink(tmp_path):
    (tmp_path / "planted").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):
        open_exclusive(tmp_path / "planted")
    assert not (tmp_path / "nowhere").exists()
