"""smdm makes idle OpenMP workers sleep (OMP_WAIT_POLICY=PASSIVE) unless the user chose a policy: under load,
libgomp's spinning workers made 2-thread training 45% slower (benchmarks/threads.py, docs/benchmarks.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


def _spin_count(command: list[str], policy: str | None) -> str:
    """GOMP_SPINCOUNT as libgomp reports it when torch loads it (OMP_DISPLAY_ENV), in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_DISPLAY_ENV="verbose")
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                            check=False)
    lines = [line for line in result.stderr.splitlines() if "GOMP_SPINCOUNT" in line]
    if not lines:
        pytest.skip("torch's OpenMP runtime is not libgomp here (no OMP_DISPLAY_ENV report)")
    return lines[0].split("=")[-1].strip().strip("'")


def test_smdm_commands_run_with_passive_openmp_workers():
    assert _spin_count([sys.executable, "-m", "smdm", "configs"], None) == "0"
    assert _spin_count([sys.executable, "-c", "import smdm.train"], None) == "0"  # the library, too


def test_a_users_own_policy_is_kept():
    assert _spin_count([sys.executable, "-m", "smdm", "configs"], "ACTIVE") not in ("0", "300000")
    # Importing torch before smdm keeps libgomp's default: the policy is read once, when torch loads it.
    assert _spin_count([sys.executable, "-c", "import torch, smdm"], None) == "300000"
