"""Options that reproduce ML-GSAI/SMDM exactly: its 75M config, the family of its checkpoints, its bf16 RoPE tables."""

from __future__ import annotations

from dataclasses import replace

import pytest
import test_convert
import torch
from conftest import assert_one_line_error, run_cli
from safetensors.torch import save_file
from test_convert import CFG, random_smdm_state_dict, ref_forward, sample_ids

from smdm.checkpoint import load_checkpoint
from smdm.config import CONFIGS, non_embedding_params
from smdm.convert import load_smdm_checkpoint, smdm_family
from smdm.errors import SmdmError
from smdm.model import Transformer


def test_diff_llama_75m_is_in_the_size_table():
    config = CONFIGS["smdm-75m"]  # SMDM's Diff_LLaMA_75M
    assert (config.n_layer, config.n_head, config.n_embd, config.intermediate_size) == (16, 8, 640, 1600)
    assert config.n_query_groups == 8 and config.block_size == 2048 and config.vocab_size == 32000
    assert non_embedding_params(config) == 75_387_520


@pytest.mark.parametrize("mask_row, family", [(True, "mdm"), (False, "arm")])
def test_family_is_read_from_the_weights(tmp_path, mask_row, family):
    sd = random_smdm_state_dict(CFG, mask_row=mask_row)
    assert smdm_family(sd, CFG) == family
    save_file(sd, str(tmp_path / "w.safetensors"))
    model, _ = load_smdm_checkpoint(tmp_path / "w.safetensors", CFG)
    assert model.causal == (family == "arm")
    idx = sample_ids(CFG, with_mask=mask_row)
    with torch.no_grad():  # the ARM attends causally: it is the model SMDM trained, not a bidirectional guess
        torch.testing.assert_close(model(idx), ref_forward(sd, CFG, idx, causal=family == "arm"),
                                   atol=1e-5, rtol=1e-5)
    other = "arm" if family == "mdm" else "mdm"
    with pytest.raises(SmdmError, match=f"SMDM {family.upper()} checkpoint.*not --objective {other}"):
        load_smdm_checkpoint(tmp_path / "w.safetensors", CFG, objective=other)
    assert load_smdm_checkpoint(tmp_path / "w.safetensors", CFG, objective=family)[0].causal == model.causal


def _smdm_rope_bf16(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate-half RoPE with SMDM's tables: angles in fp32 exactly as lit_gpt's build_rope_cache, cos/sin to bf16."""
    hs, seq = x.size(-1), x.size(-2)
    half = hs // 2
    theta = 1.0 / (base ** (torch.arange(0, hs, 2) / hs))
    angles = torch.outer(torch.arange(seq) / 1, theta)
    cos, sin = angles.cos().bfloat16().to(x.dtype), angles.sin().bfloat16().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def test_bf16_rope_tables_reproduce_smdm_and_change_nothing_else(monkeypatch):
    sd = random_smdm_state_dict(CFG)
    fp32 = load_smdm_checkpoint_from(sd, CFG)
    bf16 = load_smdm_checkpoint_from(sd, replace(CFG, rope_cache_dtype="bf16"))
    # Only the tables change: same weights, same (non-persistent) buffers but the two tables, same table shapes.
    assert fp32.state_dict().keys() == bf16.state_dict().keys()
    assert all(torch.equal(fp32.state_dict()[k], bf16.state_dict()[k]) for k in fp32.state_dict())
    assert {n for n, _ in fp32.named_buffers()} == {n for n, _ in bf16.named_buffers()} == {"rope_cos", "rope_sin"}
    assert bf16.rope_cos.dtype == torch.bfloat16 and torch.equal(bf16.rope_cos, fp32.rope_cos.bfloat16())
    assert torch.equal(bf16.rope_sin, fp32.rope_sin.bfloat16()) and not torch.equal(bf16.rope_cos.float(),
                                                                                     fp32.rope_cos)
    idx = sample_ids(CFG)
    monkeypatch.setattr(test_convert, "ref_rope", _smdm_rope_bf16)
    with torch.no_grad():
        smdm_logits = ref_forward(sd, CFG, idx, causal=False)
        # bf16 tables match SMDM's forward to fp32 rounding; fp32 tables are off by far more than that.
        torch.testing.assert_close(bf16(idx), smdm_logits, atol=1e-5, rtol=1e-5)
        assert (fp32(idx) - smdm_logits).abs().max() > 1e-4


def load_smdm_checkpoint_from(sd: dict[str, torch.Tensor], config) -> Transformer:
    from smdm.convert import smdm_state_dict_to_ours

    model = Transformer(config)
    model.load_state_dict(smdm_state_dict_to_ours(sd, config))
    return model.eval()


def test_unknown_rope_cache_dtype_is_refused():
    with pytest.raises(SmdmError, match="rope_cache_dtype 'fp16'"):
        replace(CFG, rope_cache_dtype="fp16")


@pytest.fixture(scope="module")
def tokenizer_32k(tmp_path_factory):
    """A word-level tokenizer.json with SMDM's 32000-token vocabulary (the size every SMDM config fixes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 32000)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok32k") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.mark.parametrize("mask_row, family", [(True, "mdm"), (False, "arm")])
def test_import_smdm_happy_path(capsys, tmp_path, tokenizer_32k, mask_row, family, monkeypatch):
    config = CONFIGS["tiny-test"]  # vocab 32000, like SMDM's
    sd = random_smdm_state_dict(config, mask_row=mask_row)
    save_file(sd, str(tmp_path / "w.safetensors"))
    code, out, err = run_cli(capsys, "import-smdm", "--weights", str(tmp_path / "w.safetensors"), "--config",
                             "tiny-test", "--tokenizer", str(tokenizer_32k), "--out", str(tmp_path / "out"),
                             "--rope-cache-dtype", "bf16")
    assert code == 0, err
    assert f"{family.upper()}, RoPE tables in bf16" in out
    checkpoint = load_checkpoint(tmp_path / "out")
    assert checkpoint.meta["objective"] == family and checkpoint.model.causal == (family == "arm")
    assert checkpoint.config.rope_cache_dtype == "bf16" and checkpoint.model.rope_cos.dtype == torch.bfloat16
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    idx = sample_ids(config, with_mask=mask_row)
    monkeypatch.setattr(test_convert, "ref_rope", _smdm_rope_bf16)
    with torch.no_grad():  # the stored checkpoint computes SMDM's logits
        torch.testing.assert_close(checkpoint.model(idx), ref_forward(sd, config, idx, causal=family == "arm"),
                                   atol=1e-5, rtol=1e-5)
    steps = ("--steps", "2") if family == "mdm" else ()
    code, out, err = run_cli(capsys, "sample", "--checkpoint", str(tmp_path / "out"), "--prompt", "w5 w6",
                             "--length", "4", *steps)
    assert code == 0 and out.strip(), err
    # A family given on the command line must agree with the weights.
    other = "arm" if family == "mdm" else "mdm"
    code, _, err = run_cli(capsys, "import-smdm", "--weights", str(tmp_path / "w.safetensors"), "--config",
                           "tiny-test", "--tokenizer", str(tokenizer_32k), "--out", str(tmp_path / "out2"),
                           "--objective", other)
    assert_one_line_error(code, err, f"not --objective {other}")
    assert not (tmp_path / "out2").exists()
