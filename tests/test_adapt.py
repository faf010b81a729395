"""ARM -> MDM adaptation (DiffuLLaMA / Dream), ARM -> BDM (Fast-dLLM v2) and MDM -> BDM (BD3-LM): shifted config,
attention annealing, resume, meta, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from safetensors.torch import load_file
from test_interop import _plain_transformers
from test_train import tiny_run

from smdm.adapt import WithAttentionMask, anneal_ratio, annealed_attention_mask
from smdm.checkpoint import load_checkpoint, load_for_inference
from smdm.config import ModelConfig
from smdm.errors import SmdmError
from smdm.model import Transformer
from smdm.train import train


@pytest.fixture(scope="module")
def arm_checkpoint(toy_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("arm") / "arm"
    train(tiny_run(toy_data, out, objective="arm", max_steps=3))
    return out


def test_anneal_mask_goes_from_causal_to_bidirectional_deterministically():
    length, steps = 64, 10
    assert anneal_ratio(0, steps) == pytest.approx(0.1) and anneal_ratio(9, steps) == 1.0
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    fractions = []
    for step in range(steps - 1):
        mask = annealed_attention_mask(length, step, steps, seed=3)
        assert mask.dtype == torch.bool and mask.shape == (length, length)
        assert (mask | ~causal).all()  # the causal triangle (and so the diagonal) is always visible
        assert torch.equal(mask, annealed_attention_mask(length, step, steps, seed=3))  # a pure function of (seed, step)
        future = mask[~causal].float().mean().item()
        assert abs(future - anneal_ratio(step, steps)) < 0.05  # DiffuLLaMA's Bernoulli(ratio) on the future
        fractions.append(future)
    assert fractions == sorted(fractions) and fractions[0] < 0.2 and fractions[-1] > 0.8
    assert annealed_attention_mask(length, steps - 1, steps, seed=3) is None  # ratio 1: the plain path
    assert annealed_attention_mask(length, 0, 0, seed=3) is None  # no annealing asked
    assert not torch.equal(annealed_attention_mask(length, 2, steps, seed=3),
                           annealed_attention_mask(length, 2, steps, seed=4))


def test_with_attention_mask_is_the_masked_model():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(name="t", block_size=32, vocab_size=50, n_layer=2, n_head=4, n_embd=64)).eval()
    causal_model = Transformer(model.config, causal=True).eval()
    causal_model.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 50, (2, 16))
    causal = torch.ones(32, 32, dtype=torch.bool).tril()
    torch.testing.assert_close(WithAttentionMask(model, causal)(tokens), causal_model(tokens), atol=1e-5, rtol=0)
    full = torch.ones(32, 32, dtype=torch.bool)
    torch.testing.assert_close(WithAttentionMask(model, full)(tokens), model(tokens), atol=1e-5, rtol=0)


def test_adapted_checkpoint_is_a_shifted_mdm_with_the_arm_weights(toy_data, tmp_path, arm_checkpoint):
    summary = train(tiny_run(toy_data, tmp_path / "mdm", objective="mdm", init_from=str(arm_checkpoint),
                             max_steps=1, lr=1e-12, warmup_steps=0))
    assert summary["objective"] == "mdm"
    adapted = load_checkpoint(tmp_path / "mdm")
    assert adapted.config.shifted and not adapted.model.causal
    assert adapted.meta["objective"] == "mdm"
    assert adapted.meta["adapted_from"] == {"objective": "arm", "checkpoint": str(arm_checkpoint), "shift": True,
                                            "attention_anneal_steps": 0}
    arm = load_file(str(arm_checkpoint / "checkpoint" / "model.safetensors"))
    mdm = load_file(str(tmp_path / "mdm" / "checkpoint" / "model.safetensors"))
    assert arm.keys() == mdm.keys()  # same parameters, [MASK] row included
    for name in arm:
        torch.testing.assert_close(arm[name], mdm[name], atol=1e-6, rtol=0)
    # Under a causal mask, the shifted MDM's logit at i+1 is the ARM's next-token logit at i.
    tokens = torch.randint(0, adapted.config.vocab_size, (2, 12))
    arm_model = load_checkpoint(arm_checkpoint).model
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    with torch.no_grad():
        torch.testing.assert_close(adapted.model(tokens, attn_mask=causal)[:, 1:], arm_model(tokens)[:, :-1],
                                   atol=1e-4, rtol=0)
    checkpoint, _ = load_for_inference(tmp_path / "mdm", device="cpu")
    assert checkpoint.config.shifted and checkpoint.meta["adapted_from"]["shift"] is True
    from smdm.sample import generate

    out = generate(checkpoint.model, tokens[0, :4], 8, steps=8)  # the MDM sampler runs on the adapted model
    assert len(out.completions[0]) == 8 and max(out.completions[0]) < adapted.config.vocab_size


def test_no_shift_and_annealing_are_recorded(toy_data, tmp_path, arm_checkpoint):
    train(tiny_run(toy_data, tmp_path / "mdm", objective="mdm", init_from=str(arm_checkpoint), max_steps=3,
                   adapt_shift=False, attention_anneal_steps=2))
    adapted = load_checkpoint(tmp_path / "mdm")
    assert not adapted.config.shifted
    assert adapted.meta["adapted_from"]["shift"] is False
    assert adapted.meta["adapted_from"]["attention_anneal_steps"] == 2


def test_annealing_changes_training_only_during_the_first_k_steps(toy_data, tmp_path, arm_checkpoint):
    def weights(name: str, **options) -> dict[str, torch.Tensor]:
        train(tiny_run(toy_data, tmp_path / name, objective="mdm", init_from=str(arm_checkpoint),
                       random_length_prob=0.0, **options))
        return load_file(str(tmp_path / name / "checkpoint" / "model.safetensors"))

    plain = weights("plain", max_steps=2)
    annealed = weights("annealed", max_steps=2, attention_anneal_steps=3)
    assert any(not torch.equal(plain[k], annealed[k]) for k in plain)  # the mask reached the model
    # K = 1: the ratio is already 1 at step 0, so the run is the plain one, bit for bit.
    one = weights("one", max_steps=2, attention_anneal_steps=1)
    assert all(torch.equal(plain[k], one[k]) for k in plain)


def test_annealed_adaptation_resumes_bit_exactly(toy_data, tmp_path, arm_checkpoint):
    options = {"objective": "mdm", "init_from": str(arm_checkpoint), "attention_anneal_steps": 4, "save_every": 2,
               "random_length_prob": 0.3}
    train(tiny_run(toy_data, tmp_path / "ref", max_steps=6, **options))
    train(tiny_run(toy_data, tmp_path / "cut", max_steps=6, stop_after_steps=3, **options))
    train(tiny_run(toy_data, tmp_path / "cut", max_steps=6, resume=True, **options))
    a = load_file(str(tmp_path / "ref" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_adaptation_from_an_mdm_or_to_an_arm_is_refused(toy_data, tmp_path, arm_checkpoint):
    train(tiny_run(toy_data, tmp_path / "mdm", max_steps=1))
    with pytest.raises(SmdmError, match="not an ARM"):
        train(tiny_run(toy_data, tmp_path / "x", init_from=str(tmp_path / "mdm"), max_steps=1,
                       attention_anneal_steps=2))
    assert not (tmp_path / "x" / "checkpoint").exists()
    with pytest.raises(SmdmError, match="adapt an ARM into an MDM"):
        train(tiny_run(toy_data, tmp_path / "y", objective="arm", init_from=str(arm_checkpoint), max_steps=1,
                       adapt_shift=True))
    with pytest.raises(SmdmError, match="adapt an ARM into an MDM"):
        train(tiny_run(toy_data, tmp_path / "z", max_steps=1, attention_anneal_steps=2))  # nothing to adapt
    with pytest.raises(SmdmError, match="block-causal mask"):
        train(tiny_run(toy_data, tmp_path / "w", objective="bdm", diffusion_block_size=4,
                       init_from=str(arm_checkpoint), max_steps=1, attention_anneal_steps=2))
    assert not (tmp_path / "w").exists()


def test_an_arm_adapts_into_a_shifted_bdm(toy_data, tmp_path, arm_checkpoint):
    """Fast-dLLM v2's route: the ARM's weights, block diffusion, the token shift (at block size 1 such a model is the
    ARM itself: test_block_diffusion.test_a_shifted_bdm_of_block_size_one_is_the_arm_it_came_from)."""
    from smdm.sample import generate

    train(tiny_run(toy_data, tmp_path / "bdm", objective="bdm", diffusion_block_size=4,
                   init_from=str(arm_checkpoint), max_steps=1, lr=1e-12, warmup_steps=0))
    adapted = load_checkpoint(tmp_path / "bdm")
    assert adapted.config.shifted and adapted.meta["objective"] == "bdm" and not adapted.model.causal
    assert adapted.meta["objective_options"]["diffusion_block_size"] == 4
    assert adapted.meta["adapted_from"]["shift"] is True
    arm = load_file(str(arm_checkpoint / "checkpoint" / "model.safetensors"))
    bdm = load_file(str(tmp_path / "bdm" / "checkpoint" / "model.safetensors"))
    assert arm.keys() == bdm.keys()
    for name in arm:
        torch.testing.assert_close(arm[name], bdm[name], atol=1e-6, rtol=0)
    tokens = torch.randint(0, adapted.config.vocab_size, (2, 16))
    checkpoint, _ = load_for_inference(tmp_path / "bdm", device="cpu")
    out = generate(checkpoint.model, tokens[0, :5], 8, steps=2)  # the block sampler runs on the adapted model
    assert len(out.completions[0]) == 8
    no_shift = tmp_path / "noshift"
    train(tiny_run(toy_data, no_shift, objective="bdm", diffusion_block_size=4, init_from=str(arm_checkpoint),
                   max_steps=1, adapt_shift=False))
    assert not load_checkpoint(no_shift).config.shifted


def test_an_mdm_starts_a_bdm_run_as_bd3lm_does(toy_data, tmp_path):
    """BD3-LM's route (an MDLM pre-train fine-tuned into blocks): the MDM's weights and config, unshifted, not an
    adaptation; the reverse (a BDM starting an MDM run) is still refused."""
    train(tiny_run(toy_data, tmp_path / "mdm", max_steps=2))
    train(tiny_run(toy_data, tmp_path / "bdm", objective="bdm", diffusion_block_size=4,
                   init_from=str(tmp_path / "mdm"), max_steps=1, lr=1e-12, warmup_steps=0))
    tuned = load_checkpoint(tmp_path / "bdm")
    assert tuned.meta["objective"] == "bdm" and tuned.meta["objective_options"]["diffusion_block_size"] == 4
    assert not tuned.config.shifted and "adapted_from" not in tuned.meta
    assert tuned.config == load_checkpoint(tmp_path / "mdm").config
    mdm = load_file(str(tmp_path / "mdm" / "checkpoint" / "model.safetensors"))
    bdm = load_file(str(tmp_path / "bdm" / "checkpoint" / "model.safetensors"))
    assert mdm.keys() == bdm.keys()
    for name in mdm:
        torch.testing.assert_close(mdm[name], bdm[name], atol=1e-6, rtol=0)
    with pytest.raises(SmdmError, match="bdm checkpoints cannot start mdm runs"):
        train(tiny_run(toy_data, tmp_path / "back", init_from=str(tmp_path / "bdm"), max_steps=1))
    assert not (tmp_path / "back").exists()
    # adaptation flags are for an ARM; the error names the family with its article
    with pytest.raises(SmdmError, match="the checkpoint is a BDM, not an ARM"):
        train(tiny_run(toy_data, tmp_path / "shift", objective="bdm", diffusion_block_size=4,
                       init_from=str(tmp_path / "bdm"), adapt_shift=True, max_steps=1))
    with pytest.raises(SmdmError, match="the checkpoint is an MDM, not an ARM"):
        train(tiny_run(toy_data, tmp_path / "shift", objective="bdm", diffusion_block_size=4,
                       init_from=str(tmp_path / "mdm"), adapt_shift=True, max_steps=1))
    assert not (tmp_path / "shift").exists()


def test_cli_errors_are_one_line_and_write_nothing(capsys, toy_data, tmp_path, arm_checkpoint):
    train(tiny_run(toy_data, tmp_path / "mdm", max_steps=1))
    capsys.readouterr()
    base = ["train", "--data", str(toy_data), "--model", "tiny-test", "--seq-len", "32", "--max-steps", "1",
            "--threads", "1", "--no-progress"]
    code, _, err = run_cli(capsys, *base, "--out", str(tmp_path / "a"), "--init-from", str(tmp_path / "mdm"),
                           "--adapt-shift")
    assert_one_line_error(code, err, "not an ARM")
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    code, _, err = run_cli(capsys, *base, "--out", str(tmp_path / "b"), "--attention-anneal-steps", "3")
    assert_one_line_error(code, err, "--init-from")
    assert not (tmp_path / "b").exists()
    code, _, err = run_cli(capsys, *base, "--out", str(tmp_path / "c"), "--init-from", str(arm_checkpoint),
                           "--objective", "mdm", "--no-adapt-shift", "--attention-anneal-steps", "1")
    assert code == 0, err
    record = json.loads((tmp_path / "c" / "checkpoint" / "config.json").read_text())
    assert record["model"]["shifted"] is False and record["adapted_from"]["shift"] is False


def test_hf_llama_directory_adapts_with_a_new_mask_row(toy_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = json.loads((toy_data / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    with _plain_transformers():  # the reference code test_interop loads patches transformers' RoPE table
        transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    train(tiny_run(toy_data, tmp_path / "mdm", objective="mdm", init_from=str(tmp_path / "llama"), max_steps=2,
                   attention_anneal_steps=2))
    adapted = load_checkpoint(tmp_path / "mdm")
    assert adapted.config.shifted and adapted.config.mask_id == vocab
    assert adapted.model.embed.weight.shape[0] == vocab + 1  # the [MASK] row the import added
    assert adapted.meta["adapted_from"]["checkpoint"] == str(tmp_path / "llama")
