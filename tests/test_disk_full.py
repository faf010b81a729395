"""A full disk while checkpointing: one-line error, no temporary directory left, the last good checkpoint kept."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_cli

import smdm.checkpoint
from smdm.checkpoint import load_checkpoint

TRAIN = ("--model", "tiny-test", "--seq-len", "32", "--batch-size", "2", "--no-progress", "--threads", "1",
         "--eval-blocks", "2", "--eval-mc-samples", "1", "--save-every", "2", "--eval-every", "100")


def _error_line(err: str) -> str:
    """stderr without the validation line the run prints at its last step, before the final checkpoint."""
    return "\n".join(line for line in err.splitlines() if not line.startswith("step "))


def _assert_last_good_checkpoint_kept(run: Path, step: int) -> None:
    assert not [p.name for p in run.iterdir() if p.name.startswith(".checkpoint.")]  # no .checkpoint.tmp-PID/
    checkpoint = load_checkpoint(run, with_train_state=True)  # verifies the weights' sha256
    assert checkpoint.meta["step"] == step and checkpoint.train_state["step"] == step


def test_torch_write_failure_is_one_line_and_keeps_the_last_checkpoint(toy_data, tmp_path, capsys, monkeypatch):
    real_save, calls = torch.save, []

    def save_until_disk_fills(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: what torch raises when its zip writer hits ENOSPC
            Path(path).write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(smdm.checkpoint.torch, "save", save_until_disk_fills)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", str(toy_data), "--out", str(run), "--max-steps", "4", *TRAIN)
    assert_one_line_error(code, _error_line(err), "could not save checkpoint", "unexpected pos",
                          "previous checkpoint is intact")
    assert len(calls) == 2
    _assert_last_good_checkpoint_kept(run, 2)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real tmpfs of a given size (root only: skipped where mounting is not allowed)."""
    mounts = []

    def mount(size_kib: int) -> Path:
        point = tmp_path / f"tmpfs{len(mounts)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(point)],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not root'})")
        mounts.append(point)
        return point

    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    yield mount
    for point in mounts:
        # lazy: a file object still referenced by a failed test's traceback must not keep the mount alive
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_real_full_disk(toy_data, tmp_path, capsys, small_tmpfs):
    probe = tmp_path / "probe"  # how much one checkpoint and the run's other files take
    code, _, err = run_cli(capsys, "train", "--data", str(toy_data), "--out", str(probe), "--max-steps", "2", *TRAIN)
    assert code == 0, err
    size = sum(p.stat().st_size for p in probe.rglob("*") if p.is_file())
    # Room for the run and one checkpoint, not for the second one written beside it before the swap.
    disk = small_tmpfs(int(size * 1.5) // 1024)
    run = disk / "run"
    code, _, err = run_cli(capsys, "train", "--data", str(toy_data), "--out", str(run), "--max-steps", "4", *TRAIN)
    assert_one_line_error(code, _error_line(err), "could not save checkpoint", "previous checkpoint is intact")
    _assert_last_good_checkpoint_kept(run, 2)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4  # it died at the step-4 checkpoint, not before
