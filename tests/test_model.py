"""The Transformer: parameter counts of the paper's table, causality, the [MASK] row, the KV cache."""

from __future__ import annotations

import pytest
import torch

from smdm.config import CONFIGS, PAPER_SIZES_M, ModelConfig, non_embedding_params, total_params
from smdm.errors import SmdmError
from smdm.model import Transformer


def tiny(**overrides) -> ModelConfig:
    return ModelConfig.from_name("tiny-test", vocab_size=97, **overrides)


@pytest.mark.parametrize("size", PAPER_SIZES_M)
def test_paper_configs_reproduce_reported_non_embedding_params(size):
    # The paper names each model by its non-embedding parameter count in millions.
    config = CONFIGS[f"smdm-{size}m"]
    assert round(non_embedding_params(config) / 1e6) == size
    assert config.block_size == 2048 and config.vocab_size == 32000


def test_reported_figures_to_one_decimal():
    assert round(non_embedding_params(CONFIGS["smdm-170m"]) / 1e6, 1) == 169.9
    assert round(non_embedding_params(CONFIGS["smdm-1028m"]) / 1e6, 1) == 1027.7
    c = CONFIGS["smdm-1028m"]
    assert (c.n_layer, c.n_head, c.n_embd, c.intermediate_size) == (20, 14, 1792, 7168)


def test_parameter_count_matches_module():
    config = tiny(n_query_groups=2)
    model = Transformer(config)
    assert sum(p.numel() for p in model.parameters()) == total_params(config)
    assert model.embed.weight.shape[0] == config.vocab_size + 1  # [MASK] row
    assert model.lm_head.weight.shape[0] == config.vocab_size  # never predicts [MASK]


def test_unknown_config_name_is_a_clear_error():
    with pytest.raises(SmdmError, match="unknown config"):
        ModelConfig.from_name("smdm-7b")


@pytest.mark.parametrize("n_query_groups", [4, 2, 1])
def test_causal_output_ignores_future_tokens(n_query_groups):
    torch.manual_seed(0)
    model = Transformer(tiny(n_query_groups=n_query_groups), causal=True).eval()
    x = torch.randint(0, 97, (2, 16))
    y = x.clone()
    y[:, 9:] = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_bidirectional_output_depends_on_future_tokens():
    torch.manual_seed(0)
    model = Transformer(tiny(), causal=False).eval()
    x = torch.randint(0, 97, (1, 16))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 97
    with torch.no_grad():
        a, b = model(x), model(y)
    assert not torch.allclose(a[:, 0], b[:, 0])


def test_mask_token_is_a_valid_input():
    model = Transformer(tiny()).eval()
    x = torch.full((1, 8), model.mask_id)
    assert model(x).shape == (1, 8, 97)


def test_kv_cache_decoding_equals_full_forward():
    torch.manual_seed(0)
    model = Transformer(tiny(n_query_groups=2), causal=True).eval()
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(x)
        model.setup_kv_cache(2, 16)
        parts = [model(x[:, :5], torch.arange(5))]
        parts += [model(x[:, i:i + 1], torch.tensor([i])) for i in range(5, 12)]
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_needs_causal_model():
    with pytest.raises(SmdmError):
        Transformer(tiny(), causal=False).setup_kv_cache(1)


def test_sequence_longer_than_block_size_is_rejected():
    model = Transformer(tiny(block_size=8))
    with pytest.raises(SmdmError, match="longer than the context length"):
        model(torch.zeros(1, 9, dtype=torch.long))


# --- Knobs of imported architectures (mask id inside the vocabulary, q/k/v biases, tied head, shifted) -------------

def test_mask_token_inside_the_vocabulary_adds_no_row():
    config = tiny(mask_token_id=90)
    model = Transformer(config)
    assert model.mask_id == 90 and config.embedding_rows == 97
    assert model.embed.weight.shape[0] == model.lm_head.weight.shape[0] == 97
    assert sum(p.numel() for p in model.parameters()) == total_params(config)
    with pytest.raises(SmdmError, match="outside the vocabulary"):
        tiny(mask_token_id=97)


def test_tied_head_is_the_embedding_and_is_saved_once():
    for mask_token_id in (None, 5):
        config = tiny(tie_embeddings=True, mask_token_id=mask_token_id)
        model = Transformer(config)
        assert "lm_head.weight" not in model.state_dict()
        assert sum(p.numel() for p in model.parameters()) == total_params(config)
        x = torch.randint(0, 97, (1, 9))
        h = model.norm(torch.stack([model.embed(x)]).squeeze(0))  # any hidden state: the head is embed[:vocab]
        expected = h @ model.embed.weight[: config.vocab_size].T
        torch.testing.assert_close(model.lm_head(h), expected, rtol=0, atol=0)
        model.embed.weight.data[3].fill_(1.0)
        assert torch.equal(model.lm_head.weight[3], model.embed.weight[3])


def test_qkv_bias_is_added_to_queries_keys_and_values():
    config = tiny(qkv_bias=True)
    model = Transformer(config)
    assert model.blocks[0].attn.qkv.bias.shape == ((4 + 2 * 4) * 16,)
    assert sum(p.numel() for p in model.parameters()) == total_params(config)
    x = torch.randint(0, 97, (1, 9))
    before = model(x)
    with torch.no_grad():
        model.blocks[0].attn.qkv.bias.normal_()
    assert not torch.allclose(model(x), before)


def test_shifted_model_logit_i_is_the_networks_output_at_i_minus_1():
    torch.manual_seed(0)
    plain = Transformer(tiny())
    shifted = Transformer(tiny(shifted=True))
    shifted.load_state_dict(plain.state_dict())
    x = torch.randint(0, 97, (2, 12))
    out, raw = shifted(x), plain(x)
    torch.testing.assert_close(out[:, 1:], raw[:, :-1], rtol=0, atol=0)
    torch.testing.assert_close(out[:, :1], raw[:, :1], rtol=0, atol=0)  # Dream's sampler keeps position 0
    select = torch.zeros_like(x, dtype=torch.bool)
    select[:, 5] = True
    torch.testing.assert_close(shifted(x, select=select), raw[:, 4], rtol=1e-5, atol=1e-6)
    with pytest.raises(SmdmError, match="shifted"):
        Transformer(tiny(shifted=True), causal=True)


def test_shifted_window_pass_takes_position_start_minus_1_from_the_recording_pass():
    from smdm.model import WindowCache

    torch.manual_seed(0)
    model = Transformer(tiny(shifted=True, n_layer=1))  # one layer: the window cache is exact
    x = torch.randint(0, 97, (1, 16))
    positions = torch.arange(16)[None]
    window = WindowCache(1, 6, 10)
    full = model(x, positions=positions, window=window)
    windowed = model(x[:, 6:10], positions=positions[:, 6:10], window=window)
    torch.testing.assert_close(windowed, full[:, 6:10], rtol=1e-5, atol=1e-5)
