"""torchrun on CPU (gloo, 2 processes): DDP and FSDP2 equal one process with gradient accumulation; resume 2 -> 1
and 1 -> 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from safetensors.torch import load_file

STEPS = 4


def _train_args(data: Path, out: Path, batch: int, accum: int, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--model", "tiny-test", "--seq-len", "32",
            "--batch-size", str(batch), "--grad-accum", str(accum), "--max-steps", str(STEPS + 2), "--save-every", "100",
            "--eval-every", "100", "--eval-blocks", "2", "--random-length-prob", "0.3", "--threads", "1",
            "--no-progress", *extra]


def _run(args: list[str], nproc: int = 1) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        command = [sys.executable, "-m", "smdm", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "smdm", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoint" / "model.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def reference(toy_data, tmp_path_factory) -> Path:
    """One process, micro-batch 4 x 2 accumulation steps = the global batch of 2 ranks x 4."""
    out = tmp_path_factory.mktemp("dist") / "single"
    _run(_train_args(toy_data, out, 4, 2, "--stop-after-steps", str(STEPS)))
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_rank_with_accumulation(toy_data, tmp_path, reference, strategy):
    out = tmp_path / strategy
    _run(_train_args(toy_data, out, 4, 1, "--parallel", strategy, "--stop-after-steps", str(STEPS)), nproc=2)
    _assert_same_weights(_weights(out), _weights(reference))
    # Sanity: training moved the weights, so the comparison is not between two untouched initialisations.
    first = _weights(reference)["lm_head.weight"]
    torch.manual_seed(0)
    from smdm.config import ModelConfig
    from smdm.model import Transformer

    fresh = Transformer(ModelConfig.from_name("tiny-test", vocab_size=first.shape[0])).lm_head.weight
    assert not torch.allclose(first, fresh, atol=1e-3)


@pytest.fixture(scope="module")
def straight(toy_data, tmp_path_factory) -> Path:
    """One process over the whole schedule, uninterrupted."""
    out = tmp_path_factory.mktemp("dist") / "straight"
    _run(_train_args(toy_data, out, 4, 2))
    return out


def test_checkpoint_saved_by_two_ranks_resumes_on_one(toy_data, tmp_path, straight):
    # The uninterrupted run equals: FSDP on 2 ranks for the first STEPS steps, then a single process resuming the rest.
    sliced = tmp_path / "sliced"
    _run(_train_args(toy_data, sliced, 4, 1, "--parallel", "fsdp", "--stop-after-steps", str(STEPS)), nproc=2)
    _run(_train_args(toy_data, sliced, 4, 2, "--resume"))
    _assert_same_weights(_weights(sliced), _weights(straight))


def test_checkpoint_saved_by_one_rank_resumes_on_two(toy_data, tmp_path, reference, straight):
    # The reference ran one process (4 x 2 accumulation) for STEPS steps; two DDP ranks (4 x 1 each) finish it and
    # must end where one process running the whole schedule does: the data position and RNG carry over.
    grown = tmp_path / "grown"
    shutil.copytree(reference, grown)
    _run(_train_args(toy_data, grown, 4, 1, "--parallel", "ddp", "--resume"), nproc=2)
    _assert_same_weights(_weights(grown), _weights(straight))
    steps = [row["step"] for row in map(json.loads, (grown / "metrics.jsonl").read_text().splitlines())]
    assert steps == sorted(steps) and steps[-1] == STEPS + 2
