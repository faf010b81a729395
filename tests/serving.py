"""Helpers for the server tests: tiny trained checkpoints and `smdm serve` as a real process on a free port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import REPO_ROOT


def need_serve_extra() -> None:
    """Skip (with the install command) where the optional `serve` extra is absent."""
    for module in ("fastapi", "uvicorn", "openai"):
        pytest.importorskip(module, reason=f"{module} not installed: pip install -e \".[serve,test]\"")


def train_tiny(toy_data: Path, out_dir: Path, objective: str, steps: int = 60, **options) -> Path:
    """A 2-layer, 64-dim model trained briefly on the toy corpus: it writes corpus-like words, fast."""
    from smdm.train import TrainConfig, train

    train(TrainConfig(data_dir=str(toy_data), out_dir=str(out_dir), model="tiny-test", objective=objective,
                      seq_len=32, batch_size=8, lr=3e-3, max_steps=steps, eval_every=1000, save_every=1000,
                      log_every=1000, eval_blocks=2, progress=False, threads=1, **options))
    return out_dir


def untrained_checkpoints(toy_data: Path, root: Path) -> dict[str, Path]:
    """An untrained MDM and ARM (tiny-test) with the toy tokenizer: fast to make, real to load."""
    import torch

    from smdm.checkpoint import save_checkpoint
    from smdm.config import ModelConfig
    from smdm.model import Transformer
    from smdm.tokenizer import Tokenizer

    tokenizer_file = toy_data.parent / "tokenizer.json"
    tokenizer = Tokenizer.from_file(tokenizer_file)
    config = ModelConfig.from_name("tiny-test", vocab_size=tokenizer.vocab_size)
    meta = {"tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                          "eos_id": tokenizer.eos_id}}
    paths = {}
    for objective in ("mdm", "arm"):
        torch.manual_seed(0)
        paths[objective] = save_checkpoint(root / objective, Transformer(config, causal=objective == "arm"), config,
                                           {**meta, "objective": objective}, tokenizer_file=tokenizer_file)
    return paths


def stop(process: subprocess.Popen, timeout: float) -> None:
    """Terminate a server (or browser) process, killing it if it does not exit within `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def post_json(url: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@contextmanager
def running_server(checkpoint: Path, *args: str, env: dict | None = None):
    """`python -m smdm serve` on a free loopback port; yields its base URL; stops it (SIGTERM) afterwards."""
    port = free_port()
    log = open(Path(checkpoint).parent / f"serve-{port}.log", "w+")  # noqa: SIM115 (closed in the finally below)
    process = subprocess.Popen(
        [sys.executable, "-m", "smdm", "serve", "--checkpoint", str(checkpoint), "--port", str(port), "--name", "toy",
         "--threads", "1", *args],
        cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", **(env or {})})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"smdm serve exited with {process.returncode}:\n{log.read()}")
            try:
                if get_json(base + "/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("smdm serve did not come up within 120 s")
            time.sleep(0.2)
        yield base
    finally:
        stop(process, 20)
        log.close()
