"""Supervised fine-tuning: the prompt stays clean and out of the loss, prompt dropout, data preparation, `smdm sft`."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, run_cli

from smdm.config import ModelConfig
from smdm.data.sft import SFTConfig, SFTDataset, chat_prompt, prepare_sft, read_examples
from smdm.diffusion import arm_sft_step_loss, mask_probability, mdm_sft_step_loss, sample_times
from smdm.errors import SmdmError
from smdm.model import Transformer
from smdm.tokenizer import Tokenizer

MASK = 99


class Spy(torch.nn.Module):
    """Records what the objective feeds the network; returns fixed random logits (vocab 100)."""

    mask_id = MASK

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, idx: torch.Tensor, select: torch.Tensor | None = None) -> torch.Tensor:
        self.calls.append((idx.clone(), None if select is None else select.clone()))
        logits = torch.randn(*idx.shape, 100, generator=torch.Generator().manual_seed(5)) * self.scale
        return logits[select] if select is not None else logits


def _rows(batch: int = 64, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 90, (batch, length), generator=generator)
    prompt_lengths = torch.randint(1, length - 1, (batch,), generator=generator)
    return tokens, prompt_lengths


def test_mdm_sft_never_masks_the_prompt_and_computes_the_normalised_loss():
    tokens, prompt_lengths = _rows()
    spy = Spy()
    loss = mdm_sft_step_loss(spy, tokens, prompt_lengths, torch.Generator().manual_seed(3))
    noisy, select = spy.calls[0]
    prompt = torch.arange(tokens.size(1))[None] < prompt_lengths[:, None]
    assert torch.equal(noisy[prompt], tokens[prompt])  # prompt tokens are given, clean
    assert not select[prompt].any()  # and never targets
    assert torch.equal(select, noisy == MASK)
    assert select.sum() > 0
    # The same draws by hand: t first, then the Bernoulli masks.
    generator = torch.Generator().manual_seed(3)
    p = mask_probability(sample_times(tokens.size(0), generator))
    draws = torch.rand(tokens.shape, generator=generator)
    assert torch.equal(select, (draws < p[:, None]) & ~prompt)
    logits = torch.randn(*tokens.shape, 100, generator=torch.Generator().manual_seed(5))
    ce = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none").view(tokens.shape)
    per_row = (ce * select / p[:, None]).sum(1) / (tokens.size(1) - prompt_lengths)
    torch.testing.assert_close(loss, per_row.mean(), rtol=1e-5, atol=1e-6)


def test_prompt_tokens_carry_no_gradient_through_the_loss_targets():
    """Changing a prompt token's *identity as a target* cannot matter: only response positions are scored."""
    tokens, prompt_lengths = _rows(8)
    spy = Spy()
    a = mdm_sft_step_loss(spy, tokens, prompt_lengths, torch.Generator().manual_seed(1))
    spy_b = Spy()
    shifted = tokens.clone()
    prompt = torch.arange(tokens.size(1))[None] < prompt_lengths[:, None]
    shifted[prompt] = (shifted[prompt] + 1) % 90
    b = mdm_sft_step_loss(spy_b, shifted, prompt_lengths, torch.Generator().manual_seed(1))
    # The spy ignores its input, so the loss differs only if a prompt position were a target.
    assert torch.equal(a, b)


def test_prompt_dropout_masks_whole_prompts_at_the_requested_rate():
    tokens, prompt_lengths = _rows(4000, 10)
    spy = Spy()
    mdm_sft_step_loss(spy, tokens, prompt_lengths, torch.Generator().manual_seed(0), prompt_dropout=0.3)
    noisy, select = spy.calls[0]
    prompt = torch.arange(tokens.size(1))[None] < prompt_lengths[:, None]
    masked_in_prompt = ((noisy == MASK) & prompt).sum(1)
    whole = masked_in_prompt == prompt_lengths
    assert torch.all((masked_in_prompt == 0) | whole)  # all or nothing per example
    rate = whole.float().mean().item()
    assert abs(rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 4000)
    assert not select[prompt].any()  # a dropped prompt is hidden, not scored


