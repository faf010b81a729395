"""`smdm serve` argument errors are one line, also where the optional serve extra is not installed."""

from __future__ import annotations

import sys

import pytest
from conftest import assert_one_line_error, run_cli
from serving import untrained_checkpoints


@pytest.fixture(scope="module")
def checkpoints(toy_data, tmp_path_factory):
    return untrained_checkpoints(toy_data, tmp_path_factory.mktemp("untrained"))


def test_serve_without_the_extra_says_how_to_install_it(capsys, monkeypatch, checkpoints):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # what an environment without the extra looks like
    code, _, err = run_cli(capsys, "serve", "--checkpoint", str(checkpoints["mdm"]))
    assert_one_line_error(code, err, "serve extra", 'pip install -e ".[serve]"')


@pytest.mark.parametrize("args,fragment", [(["--port", "70000"], "--port"), (["--max-batch", "0"], "--max-batch")])
def test_bad_serve_options(capsys, checkpoints, args, fragment):
    pytest.importorskip("uvicorn")
    code, _, err = run_cli(capsys, "serve", "--checkpoint", str(checkpoints["mdm"]), *args)
    assert_one_line_error(code, err, fragment)


def test_infilling_refuses_a_block_diffusion_checkpoint_in_one_line(capsys, toy_data, tmp_path):
    """A BDM generates blocks left to right; it would otherwise be run through the MDM's infilling sampler."""
    from test_train import tiny_run

    from smdm.train import train
    train(tiny_run(toy_data, tmp_path / "bdm", objective="bdm", diffusion_block_size=4, max_steps=1))
    capsys.readouterr()  # the training log
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(tmp_path / "bdm"), "--infill", "a <|mask:4|> b")
    assert_one_line_error(code, err, "block diffusion, which generates blocks left to right")
