"""Checkpoint conversion: SMDM (lit-gpt) and HF Llama layouts load into our Transformer with identical outputs."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from smdm.config import ModelConfig
from smdm.convert import (
    hf_llama_state_dict_to_ours,
    load_smdm_checkpoint,
    ours_to_hf_llama_state_dict,
    ours_to_smdm_state_dict,
    smdm_state_dict_to_ours,
)
from smdm.errors import SmdmError
from smdm.model import Transformer

CFG = ModelConfig(name="tiny-gqa", block_size=32, vocab_size=50, n_layer=2, n_head=4, n_query_groups=2,
                  n_embd=64, intermediate_size=96)


def random_smdm_state_dict(cfg: ModelConfig, seed: int = 0, mask_row: bool = True) -> dict[str, torch.Tensor]:
    """A random state dict under ML-GSAI/SMDM's names and shapes (norm weights non-trivial on purpose)."""
    g = torch.Generator().manual_seed(seed)
    d, hs, hidden = cfg.n_embd, cfg.head_size, cfg.intermediate_size

    def rnd(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    sd = {"transformer.wte.weight": rnd(cfg.vocab_size + int(mask_row), d, scale=1.0)}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        sd[p + "norm_1.weight"] = 1.0 + rnd(d)
        sd[p + "attn.attn.weight"] = rnd((cfg.n_head + 2 * cfg.n_query_groups) * hs, d, scale=0.2)
        sd[p + "attn.proj.weight"] = rnd(d, cfg.n_head * hs)
        sd[p + "norm_2.weight"] = 1.0 + rnd(d)
        sd[p + "mlp.swiglu.w1.weight"] = rnd(hidden, d, scale=0.2)
        sd[p + "mlp.swiglu.w2.weight"] = rnd(hidden, d, scale=0.2)
        sd[p + "mlp.swiglu.w3.weight"] = rnd(d, hidden)
    sd["transformer.ln_f.weight"] = 1.0 + rnd(d)
    sd["lm_head.weight"] = rnd(cfg.vocab_size, d, scale=0.2)
    return sd


# ---------------------------------------------------------------- independent reference forward (SMDM layout)

def ref_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def ref_rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate-half RoPE on (B, H, T, hs): pair (i, i + hs/2) rotated by angle t * base^(-2i/hs)."""
    hs, seq = x.size(-1), x.size(-2)
    half = hs // 2
    theta = base ** (-torch.arange(half, dtype=torch.float64) * 2 / hs)
    ang = torch.arange(seq, dtype=torch.float64)[:, None] * theta[None, :]  # (T, half)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def ref_forward(sd: dict[str, torch.Tensor], cfg: ModelConfig, idx: torch.Tensor, causal: bool) -> torch.Tensor:
    """The LLaMA equations on lit-gpt tensors: grouped fused QKV split per group by hand, explicit softmax attention.

    Computed in float64 and returned as float32, so the comparison measures only our model's float32 rounding.
    """
    sd = {k: v.double() for k, v in sd.items()}
    T = idx.shape[1]
    hs, groups = cfg.head_size, cfg.n_query_groups
    q_per_kv = cfg.n_head // groups
    x = sd["transformer.wte.weight"][idx]
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        h = ref_rmsnorm(x, sd[p + "norm_1.weight"], cfg.norm_eps)
        w = sd[p + "attn.attn.weight"]
        rows = (q_per_kv + 2) * hs  # rows of one query group: q_per_kv query heads, one key head, one value head
        heads = []
        for gi in range(groups):
            wg = w[gi * rows:(gi + 1) * rows]
            k = ref_rope((h @ wg[q_per_kv * hs:(q_per_kv + 1) * hs].T).unsqueeze(1), cfg.rope_base)[:, 0]
            v = h @ wg[(q_per_kv + 1) * hs:].T
            for j in range(q_per_kv):
                q = ref_rope((h @ wg[j * hs:(j + 1) * hs].T).unsqueeze(1), cfg.rope_base)[:, 0]
                scores = q @ k.transpose(-1, -2) / math.sqrt(hs)  # (B, T, T)
                if causal:
                    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
                    scores = scores.masked_fill(future, float("-inf"))
                heads.append(torch.softmax(scores, dim=-1) @ v)  # head gi * q_per_kv + j
        x = x + torch.cat(heads, dim=-1) @ sd[p + "attn.proj.weight"].T
        h = ref_rmsnorm(x, sd[p + "norm_2.weight"], cfg.norm_eps)
        a = h @ sd[p + "mlp.swiglu.w1.weight"].T
        b = h @ sd[p + "mlp.swiglu.w2.weight"].T
        x = x + (a * torch.sigmoid(a) * b) @ sd[p + "mlp.swiglu.w3.weight"].T
    x = ref_rmsnorm(x, sd["transformer.ln_f.weight"], cfg.norm_eps)
    return (x @ sd["lm_head.weight"].T).float()


def sample_ids(cfg: ModelConfig, with_mask: bool = True, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    if with_mask:
        idx[0, 3] = idx[0, 9] = idx[1, 0] = idx[1, 15] = cfg.mask_id
    return idx


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("causal", [False, True], ids=["mdm-bidirectional", "arm-causal"])
def test_smdm_layout_matches_reference_forward(causal: bool) -> None:
    sd = random_smdm_state_dict(CFG)
    model = Transformer(CFG, causal=causal)
    model.load_state_dict(smdm_state_dict_to_ours(sd, CFG), strict=True)
    idx = sample_ids(CFG)
    with torch.no_grad():
        ours = model(idx)
        ref = ref_forward(sd, CFG, idx, causal=causal)
    assert ours.shape == (2, 16, CFG.vocab_size)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_reference_is_sensitive_to_the_grouped_layout() -> None:
    """Guard against a vacuous parity check: reading the QKV as [q|k|v] must give different logits."""
    sd = random_smdm_state_dict(CFG)
    wrong = {**smdm_state_dict_to_ours(sd, CFG)}
    for i in range(CFG.n_layer):
        wrong[f"blocks.{i}.attn.qkv.weight"] = sd[f"transformer.h.{i}.attn.attn.weight"]
    model = Transformer(CFG, causal=False)
    model.load_state_dict(wrong, strict=True)
    idx = sample_ids(CFG)
    with torch.no_grad():
        assert not torch.allclose(model(idx), ref_forward(sd, CFG, idx, causal=False), atol=1e-3)


def test_arm_checkpoint_without_mask_row_gets_zero_row() -> None:
    sd = random_smdm_state_dict(CFG, mask_row=False)
    ours = smdm_state_dict_to_ours(sd, CFG)
    assert ours["embed.weight"].shape == (CFG.vocab_size + 1, CFG.n_embd)
    assert torch.equal(ours["embed.weight"][: CFG.vocab_size], sd["transformer.wte.weight"])
    assert torch.count_nonzero(ours["embed.weight"][CFG.mask_id]) == 0
    model = Transformer(CFG, causal=True)
    model.load_state_dict(ours, strict=True)
    idx = sample_ids(CFG, with_mask=False)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref_forward(sd, CFG, idx, causal=True), atol=1e-5, rtol=1e-5)


def test_round_trips_are_exact() -> None:
    ours = Transformer(CFG, causal=False).state_dict()
    back = smdm_state_dict_to_ours(ours_to_smdm_state_dict(ours, CFG), CFG)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    smdm = random_smdm_state_dict(CFG)
    again = ours_to_smdm_state_dict(smdm_state_dict_to_ours(smdm, CFG), CFG)
    assert again.keys() == smdm.keys()
    assert all(torch.equal(again[k], smdm[k]) for k in smdm)
    hf = ours_to_hf_llama_state_dict(ours, CFG)
    assert hf["model.embed_tokens.weight"].shape == (CFG.vocab_size, CFG.n_embd)
    via_hf = hf_llama_state_dict_to_ours(hf, CFG)
    assert all(torch.equal(via_hf[k], ours[k]) for k in ours if k != "embed.weight")
    assert torch.equal(via_hf["embed.weight"][: CFG.vocab_size], ours["embed.weight"][: CFG.vocab_size])


def test_wrapped_training_checkpoint_is_unwrapped() -> None:
    sd = random_smdm_state_dict(CFG)
    direct = smdm_state_dict_to_ours(sd, CFG)
    for wrapped in ({"model": sd, "iter_num": 3}, {"state_dict": sd},
                    {"model": {"_orig_mod." + k: v for k, v in sd.items()}}):
        got = smdm_state_dict_to_ours(wrapped, CFG)
        assert all(torch.equal(got[k], direct[k]) for k in direct)


def test_hf_llama_parity() -> None:
    transformers = pytest.importorskip("transformers")
    from smdm.convert import hf_llama_config

    torch.manual_seed(0)
    hf_cfg = hf_llama_config(CFG)
    assert hf_cfg.num_key_value_heads == CFG.n_query_groups and hf_cfg.vocab_size == CFG.vocab_size
    hf = transformers.LlamaForCausalLM._from_config(hf_cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # non-trivial norms so a swapped norm would show
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)
    model = Transformer(CFG, causal=True)
    model.load_state_dict(hf_llama_state_dict_to_ours(hf.state_dict(), CFG), strict=True)
    idx = sample_ids(CFG, with_mask=False)
    with torch.no_grad():
        expected = hf(input_ids=idx).logits
        got = model(idx)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # and back: our export loads into HF strictly
    exported = ours_to_hf_llama_state_dict(model.state_dict(), CFG)
    missing, unexpected = hf.load_state_dict(exported, strict=False)
    assert not unexpected and all("rotary_emb" in k for k in missing)


def test_missing_key_is_reported() -> None:
    sd = random_smdm_state_dict(CFG)
    del sd["transformer.h.1.norm_2.weight"]
    with pytest.raises(SmdmError, match=r"not an SMDM checkpoint for config tiny-gqa.*transformer\.h\.1\.norm_2"):
        smdm_state_dict_to_ours(sd, CFG)


def test_unknown_key_is_reported() -> None:
    sd = random_smdm_state_dict(CFG)
    sd["transformer.h.0.attn.bias"] = torch.zeros(3)
    with pytest.raises(SmdmError, match=r"not an SMDM checkpoint.*unexpected key 'transformer\.h\.0\.attn\.bias'"):
        smdm_state_dict_to_ours(sd, CFG)


def test_checkpoint_of_another_config_is_rejected() -> None:
    other = replace(CFG, name="other", n_query_groups=4)  # MHA checkpoint, GQA config: QKV rows differ
    with pytest.raises(SmdmError, match=r"for config tiny-gqa.*attn\.attn\.weight.*shape"):
        smdm_state_dict_to_ours(random_smdm_state_dict(other), CFG)
    with pytest.raises(SmdmError, match=r"not an SMDM checkpoint for config tiny-gqa: missing key .*"
                                        r"unexpected key 'model\.embed_tokens\.weight'"):
        smdm_state_dict_to_ours(ours_to_hf_llama_state_dict(Transformer(CFG).state_dict(), CFG), CFG)


def test_load_smdm_checkpoint_safetensors_and_pth(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = random_smdm_state_dict(CFG)
    idx = sample_ids(CFG)
    with torch.no_grad():
        expected = ref_forward(sd, CFG, idx, causal=False)
    st = tmp_path / "model.safetensors"
    save_file(sd, str(st))
    model, cfg = load_smdm_checkpoint(st, CFG)
    assert cfg == CFG and not model.causal
    with torch.no_grad():
        torch.testing.assert_close(model(idx), expected, atol=1e-5, rtol=1e-5)
    pth = tmp_path / "iter-001000-ckpt.pth"
    torch.save({"model": sd, "iter_num": 1000}, pth)
    model, _ = load_smdm_checkpoint(str(pth), CFG)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), expected, atol=1e-5, rtol=1e-5)


def test_load_smdm_checkpoint_by_name(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    cfg = ModelConfig.from_name("tiny-test", vocab_size=40)
    sd = random_smdm_state_dict(cfg)
    save_file(sd, str(tmp_path / "m.safetensors"))
    model, got = load_smdm_checkpoint(tmp_path / "m.safetensors", "tiny-test", vocab_size=40)
    assert got == cfg and torch.equal(model.embed.weight.detach(), sd["transformer.wte.weight"])
    with pytest.raises(SmdmError, match="not an SMDM checkpoint for config tiny-test"):
        load_smdm_checkpoint(tmp_path / "m.safetensors", "tiny-test")  # default vocab 32000


def test_unreadable_files_raise_smdm_error(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file(random_smdm_state_dict(CFG), str(good))
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(SmdmError, match="truncated"):
        load_smdm_checkpoint(truncated, CFG)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x07")
    with pytest.raises(SmdmError, match="cannot read"):
        load_smdm_checkpoint(garbage, CFG)
    pth = tmp_path / "truncated.pth"
    torch.save(random_smdm_state_dict(CFG), pth)
    pth.write_bytes(pth.read_bytes()[:100])
    with pytest.raises(SmdmError, match="cannot read"):
        load_smdm_checkpoint(pth, CFG)
    with pytest.raises(SmdmError, match="does not exist"):
        load_smdm_checkpoint(tmp_path / "absent.safetensors", CFG)
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(SmdmError, match="unknown extension"):
        load_smdm_checkpoint(tmp_path / "weights.npz", CFG)
