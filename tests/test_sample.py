"""Samplers: toy models with known predictions reveal exactly the expected positions; caches, batching and CFG are
checked against the plain computation; bad input is one SmdmError (one CLI line, exit 2)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_one_line_error, run_cli

from smdm.config import ModelConfig
from smdm.errors import SmdmError
from smdm.model import Transformer
from smdm.sample import (
    generate,
    num_transfer_tokens,
    tokens_to_reveal,
    top_p_filter,
)

VOCAB = 11
EOS = 0


def tiny(**overrides) -> ModelConfig:
    return ModelConfig.from_name("tiny-test", vocab_size=VOCAB, **overrides)


class TablePredictor(Transformer):
    """A toy model whose prediction at each position comes from a table: (token, probability) per position.

    Positions are what the sampler says they are (`positions`, else KV-cache slots, else 0..T-1), so the toy also
    runs padded, cached and windowed.
    """

    def __init__(self, table: dict[int, tuple[int, float]], causal: bool = False) -> None:
        super().__init__(tiny(), causal=causal)
        self.table = table
        self.calls: list[torch.Tensor] = []

    def forward(self, idx, input_pos=None, select=None, *, positions=None, key_mask=None, window=None):
        self.calls.append(idx.clone())
        batch, length = idx.shape
        if positions is None:
            positions = (input_pos if input_pos is not None else torch.arange(length)).expand(batch, length)
        logits = torch.empty(batch, length, VOCAB)
        for row in range(batch):
            for col in range(length):
                token, prob = self.table.get(int(positions[row, col]), (1, 0.5))
                logits[row, col] = torch.tensor((1 - prob) / (VOCAB - 1)).log()
                logits[row, col, token] = torch.tensor(prob).log()
        return logits


class ConfidenceByPosition(TablePredictor):
    """Predicts token i % VOCAB at position i, more confidently the further right."""

    def __init__(self, length: int = 64) -> None:
        super().__init__({i: (i % VOCAB, 0.1 + 0.8 * i / length) for i in range(length)})


def revealed_per_step(model: Transformer, history: list[torch.Tensor], start: int) -> list[set[int]]:
    """Columns (from `start`) that became unmasked at each step, for row 0."""
    seen: set[int] = set()
    steps = []
    for x in history:
        now = set((x[0, start:] != model.mask_id).nonzero().flatten().tolist())
        steps.append(now - seen)
        seen = now
    return steps


def record(history: list[torch.Tensor]):
    return lambda step, x: history.append(x.clone())


def random_model(causal: bool = False, n_layer: int = 2, seed: int = 0) -> Transformer:
    """Random weights with a large spread, so predictions and confidences are far from ties."""
    torch.manual_seed(seed)
    model = Transformer(tiny(n_layer=n_layer, n_query_groups=2), causal=causal).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3)
    return model


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [6]]


# --- schedules and token choice -------------------------------------------------------------------------------

def test_schedule_reveals_every_token_evenly():
    schedule = num_transfer_tokens(torch.tensor([10, 7]), 4)
    assert schedule.tolist() == [[3, 3, 2, 2], [2, 2, 2, 1]]


def test_adaptive_share_equals_the_even_schedule_when_nothing_extra_is_revealed():
    for masked, steps in [(10, 4), (7, 4), (256, 64), (5, 5), (33, 8)]:
        left, shares = torch.tensor([masked]), []
        for step in range(steps):
            shares.append(int(tokens_to_reveal(left, steps - step)))
            left -= shares[-1]
        assert shares == num_transfer_tokens(torch.tensor([masked]), steps)[0].tolist()


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.isfinite(top_p_filter(logits, 0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.9)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(top_p_filter(logits, 0.4)).tolist() == [[True, False, False, False]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


# --- MDM samplers on toy models: exactly the expected positions per step --------------------------------------

def test_low_confidence_reveals_most_confident_positions_first():
    model = ConfidenceByPosition().eval()
    history: list[torch.Tensor] = []
    out = generate(model, torch.tensor([3, 4]), 6, 3, on_step=record(history)).tokens
    assert revealed_per_step(model, history, 2) == [{4, 5}, {2, 3}, {0, 1}]  # rightmost (most confident) first
    assert out[0, :2].tolist() == [3, 4]  # the prompt is never changed
    assert out[0, 2:].tolist() == [i % VOCAB for i in range(2, 8)]
    assert not (out == model.mask_id).any()


def test_semi_autoregressive_blocks_go_left_to_right():
    model = ConfidenceByPosition().eval()
    history: list[torch.Tensor] = []
    result = generate(model, [3, 4], 8, steps=4, block_length=4, on_step=record(history))
    # Positions 8, 9 are the most confident overall, but the first block (2..5) is finished first.
    assert revealed_per_step(model, history, 2) == [{2, 3}, {0, 1}, {6, 7}, {4, 5}]
    assert result.completions == [[i % VOCAB for i in range(2, 10)]] and result.forward_passes == 4


CONFIDENCES = [0.2, 0.95, 0.3, 0.99, 0.1, 0.6, 0.97, 0.4]


@pytest.mark.parametrize("steps, expected", [
    (8, [{1, 3, 6}, {5}, {7}, {2}, {0}, {4}]),  # everything above 0.9 at once, then one per step; 6 passes, not 8
    (4, [{1, 3, 6}, {5, 7}, {0, 2}, {4}]),  # at least the even share of what is left: ceil(5/3), ceil(3/2), 1
])
def test_threshold_decoding_reveals_every_confident_token(steps, expected):
    model = TablePredictor({i: (5, p) for i, p in enumerate(CONFIDENCES)}).eval()
    history: list[torch.Tensor] = []
    result = generate(model, [[]], 8, steps=steps, threshold=0.9, on_step=record(history))
    assert revealed_per_step(model, history, 0) == expected
    assert result.forward_passes == len(expected) and result.completions == [[5] * 8]


def test_random_remasking_reveals_each_masked_token_with_probability_one_minus_s_over_t():
    model = ConfidenceByPosition().eval()
    rows, length, steps = 150, 16, 4
    history: list[torch.Tensor] = []
    result = generate(model, torch.zeros(rows, 0, dtype=torch.long), length, steps=steps, remasking="random",
                      generator=torch.Generator().manual_seed(0), on_step=record(history))
    still_masked = rows * length
    for step, x in enumerate(history):
        now_masked = int((x == model.mask_id).sum())
        fraction = (still_masked - now_masked) / still_masked
        expected = 1 / (steps - step)  # t = 1 - step/steps -> s = t - 1/steps: (t - s) / t
        assert abs(fraction - expected) < 4 * (expected * (1 - expected) / still_masked) ** 0.5 + 1e-9, (step, fraction)
        still_masked = now_masked
    assert still_masked == 0  # the last step (s = 0) reveals everything
    assert result.tokens.tolist() == [[i % VOCAB for i in range(length)]] * rows  # values are the predictions


class GuidanceProbe(TablePredictor):
    """Prefers token 1 slightly over 2 when it sees token 7 (the prompt), token 1 strongly when it does not."""

    def __init__(self) -> None:
        super().__init__({})

    def forward(self, idx, input_pos=None, select=None, **inputs):
        self.calls.append(idx.clone())
        prompt_visible = (idx == 7).any(dim=1)
        logits = torch.zeros(idx.size(0), idx.size(1), VOCAB)
        logits[..., 1] = 2.0
        logits[..., 2] = torch.where(prompt_visible, 1.9, 0.0)[:, None]
        return logits


@pytest.mark.parametrize("cfg_scale, token", [(None, 1), (0.0, 1), (2.0, 2)])
def test_cfg_is_one_batched_pass_with_the_prompt_masked(cfg_scale, token):
    model = GuidanceProbe().eval()
    result = generate(model, [[7, 3, 4], [7]], 4, steps=2, cfg_scale=cfg_scale)
    # uncond + (w + 1)(cond - uncond): for token 2, 0 + 3 * 1.9 = 5.7 > 2 at w = 2; w = 0 is the conditional model.
    assert result.completions == [[token] * 4] * 2
    assert len(model.calls) == result.forward_passes == 2
    first = model.calls[0]
    if cfg_scale is None:
        assert first.size(0) == 2
        return
    assert first.size(0) == 4  # conditional and unconditional rows in one forward pass
    mask = model.mask_id
    assert first[:2].tolist() == [[7, 3, 4] + [mask] * 4, [0, 0, 7] + [mask] * 4]
    assert first[2:].tolist() == [[mask] * 7, [0, 0] + [mask] * 5]  # prompt masked, left padding kept


def test_cfg_zero_equals_no_cfg_on_a_real_model():
    model = random_model()
    plain = generate(model, PROMPTS, 16, steps=8, block_length=8)
    guided = generate(model, PROMPTS, 16, steps=8, block_length=8, cfg_scale=0.0)
    assert torch.equal(plain.tokens, guided.tokens)
    assert not torch.equal(plain.tokens, generate(model, PROMPTS, 16, steps=8, block_length=8, cfg_scale=3.0).tokens)


def test_text_after_the_first_eos_is_dropped_and_early_stop_changes_nothing():
    tokens = [5, 6, EOS, 7, EOS, EOS, EOS, EOS]
    model = TablePredictor({i: (t, 0.9 - 0.01 * i) for i, t in enumerate(tokens)}).eval()
    full = generate(model, [[]], 8, steps=8, block_length=2, eos_id=EOS)
    early = generate(model, [[]], 8, steps=8, block_length=2, eos_id=EOS, stop_at_eos=True)
    assert full.completions == early.completions == [[5, 6]]
    assert (full.forward_passes, early.forward_passes) == (8, 4)  # stopped after the block holding the EOS
    assert early.tokens[0].tolist() == [5, 6, EOS, 7, EOS, EOS, EOS, EOS]  # the rest is EOS, never [MASK]


def test_arm_eos_truncation_and_early_stop():
    # The token after position p is table[p]: 1 by default, 4 after position 2, EOS after position 3.
    model = TablePredictor({2: (4, 0.9), 3: (EOS, 0.9)}, causal=True).eval()
    full = generate(model, [[3, 3], [3]], 6, eos_id=EOS)
    early = generate(model, [[3, 3], [3]], 6, eos_id=EOS, stop_at_eos=True)
    assert full.completions == early.completions == [[1, 4], [1, 1, 4]]
    assert (full.forward_passes, early.forward_passes) == (6, 4)  # stopped once the shorter prompt's row hit EOS
    assert early.tokens[:, 2:].tolist() == [[1, 4, EOS, 1, EOS, EOS], [1, 1, 4, EOS, EOS, EOS]]  # rest: EOS


# --- every sampler finishes; batching, caching and CFG against the plain computation --------------------------

SAMPLERS = [
    {"steps": 16},
    {"steps": 4},
    {"steps": 8, "block_length": 4},
    {"steps": 8, "block_length": 4, "remasking": "random", "temperature": 1.0},
    {"steps": 16, "block_length": 8, "threshold": 0.3, "cache": "dual"},
    {"steps": 4, "block_length": 8, "cache": "prefix", "cfg_scale": 1.5, "temperature": 0.7, "top_p": 0.9},
]


@pytest.mark.parametrize("options", SAMPLERS, ids=str)
def test_no_mask_remains_after_the_last_step(options):
    model = random_model()
    result = generate(model, PROMPTS, 16, generator=torch.Generator().manual_seed(1), **options)
    assert not (result.tokens == model.mask_id).any()
    assert result.forward_passes <= options["steps"]
    assert result.tokens.shape == (3, 7 + 16) and [len(c) for c in result.completions] == [16] * 3
    for row, prompt in enumerate(PROMPTS):  # prompts kept, left-padded
        assert result.tokens[row, 7 - len(prompt):7].tolist() == prompt


@pytest.mark.parametrize("options", [s for s in SAMPLERS if s.get("temperature", 0) == 0]
                         + [{"steps": 16, "block_length": 4, "cfg_scale": 2.0, "cache": "dual", "threshold": 0.2}],
                         ids=str)
def test_a_batched_row_equals_the_prompt_alone(options):
    model = random_model()
    batched = generate(model, PROMPTS, 16, **options)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], 16, **options)
        assert batched.completions[row] == alone.completions[0], (row, options)


def test_arm_batched_row_equals_the_prompt_alone():
    model = random_model(causal=True)
    batched = generate(model, PROMPTS, 12)
    assert batched.completions == [generate(model, [p], 12).completions[0] for p in PROMPTS]


def widths_seen(model: Transformer) -> list[int]:
    """Wrap model.forward to record the width of every input: what the sampler really recomputes."""
    widths: list[int] = []
    forward = model.forward
    model.forward = lambda idx, *args, **kwargs: (widths.append(idx.size(1)), forward(idx, *args, **kwargs))[1]
    return widths


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("options", [{}, {"threshold": 0.5}, {"cfg_scale": 1.0}], ids=str)
def test_window_cache_is_exact_for_a_one_layer_model(cache, options):
    # First-layer keys depend on the token and its position only, so reusing them is exact here.
    model = random_model(n_layer=1)
    plain = generate(model, PROMPTS, 16, steps=16, block_length=4, **options)
    widths = widths_seen(model)
    cached = generate(model, PROMPTS, 16, steps=16, block_length=4, cache=cache, **options)
    assert cached.completions == plain.completions
    # 3 prompts padded to 7 + 16 = 23 columns; a step after a block's first reuses the rest: it recomputes
    # the block and the masked suffix (prefix cache: 16, 12, 8, 4 columns) or the block alone (dual cache).
    window = {"prefix": [16, 12, 8, 4], "dual": [4] * 4}[cache]
    assert widths[:2] == [23, window[0]]  # one full pass records, later steps reuse
    assert set(widths) <= set(window) | {23} and widths.count(23) == 4  # one refresh per block
    assert len(widths) == cached.forward_passes


def test_window_cache_is_exact_when_every_block_takes_one_step():
    model = random_model(n_layer=2)
    plain = generate(model, PROMPTS, 16, steps=4, block_length=4)
    for cache in ("prefix", "dual"):
        assert generate(model, PROMPTS, 16, steps=4, block_length=4, cache=cache).completions == plain.completions


def test_window_cache_keys_and_values_match_a_full_pass_for_one_layer():
    from smdm.model import WindowCache

    model = random_model(n_layer=1)
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        full = model(x)
        window = WindowCache(1, 4, 8)
        model(x, window=window)
        part = model(x[:, 4:8], positions=torch.arange(4, 8).expand(2, 4), window=window)
    torch.testing.assert_close(part, full[:, 4:8], atol=1e-5, rtol=1e-5)


def test_arm_kv_cache_matches_full_recompute():
    torch.manual_seed(0)
    model = Transformer(tiny(), causal=True).eval()
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    cached = generate(model, prompt, 8).tokens
    x = prompt
    with torch.no_grad():
        for _ in range(8):
            x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, x)


def test_arm_kv_cache_equals_no_cache_on_prompts_of_different_lengths():
    model = random_model(causal=True)
    cached = generate(model, PROMPTS, 12)
    uncached = generate(model, PROMPTS, 12, cache="none")
    assert torch.equal(cached.tokens, uncached.tokens) and cached.forward_passes == uncached.forward_passes == 12


def test_arm_sampling_is_seeded_and_top_p_narrows_it():
    model = random_model(causal=True)

    def draw(seed: int, **options) -> torch.Tensor:
        return generate(model, PROMPTS, 12, temperature=1.0, generator=torch.Generator().manual_seed(seed),
                        **options).tokens

    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))
    greedy = generate(model, PROMPTS, 12).tokens
    assert torch.equal(draw(3, top_p=1e-6), greedy)  # a nucleus of one token is greedy decoding


def test_trained_shape_model_leaves_no_mask_and_is_deterministic():
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    a = generate(model, torch.tensor([1, 2]), 10, 4, 1.0, torch.Generator().manual_seed(5)).tokens
    b = generate(model, torch.tensor([1, 2]), 10, 4, 1.0, torch.Generator().manual_seed(5)).tokens
    assert torch.equal(a, b) and not (a == model.mask_id).any()


# --- bad input ------------------------------------------------------------------------------------------------

def test_sampler_bad_input():
    mdm = Transformer(tiny()).eval()
    arm = Transformer(tiny(), causal=True).eval()
    with pytest.raises(SmdmError, match="exceed the context length"):
        generate(mdm, torch.zeros(120, dtype=torch.long), 20, 4)
    with pytest.raises(SmdmError, match="steps"):
        generate(mdm, torch.tensor([1]), 4, 0)
    with pytest.raises(SmdmError, match="temperature"):
        generate(mdm, torch.tensor([1]), 4, 4, temperature=-1)
    with pytest.raises(SmdmError, match="ARM"):
        generate(arm, torch.tensor([1]), 4, 4)


@pytest.mark.parametrize("causal, options, message", [
    (False, {"steps": 0}, "steps must be at least 1"),
    (False, {"steps": 17}, "exceed the generation length"),
    (False, {"block_length": 5}, "must divide the generation length"),
    (False, {"steps": 6, "block_length": 4}, "multiple of the number of blocks"),
    (False, {"temperature": -0.5}, "temperature"),
    (False, {"top_p": 0.0}, "top_p"),
    (False, {"threshold": 0.5, "remasking": "random"}, "low_confidence"),
    (False, {"threshold": 1.5}, "threshold"),
    (False, {"cache": "kv"}, "unknown MDM cache"),
    (False, {"remasking": "greedy"}, "unknown remasking"),
    (False, {"stop_at_eos": True}, "EOS id"),
    (True, {"cfg_scale": 1.0}, "classifier-free guidance needs an MDM"),
    (True, {"steps": 4}, "MDM option"),
    (True, {"cache": "dual"}, "unknown ARM cache"),
])
def test_generate_refuses_bad_options(causal, options, message):
    model = Transformer(tiny(), causal=causal).eval()
    with pytest.raises(SmdmError, match=message):
        generate(model, [1, 2], 16, **options)


def test_generate_refuses_bad_prompts():
    mdm, arm = Transformer(tiny()).eval(), Transformer(tiny(), causal=True).eval()
    with pytest.raises(SmdmError, match="exceed the context length"):
        generate(mdm, [[1], [1] * 113], 16)  # 113 + 16 > 128: the longest prompt of a batch counts
    generate(arm, [[1] * 113], 16)  # an ARM never feeds its last token back: 113 + 16 - 1 positions fit
    with pytest.raises(SmdmError, match="exceed the context length"):
        generate(arm, [[1] * 114], 16)
    with pytest.raises(SmdmError, match="at least one token"):
        generate(arm, [[1], []], 4)
    from dataclasses import replace

    from smdm.sample import prepare_prompts
    shifted = Transformer(replace(tiny(), shifted=True)).eval()
    assert prepare_prompts(arm, [[], [3]], 0) == prepare_prompts(shifted, [[], [3]], 0) == [[0], [3]]
    assert prepare_prompts(mdm, [[], [3]], 0) == [[], [3]]
    with pytest.raises(SmdmError, match="vocabulary"):
        generate(mdm, [[1, VOCAB]], 4)  # [MASK] is not a prompt token
    with pytest.raises(SmdmError, match="no prompts"):
        generate(mdm, [], 4)


# --- the CLI --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(toy_data, tmp_path_factory):
    """An untrained MDM and ARM (tiny-test, block size 128) with the toy tokenizer: fast to make, real to load."""
    from serving import untrained_checkpoints

    return untrained_checkpoints(toy_data, tmp_path_factory.mktemp("sample-cli"))


def test_cli_samples_prompts_from_arguments_and_a_file(capsys, tmp_path, checkpoints):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "the quick brown fox jumps"}) + "\n\n" + json.dumps({"prompt": "ä"}) + "\n")
    out = tmp_path / "samples.jsonl"
    code, stdout, err = run_cli(capsys, "sample", "--checkpoint", str(checkpoints["mdm"]), "--prompt", "the cat",
                                "--prompts-file", str(prompts), "--out", str(out), "--length", "8", "--steps", "4",
                                "--block-length", "4", "--cache", "dual", "--threshold", "0.9", "--cfg-scale", "0.5",
                                "--batch-size", "2")
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in records] == ["the cat", "the quick brown fox jumps", "ä"]
    assert all(isinstance(r["completion"], str) and r["tokens"] <= 8 for r in records)
    assert stdout == ""


def test_cli_show_steps_and_arm(capsys, checkpoints):
    code, stdout, err = run_cli(capsys, "sample", "--checkpoint", str(checkpoints["mdm"]), "--prompt", "the cat",
                                "--length", "6", "--steps", "3", "--show-steps")
    assert code == 0, err
    steps = err.strip().splitlines()
    assert len(steps) == 3 and steps[0].startswith("[prompt 1 step   1]") and "[MASK]" in steps[0]
    assert "[MASK]" not in steps[-1]
    assert json.loads(stdout)["prompt"] == "the cat"
    code, stdout, err = run_cli(capsys, "sample", "--checkpoint", str(checkpoints["arm"]), "--prompt", "the cat",
                                "--prompt", "", "--length", "5", "--temperature", "0.8", "--top-p", "0.9")
    assert code == 0, err
    assert [json.loads(line)["prompt"] for line in stdout.splitlines()] == ["the cat", ""]


@pytest.mark.parametrize("objective, args, fragments", [
    ("mdm", ["--prompt", "the cat sat on the mat " * 30], ("exceed the context length",)),
    ("mdm", ["--steps", "0"], ("--steps: must be at least 1",)),
    ("mdm", ["--steps", "3", "--block-length", "4"], ("multiple of the number of blocks",)),
    ("mdm", ["--block-length", "3"], ("must divide",)),
    ("mdm", ["--temperature", "-1"], ("temperature",)),
    ("arm", ["--cfg-scale", "1.5"], ("classifier-free guidance needs an MDM",)),
    ("arm", ["--threshold", "0.9"], ("MDM option",)),
    ("mdm", ["--batch-size", "0"], ("--batch-size",)),
])
def test_cli_bad_sampling_options(capsys, tmp_path, checkpoints, objective, args, fragments):
    out = tmp_path / "samples.jsonl"
    code, stdout, err = run_cli(capsys, "sample", "--checkpoint", str(checkpoints[objective]), "--length", "8",
                                "--out", str(out), *args)
    assert_one_line_error(code, err, *fragments)
    assert not out.exists() and stdout == ""


@pytest.mark.parametrize("content, fragments", [
    (b"", ("no prompts",)),
    (b"\n  \n", ("no prompts",)),
    ('{"prompt": "caf\xe9"}\n'.encode("latin-1"), ("not UTF-8",)),
    (b'{"prompt": "ok"}\nnot json\n', ("line 2", "not JSON")),
    (b'{"text": "no prompt field"}\n', ("line 1", "\"prompt\"")),
])
def test_cli_bad_prompt_files(capsys, tmp_path, checkpoints, content, fragments):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(content)
    code, stdout, err = run_cli(capsys, "sample", "--checkpoint", str(checkpoints["mdm"]), "--prompts-file",
                                str(prompts), "--length", "4")
    assert_one_line_error(code, err, "prompts.jsonl", *fragments)
    assert stdout == ""


def test_cli_missing_prompt_file(capsys, tmp_path, checkpoints):
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(checkpoints["mdm"]), "--prompts-file",
                           str(tmp_path / "nope.jsonl"))
    assert_one_line_error(code, err, "nope.jsonl")