def test_arm_sft_loss_scores_only_response_targets():
    config = ModelConfig.from_name("tiny-test", vocab_size=100)
    model = Transformer(config, causal=True)
    tokens, prompt_lengths = _rows(6, 12)
    loss = arm_sft_step_loss(model, tokens, prompt_lengths)
    logits = model(tokens[:, :-1])
    expected = []
    for row in range(tokens.size(0)):
        start = int(prompt_lengths[row])  # first response token is predicted from position start - 1
        ce = F.cross_entropy(logits[row, start - 1:], tokens[row, start:])
        expected.append(ce)
    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    from smdm.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("sft_tok")
    texts = ["what is two plus two? four. what is one plus one? two. the capital of france is paris."] * 20
    return train_bpe(texts, 280, root / "tokenizer.json")


def _write(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_prepare_sft_pads_with_eos_and_records_prompt_lengths(tokenizer, tmp_path):
    data = tmp_path / "train.jsonl"
    _write(data, [{"prompt": "what is two plus two?", "completion": " four."},
                  {"question": "what is one plus one?", "answer": " two."},
                  {"messages": [{"role": "user", "content": "capital of france?"},
                                {"role": "assistant", "content": "paris."}]}])
    manifest = prepare_sft([data], tokenizer, tmp_path / "out", SFTConfig())
    rows, lengths = SFTDataset(tmp_path / "out", shuffle=False).rows()
    assert manifest["splits"]["train"]["examples"] == 3 and rows.shape[1] == manifest["seq_len"]
    texts = {tokenizer.decode(r[:n].tolist()) for r, n in zip(rows, lengths)}
    assert texts == {"what is two plus two?", "what is one plus one?", chat_prompt([("capital of france?", None)])}
    for row, n in zip(rows, lengths):
        response = row[n:].tolist()
        first_eos = response.index(tokenizer.eos_id)
        assert all(t == tokenizer.eos_id for t in response[first_eos:])  # padded with EOS
    text_mode = prepare_sft([data], tokenizer, tmp_path / "text", SFTConfig(mode="text"))
    assert text_mode["seq_len"] == manifest["seq_len"]
    assert SFTDataset(tmp_path / "text").rows()[1].eq(0).all()  # whole text is the target


def test_prepare_sft_skips_too_long_and_reports_bad_lines(tokenizer, tmp_path):
    data = tmp_path / "train.jsonl"
    _write(data, [{"prompt": "two", "completion": " four."},
                  "{not json",
                  {"prompt": "what is two plus two? " * 10, "completion": " four."},
                  {"prompt": "x"}])
    with pytest.raises(SmdmError, match=r"train.jsonl:2: bad JSON"):
        prepare_sft([data], tokenizer, tmp_path / "a", SFTConfig())
    manifest = prepare_sft([data], tokenizer, tmp_path / "b", SFTConfig(skip_bad_lines=True, max_len=16))
    assert manifest["skipped"] == {"too_long": 1, "malformed": 2}
    assert manifest["splits"]["train"]["examples"] == 1
    assert any(":4: no prompt/response fields" in p for p in manifest["problems"])
    with pytest.raises(SmdmError, match="longer than 2 tokens"):
        prepare_sft([data], tokenizer, tmp_path / "c", SFTConfig(skip_bad_lines=True, max_len=2))
    examples, _ = read_examples(data, SFTConfig(skip_bad_lines=True, template="chat"))
    assert examples[0].prompt == chat_prompt([("two", None)])


def test_sft_dataset_resumes_at_the_same_rows(tokenizer, tmp_path):
    data = tmp_path / "train.jsonl"
    _write(data, [{"prompt": f"what is {i}?", "completion": f" {i} plus two."} for i in range(13)])
    prepare_sft([data], tokenizer, tmp_path / "d", SFTConfig())
    a = SFTDataset(tmp_path / "d", seed=1)
    for _ in range(5):
        a.next_batch(4)
    b = SFTDataset(tmp_path / "d", seed=1)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(4):
        ta, la = a.next_batch(4)
        tb, lb = b.next_batch(4)
        assert torch.equal(ta, tb) and torch.equal(la, lb)


def test_batch_padding_trims_each_batch_to_its_longest_example(tokenizer, tmp_path):
    """Same rows in the same order as full-width padding, cut after the batch's longest example: only columns of
    EOS padding go, and the stored full width stays for validation."""
    data = tmp_path / "train.jsonl"
    _write(data, [{"prompt": f"what is {i}?", "completion": " two." if i % 4 else " one plus one is two, paris."}
                  for i in range(12)])
    prepare_sft([data], tokenizer, tmp_path / "longest", SFTConfig())
    prepare_sft([data], tokenizer, tmp_path / "batch", SFTConfig(padding="batch"))
    full, trimmed = SFTDataset(tmp_path / "longest", seed=2), SFTDataset(tmp_path / "batch", seed=2)
    widths = set()
    for _ in range(9):  # three epochs of batches of 4
        (a, la), (b, lb) = full.next_batch(4), trimmed.next_batch(4)
        width = b.size(1)
        widths.add(width)
        assert torch.equal(la, lb) and torch.equal(a[:, :width], b)
        assert a[:, width:].eq(tokenizer.eos_id).all()  # only padding was cut
        ends = [max(i for i, t in enumerate(row.tolist()) if t != tokenizer.eos_id) + 2 for row in b]
        assert width == max(ends)  # the longest example keeps exactly its own EOS
    assert min(widths) < full.seq_len  # batches without the long example really are shorter
    assert trimmed.rows()[0].size(1) == full.seq_len
    with pytest.raises(SmdmError, match="padding"):
        prepare_sft([data], tokenizer, tmp_path / "bad", SFTConfig(padding="shortest"))  # type: ignore[arg-type]


def _pairs(path) -> None:
    _write(path, [{"prompt": f"what is {w} plus {w}?", "completion": f" {w} and {w}."}
                  for w in ("one", "two", "four", "paris", "france", "capital")] * 4)


@pytest.mark.parametrize("objective", ["mdm", "arm"])
def test_smdm_sft_learns_the_responses(tokenizer, tmp_path, capsys, objective):
    data = tmp_path / "pairs.jsonl"
    _pairs(data)
    out = tmp_path / objective
    code, stdout, err = run_cli(capsys, "sft", "--data", str(data), "--tokenizer", str(tokenizer.path),
                                "--out", str(out), "--model", "tiny-test", "--objective", objective,
                                "--epochs", "30", "--batch-size", "8", "--lr", "3e-3", "--eval-every", "1000",
                                "--log-every", "1", "--val-fraction", "0", "--threads", "1", "--no-progress",
                                *(["--prompt-dropout", "0.1"] if objective == "mdm" else []),
                                *(["--padding", "batch"] if objective == "arm" else []))
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["steps"] == math.ceil(30 * 24 / 8)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    meta = json.loads((out / "checkpoint" / "config.json").read_text())
    assert meta["sft"] is True


def test_smdm_sft_bad_input(tokenizer, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    _pairs(data)
    common = ["--tokenizer", str(tokenizer.path), "--model", "tiny-test", "--max-steps", "1", "--no-progress"]
    code, _, err = run_cli(capsys, "sft", "--data", str(data), "--out", str(tmp_path / "a"), "--objective", "arm",
                           "--prompt-dropout", "0.2", *common)
    assert_one_line_error(code, err, "only MDMs")
    bad = tmp_path / "bad.jsonl"
    _write(bad, [{"prompt": "a", "completion": " b"}, {"prompt": "a"}])
    code, _, err = run_cli(capsys, "sft", "--data", str(bad), "--out", str(tmp_path / "b"), *common)
    assert_one_line_error(code, err, "bad.jsonl:2", "no prompt/response fields")
    code, _, err = run_cli(capsys, "sft", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "c"),
                           *common)
    assert_one_line_error(code, err, "missing.jsonl")
    code, _, err = run_cli(capsys, "sft", "--data", str(data), "--out", str(tmp_path / "d"), "--model", "tiny-test",
                           "--max-steps", "1")
    assert_one_line_error(code, err, "--tokenizer")


def test_smdm_sft_from_a_checkpoint_uses_its_tokenizer_and_weights(tokenizer, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    _pairs(data)
    base = ["--data", str(data), "--model", "tiny-test", "--max-steps", "2", "--no-progress", "--threads", "1"]
    code, _, err = run_cli(capsys, "sft", *base, "--tokenizer", str(tokenizer.path), "--out", str(tmp_path / "a"))
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "sft", *base, "--init-from", str(tmp_path / "a"), "--out", str(tmp_path / "b"),
                                "--lr", "1e-12", "--warmup-steps", "0")
    assert code == 0, err
    assert json.loads(stdout)["model"] == "tiny-test"
    from safetensors.torch import load_file

    before = load_file(str(tmp_path / "a" / "checkpoint" / "model.safetensors"))
    after = load_file(str(tmp_path / "b" / "checkpoint" / "model.safetensors"))
    for name in before:
        torch.testing.assert_close(before[name], after[name], atol=1e-6, rtol=0)
