"""The CLI: every bad input is one line on stderr and exit code 2, nothing half-written; the happy path works."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, assert_one_line_error, run_cli

from smdm.config import ModelConfig
from smdm.model import Transformer


@pytest.fixture
def tokenizer_file(toy_data):
    return toy_data.parent / "tokenizer.json"


def test_empty_corpus(capsys, tmp_path, tokenizer_file):
    (tmp_path / "empty.txt").write_text("   \n")
    code, _, err = run_cli(capsys, "prepare", "--input", str(tmp_path / "empty.txt"), "--tokenizer",
                           str(tokenizer_file), "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err)
    assert not (tmp_path / "out").exists()


def test_non_utf8_corpus(capsys, tmp_path, tokenizer_file):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    code, _, err = run_cli(capsys, "prepare", "--input", str(tmp_path / "latin1.txt"), "--tokenizer",
                           str(tokenizer_file), "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, "latin1.txt", "UTF-8")
    assert not (tmp_path / "out").exists()


def test_missing_input_file(capsys, tmp_path, tokenizer_file):
    code, _, err = run_cli(capsys, "prepare", "--input", str(tmp_path / "nope.txt"), "--tokenizer",
                           str(tokenizer_file), "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, "nope.txt")


def test_unknown_config(capsys, tmp_path, toy_data):
    code, _, err = run_cli(capsys, "train", "--data", str(toy_data), "--out", str(tmp_path / "run"),
                           "--model", "smdm-7b", "--max-steps", "1")
    assert_one_line_error(code, err, "smdm-7b")


def test_sequence_longer_than_block_size(capsys, tmp_path, toy_data):
    code, _, err = run_cli(capsys, "train", "--data", str(toy_data), "--out", str(tmp_path / "run"),
                           "--model", "tiny-test", "--seq-len", "4096", "--max-steps", "1")
    assert_one_line_error(code, err, "context length")


def test_data_dir_not_prepared(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                           "--max-steps", "1")
    assert_one_line_error(code, err, "prepare")


@pytest.fixture
def trained_checkpoint(toy_data, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", str(toy_data), "--out", str(tmp_path / "run"), "--model",
                           "tiny-test", "--seq-len", "32", "--batch-size", "2", "--max-steps", "2", "--no-progress",
                           "--threads", "1")
    assert code == 0, err
    return tmp_path / "run"


def test_sample_and_likelihood_happy_path(capsys, trained_checkpoint):
    code, out, err = run_cli(capsys, "sample", "--checkpoint", str(trained_checkpoint), "--prompt", "the cat",
                             "--length", "8", "--steps", "4")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["prompt"] == "the cat"
    code, out, err = run_cli(capsys, "likelihood", "--checkpoint", str(trained_checkpoint), "--text", "the dog sat",
                             "--mc-samples", "8")
    assert code == 0, err
    result = json.loads(out)
    expected, expected_stderr = _bernoulli_estimate_by_hand(trained_checkpoint, "the dog sat", mc_samples=8, seed=0)
    assert result["nll_nats"] == pytest.approx(expected, rel=1e-5)
    assert result["stderr"] == pytest.approx(expected_stderr, rel=1e-4)


@torch.no_grad()
def _bernoulli_estimate_by_hand(run, text: str, mc_samples: int, seed: int) -> tuple[float, float]:
    """The Bernoulli ELBO estimate re-derived from the draws it makes (one batch): t stratified from one uniform,
    each token masked with p = (1 - eps)t + eps, draw value = sum over masked tokens of CE / p."""
    from smdm.checkpoint import load_for_inference
    from smdm.diffusion import MASK_EPS

    checkpoint, tokenizer = load_for_inference(run, None, "cpu")
    model, ids = checkpoint.model, torch.tensor(tokenizer.encode(text))
    generator = torch.Generator().manual_seed(seed)
    t = (torch.rand(1, generator=generator) + torch.arange(mc_samples) / mc_samples) % 1.0
    p = (1 - MASK_EPS) * t + MASK_EPS
    masked = torch.rand(mc_samples, len(ids), generator=generator) < p[:, None]
    x = torch.where(masked, torch.full_like(masked, model.mask_id, dtype=torch.long), ids[None])
    ce = -model(x).double().log_softmax(-1).gather(-1, ids[None, :, None].expand(mc_samples, -1, 1))[..., 0]
    draws = (ce * masked).sum(1) / p.double()
    return draws.mean().item(), (draws.std() / mc_samples ** 0.5).item()


def test_conditional_likelihood(capsys, trained_checkpoint):
    results = {}
    for method in ("mc", "chain"):
        code, out, err = run_cli(capsys, "likelihood", "--checkpoint", str(trained_checkpoint), "--prefix", "the cat",
                                 "--text", " sat", "--method", method, "--mc-samples", "8")
        assert code == 0, err
        results[method] = json.loads(out)
    assert results["chain"]["stderr"] == 0 and results["mc"]["nll_nats"] > 0
    with torch.no_grad():  # the chain rule by hand: reveal the target left to right
        from smdm.checkpoint import load_for_inference

        checkpoint, tokenizer = load_for_inference(trained_checkpoint, None, "cpu")
        model, prefix, target = checkpoint.model, tokenizer.encode("the cat"), tokenizer.encode(" sat")
        expected = 0.0
        for k in range(len(target)):
            x = torch.tensor([prefix + target[:k] + [model.mask_id] * (len(target) - k)])
            expected -= model(x)[0, len(prefix) + k].log_softmax(-1)[target[k]].item()
    assert results["chain"]["nll_nats"] == pytest.approx(expected, rel=1e-5)
    assert results["chain"]["forward_passes"] == 1  # every reveal step of a short target in one batched pass
    code, _, err = run_cli(capsys, "likelihood", "--checkpoint", str(trained_checkpoint), "--prefix", "the cat",
                           "--text", "", "--method", "chain")
    assert_one_line_error(code, err, "empty")


def test_threads_option_on_inference_commands(capsys, trained_checkpoint):
    """--threads reaches torch for sampling too (not only the training loop); a bad value is a one-line error."""
    import torch

    torch.set_num_threads(2)
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(trained_checkpoint), "--length", "4", "--threads", "1")
    assert code == 0, err
    assert torch.get_num_threads() == 1
    for command in (["sample", "--checkpoint", str(trained_checkpoint)],
                    ["likelihood", "--checkpoint", str(trained_checkpoint), "--text", "the"]):
        code, _, err = run_cli(capsys, *command, "--threads", "0")
        assert_one_line_error(code, err, "--threads")


def test_tokenizer_vocab_disagrees_with_checkpoint(capsys, tmp_path, trained_checkpoint):
    from smdm.tokenizer import train_bpe

    train_bpe(["some other text entirely, with other words"] * 20, 280, tmp_path / "other.json")
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(trained_checkpoint), "--tokenizer",
                           str(tmp_path / "other.json"), "--length", "4")
    assert_one_line_error(code, err, "tokens")


def test_corrupted_checkpoint(capsys, trained_checkpoint):
    weights = trained_checkpoint / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(trained_checkpoint), "--length", "4")
    assert_one_line_error(code, err, "corrupted or truncated")


def test_checkpoint_from_another_architecture(capsys, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(tmp_path / "hf"), "--length", "4")
    assert_one_line_error(code, err, "'gpt2' is not supported")
    # A Llama directory is imported (smdm.interop); an incomplete one is named, not a traceback.
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(tmp_path / "hf"), "--length", "4")
    assert_one_line_error(code, err, "lacks 'hidden_size'")


def test_import_smdm_rejects_wrong_config(capsys, tmp_path, tokenizer_file):
    from safetensors.torch import save_file

    from smdm.convert import ours_to_smdm_state_dict

    config = ModelConfig.from_name("tiny-test", vocab_size=300)
    save_file(ours_to_smdm_state_dict(Transformer(config).state_dict(), config), str(tmp_path / "w.safetensors"))
    code, _, err = run_cli(capsys, "import-smdm", "--weights", str(tmp_path / "w.safetensors"), "--config",
                           "smdm-170m", "--tokenizer", str(tokenizer_file), "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err)
    assert not (tmp_path / "out").exists()


def test_console_script_exits_nonzero_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "smdm", "train", "--data", str(tmp_path), "--out",
                             str(tmp_path / "run"), "--max-steps", "1"], capture_output=True, text=True,
                            cwd=REPO_ROOT, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
