"""Damaged checkpoints: a file cut short, unreadable or overwritten in place is found, named in one line, and skipped by
`latest` (which never starts over when none loads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import save_small_checkpoint

from tcdistill.checkpoint import CheckpointError, CheckpointIO, _crc32


def _corrupt_same_size(path: Path) -> None:
    """Overwrite the safetensors header length: unreadable, same size, so the COMPLETE marker still matches."""
    data = bytearray(path.read_bytes())
    data[:8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def test_load_latest_skips_an_unreadable_newest_checkpoint(tmp_path: Path) -> None:
    io = CheckpointIO(tmp_path)
    for step in (1, 2):
        save_small_checkpoint(io, step)
    _corrupt_same_size(tmp_path / "checkpoint-2" / "model.safetensors")
    assert io.latest() == tmp_path / "checkpoint-2"  # the sizes match: only loading finds out
    ck = io.load_latest()
    assert ck.step == 1 and torch.equal(ck.tensors["model"]["w"], torch.full((4, 4), 1.0))
    assert io.load_resume("latest").step == 1  # what --resume_from_checkpoint=latest calls
    _corrupt_same_size(tmp_path / "checkpoint-1" / "model.safetensors")
    with pytest.raises(CheckpointError, match="checkpoint-2"):  # none loads: the newest one's error, not a fresh start
        io.load_latest()


def test_load_latest_warns_about_a_damaged_newest_checkpoint_and_never_starts_over(tmp_path: Path,
                                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """QA: a newest checkpoint with a file cut short or deleted was skipped without a word (unlike an unreadable one),
    and when every checkpoint was damaged `latest` started a new run that overwrote them step by step."""
    io = CheckpointIO(tmp_path)
    for step in (1, 2):
        save_small_checkpoint(io, step)
    with open(tmp_path / "checkpoint-2" / "counters.pt", "r+b") as f:
        f.truncate(10)
    with caplog.at_level("WARNING", logger="tcdistill.checkpoint"):
        assert io.load_latest().step == 1
    assert "checkpoint-2" in caplog.text and "counters.pt is missing or has the wrong size" in caplog.text
    (tmp_path / "checkpoint-1" / "model.safetensors").unlink()
    (tmp_path / "checkpoint-3").mkdir()  # an empty folder (a copy that never arrived)
    with pytest.raises(CheckpointError, match=r"checkpoint-3.*no valid COMPLETE marker.*remove or repair them"):
        io.load_latest()
    assert io.load_resume(None) is None and CheckpointIO(tmp_path / "new").load_latest() is None  # no checkpoints: fresh


def test_an_unreadable_state_file_is_named_in_one_line(tmp_path: Path) -> None:
    """QA: a damaged optimizer.pt ended the run with `error: Check the documentation of torch.load ...`, the last line
    of torch's message: neither the checkpoint nor the file was named. (A checkpoint of an earlier version, whose marker
    holds no checksums, so that torch's own error is what is met.)"""
    io = CheckpointIO(tmp_path)
    path = save_small_checkpoint(io, 1)
    marker = json.loads((path / "COMPLETE").read_text())
    (path / "COMPLETE").write_text(json.dumps({"step": marker["step"], "files": marker["files"]}))
    size = (path / "counters.pt").stat().st_size
    (path / "counters.pt").write_bytes((b"{garbage" * size)[:size])  # same size: only loading finds out
    with pytest.raises(CheckpointError) as info:
        io.load(path)
    message = str(info.value)
    assert "\n" not in message and "counters.pt is unreadable" in message and "checkpoint-1" in message, message
    assert "weights_only` set to `False`" not in message, message  # torch's advice to load the file unsafely is left out


def test_a_finite_value_overwritten_in_a_checkpoint_is_found_by_its_checksum(tmp_path: Path,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    """QA: COMPLETE recorded sizes only, so a weight overwritten in place by another finite value (same size, a valid
    safetensors file) resumed silently. Each file's CRC-32 is now saved and checked at load; `latest` skips such a
    checkpoint with a warning, as it skips a damaged one."""
    io = CheckpointIO(tmp_path)
    for step in (1, 2):
        save_small_checkpoint(io, step)
    file = tmp_path / "checkpoint-2" / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-4:] = np.float32(7.0).tobytes()  # the last element of "w": 2.0 -> 7.0
    file.write_bytes(bytes(data))
    assert safetensors.torch.load_file(file)["w"].flatten()[-1] == 7.0  # still a valid, finite file
    with pytest.raises(CheckpointError) as info:
        io.load(tmp_path / "checkpoint-2")
    message = str(info.value)
    assert "model.safetensors changed after the save" in message and "\n" not in message
    assert message.count("cannot load checkpoint") == 1 and "unreadable" not in message, message  # not re-wrapped
    with caplog.at_level("WARNING", logger="tcdistill.checkpoint"):
        ck = io.load_latest()
    assert ck.step == 1 and torch.equal(ck.tensors["model"]["w"], torch.full((4, 4), 1.0))
    assert "checkpoint-2" in caplog.text and "CRC-32" in caplog.text


@pytest.mark.parametrize("size", [0, 1, 20, 21, 100])
def test_the_checksum_covers_every_chunk_of_a_file(tmp_path: Path, size: int) -> None:
    """Mutation testing: a checkpoint file is read in 16 MiB chunks, so every saved test file fits one chunk and a CRC
    of the first or last chunk only (or of a stale buffer tail) passed. With 7-byte chunks it is the whole file's."""
    import zlib

    data = bytes(range(256))[:size]
    (tmp_path / "f").write_bytes(data)
    assert _crc32(tmp_path / "f", chunk=7) == _crc32(tmp_path / "f") == zlib.crc32(data)
