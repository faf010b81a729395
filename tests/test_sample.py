"""Minimal samplers: low-confidence remasking reveals the most confident tokens; ARM KV cache == no cache."""

from __future__ import annotations

import pytest
import torch

from smdm.config import ModelConfig
from smdm.errors import SmdmError
from smdm.model import Transformer
from smdm.sample import arm_generate, mdm_generate, num_transfer_tokens

VOCAB = 11


class ConfidenceByPosition(Transformer):
    """A toy MDM whose prediction at position i is token i % VOCAB with confidence growing with i."""

    def forward(self, idx, input_pos=None):
        batch, length = idx.shape
        logits = torch.full((batch, length, VOCAB), -10.0)
        for i in range(length):
            logits[:, i, i % VOCAB] = float(i)  # later positions are more confident
        return logits


def test_schedule_reveals_every_token_evenly():
    schedule = num_transfer_tokens(torch.tensor([10, 7]), 4)
    assert schedule.tolist() == [[3, 3, 2, 2], [2, 2, 2, 1]]


def test_low_confidence_reveals_most_confident_positions_first():
    model = ConfidenceByPosition(ModelConfig.from_name("tiny-test", vocab_size=VOCAB)).eval()
    prompt = torch.tensor([3, 4])
    history = []
    out = mdm_generate(model, prompt, gen_length=6, steps=3, on_step=lambda s, x: history.append(x.clone()))
    revealed = [set((h[0] != model.mask_id).nonzero().flatten().tolist()) - {0, 1} for h in history]
    assert revealed == [{6, 7}, {4, 5, 6, 7}, {2, 3, 4, 5, 6, 7}]  # two per step, most confident (rightmost) first
    assert out[0, :2].tolist() == [3, 4]  # the prompt is never changed
    assert out[0, 2:].tolist() == [i % VOCAB for i in range(2, 8)]
    assert not (out == model.mask_id).any()


def test_trained_shape_model_leaves_no_mask_and_is_deterministic():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-test", vocab_size=VOCAB)).eval()
    a = mdm_generate(model, torch.tensor([1, 2]), 10, steps=4, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = mdm_generate(model, torch.tensor([1, 2]), 10, steps=4, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not (a == model.mask_id).any()


def test_arm_kv_cache_matches_full_recompute():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-test", vocab_size=VOCAB), causal=True).eval()
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    cached = arm_generate(model, prompt, 8)
    x = prompt
    with torch.no_grad():
        for _ in range(8):
            x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, x)


def test_sampler_bad_input():
    mdm = Transformer(ModelConfig.from_name("tiny-test", vocab_size=VOCAB)).eval()
    arm = Transformer(ModelConfig.from_name("tiny-test", vocab_size=VOCAB), causal=True).eval()
    with pytest.raises(SmdmError, match="exceed the block size"):
        mdm_generate(mdm, torch.zeros(120, dtype=torch.long), 20, 4)
    with pytest.raises(SmdmError, match="steps"):
        mdm_generate(mdm, torch.tensor([1]), 4, 0)
    with pytest.raises(SmdmError, match="temperature"):
        mdm_generate(mdm, torch.tensor([1]), 4, 4, temperature=-1)
    with pytest.raises(SmdmError, match="ARM"):
        mdm_generate(arm, torch.tensor([1]), 4, 4)
