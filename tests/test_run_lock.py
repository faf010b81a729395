"""The run-directory lock: one training per run directory, the second one stops before it touches anything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, TOY_TEXT, assert_one_line_error, run_cli

from smdm.checkpoint import RUN_LOCK_FILE, lock_run_dir
from smdm.errors import SmdmError

TRAIN = ("--model", "tiny-test", "--seq-len", "32", "--batch-size", "2", "--no-progress", "--threads", "1",
         "--eval-blocks", "2", "--eval-mc-samples", "1")

# Holds the lock of argv[1] in another process until its stdin closes, printing when it holds it.
HOLDER = ("import sys\nfrom smdm.checkpoint import lock_run_dir\n"
          "with lock_run_dir(sys.argv[1]):\n    print('locked', flush=True)\n    sys.stdin.read()\n")


def _snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under root with its size, mtime and content: what 'touches nothing' compares."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _release(holder: subprocess.Popen) -> None:
    holder.stdin.close()
    assert holder.wait(timeout=60) == 0


def _smdm(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "smdm", *argv], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=300, check=False)


def _assert_refused(result: subprocess.CompletedProcess, pid: int) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("smdm: error: ") and f"pid {pid}" in lines[0], result.stderr


def test_second_train_into_a_locked_run_touches_nothing(toy_data, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", str(toy_data), "--out", str(run), "--max-steps", "2", *TRAIN)
    assert code == 0, err
    holder = _hold_lock(run)
    before = _snapshot(run)
    try:
        for extra in ((), ("--resume",)):
            result = _smdm("train", "--data", str(toy_data), "--out", str(run), "--max-steps", "4", *TRAIN, *extra)
            _assert_refused(result, holder.pid)
            assert _snapshot(run) == before  # no metrics rows, no train_config.json, no checkpoint
    finally:
        _release(holder)
    # Released: the same command now resumes and finishes the run.
    result = _smdm("train", "--data", str(toy_data), "--out", str(run), "--max-steps", "4", *TRAIN, "--resume")
    assert result.returncode == 0, result.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 2, 4, 4]  # (train, validation) rows of the first run and of the resumed one, none twice
    assert json.loads((run / "checkpoint" / "config.json").read_text())["step"] == 4


def test_second_sft_into_a_locked_run_touches_nothing(toy_data, tmp_path):
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"prompt": t[:10], "response": t[10:]}) + "\n"
                                                  for t in TOY_TEXT[:5]))
    run = tmp_path / "sft"
    run.mkdir()
    (run / "keep.txt").write_text("a file of an earlier run")
    holder = _hold_lock(run)
    before = _snapshot(run)
    try:
        result = _smdm("sft", "--data", str(tmp_path / "pairs.jsonl"), "--tokenizer",
                       str(toy_data.parent / "tokenizer.json"), "--out", str(run), "--max-steps", "1", *TRAIN[:2],
                       *TRAIN[6:])
        _assert_refused(result, holder.pid)
        assert _snapshot(run) == before and not (run / "data").exists()
    finally:
        _release(holder)


def test_lock_is_exclusive_across_processes_and_freed_by_a_kill(tmp_path):
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        assert (run / RUN_LOCK_FILE).read_text().strip() == str(holder.pid)
        with pytest.raises(SmdmError, match=f"in use by pid {holder.pid}"), lock_run_dir(run):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    for _ in range(100):  # the kernel drops a killed holder's flock as it tears the process down
        try:
            with lock_run_dir(run):
                assert (run / RUN_LOCK_FILE).read_text().strip() == str(os.getpid())
            break
        except SmdmError:
            time.sleep(0.05)
    else:
        pytest.fail("the lock outlived its killed holder")


def test_failed_start_removes_the_run_directory_it_created(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"),
                           "--max-steps", "1")
    assert_one_line_error(code, err, "prepare")
    assert not (tmp_path / "run").exists()


def test_a_lock_file_that_cannot_be_opened_is_one_line(tmp_path, capsys, toy_data):
    run = tmp_path / "run"
    (run / RUN_LOCK_FILE).mkdir(parents=True)  # e.g. unwritable; a directory in its place fails for root too
    code, _, err = run_cli(capsys, "train", "--data", str(toy_data), "--out", str(run), "--max-steps", "1")
    assert_one_line_error(code, err, "cannot lock", RUN_LOCK_FILE)
