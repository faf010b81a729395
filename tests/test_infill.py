"""Infilling: a plain canvas gives exactly `generate`'s tokens, given tokens never change, a toy model of known
predictions fills the spans as expected, CFG hides the given text on both sides, and an ARM refuses."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from serving import untrained_checkpoints
from test_sample import VOCAB, ConfidenceByPosition, TablePredictor, revealed_per_step, tiny

from smdm import infill as markers
from smdm.errors import SmdmError
from smdm.infill import infill
from smdm.likelihood import chain_rule_score, mc_score, score
from smdm.model import Transformer
from smdm.sample import generate


@pytest.fixture(scope="module")
def checkpoints(toy_data, tmp_path_factory):
    return untrained_checkpoints(toy_data, tmp_path_factory.mktemp("untrained"))

def random_mdm(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**overrides)).eval()


@pytest.mark.parametrize("options", [
    {},
    {"steps": 4, "block_length": 4},
    {"steps": 8, "block_length": 4, "cache": "dual"},
    {"steps": 8, "block_length": 2, "cache": "prefix"},
    {"steps": 8, "cfg_scale": 1.5},
    {"steps": 8, "block_length": 4, "threshold": 0.2},
    {"temperature": 1.0, "top_p": 0.9, "block_length": 4},
    {"remasking": "random", "temperature": 0.7, "steps": 4, "block_length": 4},
    {"steps": 4, "block_length": 4, "schedule": "smdm"},
    {"steps": 8, "schedule": "smdm", "threshold": 0.3},
])
def test_a_plain_canvas_gives_exactly_what_generate_gives(options):
    model = random_mdm()
    prompts = [[3, 4, 5, 6, 7], [8, 2]]
    length = 8
    expected = generate(model, prompts, length, generator=torch.Generator().manual_seed(5), **options)
    got = infill(model, [p + [model.mask_id] * length for p in prompts], generator=torch.Generator().manual_seed(5),
                 **options)
    assert torch.equal(got.tokens, expected.tokens)
    assert got.fills == [row.tolist() for row in expected.tokens[:, expected.width:]]
    assert got.forward_passes == expected.forward_passes


@pytest.mark.parametrize("options", [{}, {"block_length": 3, "steps": 6, "cache": "dual"}, {"cfg_scale": 2.0},
                                     {"temperature": 1.0, "remasking": "random", "steps": 4, "block_length": 3}])
def test_given_tokens_never_change(options):
    model = random_mdm(1)
    m = model.mask_id
    canvases = [[1, 2, m, m, m, 3, 4, m, m, m, 5], [m, m, m, 6, 7, 8, 9, m, m, m]]
    result = infill(model, canvases, generator=torch.Generator().manual_seed(0), **options)
    for row, canvas in enumerate(canvases):
        filled = result.tokens[row, result.width - len(canvas):].tolist()
        given = [i for i, t in enumerate(canvas) if t != m]
        assert [filled[i] for i in given] == [canvas[i] for i in given]
        assert m not in filled and len(result.fills[row]) == 6
        assert [filled[i] for i, t in enumerate(canvas) if t == m] == result.fills[row]


def test_spans_are_filled_block_by_block_in_confidence_order():
    model = ConfidenceByPosition()  # predicts i % VOCAB at position i, more confidently further right
    m = model.mask_id
    canvas = [1, 1, m, m, m, 2, 2, m, m, m, 3, 3]  # spans at positions 2-4 and 7-9
    history = [torch.tensor([canvas])]
    result = infill(model, [canvas], steps=6, block_length=3, on_step=lambda s, x: history.append(x.clone()))
    assert result.fills[0] == [2, 3, 4, 7, 8, 9]
    # Block 0 = the first three masked positions, most confident (rightmost) first; then block 1.
    assert revealed_per_step(model, history, 0)[1:] == [{4}, {3}, {2}, {9}, {8}, {7}]
    assert result.forward_passes == 6


def test_rows_with_different_mask_counts_and_settings_match_their_runs_alone():
    model = random_mdm(2)
    m = model.mask_id
    canvases = [[5, 6, m, m, m, m, 7], [m, m, 3, 4, 5, 6, 7, 8, m, m, m, m, m, m]]
    steps, blocks = [4, 6], [2, 4]
    together = infill(model, canvases, steps=steps, block_length=blocks)
    for row, canvas in enumerate(canvases):
        alone = infill(model, [canvas], steps=steps[row], block_length=blocks[row])
        assert together.fills[row] == alone.fills[0]


def test_cfg_hides_the_given_text_on_both_sides():
    model = TablePredictor({})
    m = model.mask_id
    canvas = [1, 2, m, m, 3, 4]
    infill(model, [canvas], steps=1, cfg_scale=1.0)
    conditional, unconditional = model.calls[0].tolist()
    assert conditional == canvas
    assert unconditional == [m] * 6


def test_stop_at_eos_ends_a_trailing_row_and_keeps_its_text():
    model = TablePredictor({i: (0, 0.9) for i in range(4, 8)})  # EOS (0) predicted in the first block
    m = model.mask_id
    full = infill(model, [[3, 3] + [m] * 8], block_length=2, eos_id=0)
    stopped = infill(model, [[3, 3] + [m] * 8], block_length=2, eos_id=0, stop_at_eos=True)
    assert stopped.forward_passes < full.forward_passes
    cut = full.fills[0][: full.fills[0].index(0)]
    assert stopped.fills[0][: len(cut)] == cut and stopped.fills[0][len(cut)] == 0


def test_infill_refuses_bad_input():
    m = random_mdm().mask_id
    with pytest.raises(SmdmError, match="ARM"):
        infill(Transformer(tiny(), causal=True), [[1, m]])
    with pytest.raises(SmdmError, match="no \\[MASK\\]"):
        infill(random_mdm(), [[1, 2]])
    with pytest.raises(SmdmError, match="block length 3 must divide"):
        infill(random_mdm(), [[1, m, m, m, m]], block_length=3)
    with pytest.raises(SmdmError, match="canvas ids"):
        infill(random_mdm(), [[VOCAB + 5, m]])


# --- markers ---------------------------------------------------------------------------------------------------

def test_markers_parse_into_segments_and_back():
    assert markers.parse("a <|mask:3|> b <|mask:2|>") == ["a ", 3, " b ", 2]
    assert markers.parse("<\\|mask:3|> is text <|mask:1|>") == ["<|mask:3|> is text ", 1]
    canvas = markers.encode(markers.parse("ab<|mask:2|>c"), lambda s: [ord(ch) for ch in s], 99)
    assert canvas.ids == [97, 98, 99, 99, 99] and canvas.span_lengths == [2]
    assert markers.join(canvas, [5, 6]) == [97, 98, 5, 6, 99]
    assert markers.spans(canvas, [5, 6]) == [[5, 6]]


@pytest.mark.parametrize("text,fragment", [("no markers", "no <|mask:N|>"), ("a <|mask:0|>", "hides no tokens"),
                                           ("a <|mask:x|> <|mask:2|>", "malformed"), ("<|mask:2 b", "malformed")])
def test_bad_markers_are_one_line_errors(text, fragment):
    with pytest.raises(SmdmError) as error:
        markers.parse(text)
    assert fragment in str(error.value) and "\n" not in str(error.value)


# --- likelihood of a span between given text ------------------------------------------------------------------

def test_span_scores_condition_on_the_suffix():
    model = random_mdm(3)
    prefix, target, suffix = [1, 2, 3], [4, 5], [6, 7, 8]
    exact = chain_rule_score(model, prefix, target, suffix=suffix)
    # By hand: reveal target left to right, both sides given.
    m = model.mask_id
    first = model(torch.tensor([prefix + [m, m] + suffix])).log_softmax(-1)[0, 3, 4]
    second = model(torch.tensor([prefix + [4, m] + suffix])).log_softmax(-1)[0, 4, 5]
    assert exact.nll == pytest.approx(-(first + second).item(), rel=1e-5)
    assert exact.nll != pytest.approx(chain_rule_score(model, prefix, target).nll, rel=1e-3)
    mc = mc_score(model, prefix, target, mc_samples=256, suffix=suffix)
    assert abs(mc.nll - exact.nll) < 0.5 * exact.nll  # the bound sits near the exact value for two tokens
    with pytest.raises(SmdmError, match="needs an MDM"):
        score(Transformer(tiny(), causal=True), prefix, target, suffix=suffix)


# --- the CLI ---------------------------------------------------------------------------------------------------

def test_cli_infill_keeps_the_given_text(capsys, checkpoints):
    code, out, err = run_cli(capsys, "sample", "--checkpoint", str(checkpoints["mdm"]),
                             "--infill", "the cat <|mask:4|> the mat", "--steps", "4")
    assert code == 0, err
    record = json.loads(out)
    assert record["tokens"] == 4 and len(record["spans"]) == 1
    assert record["text"].startswith("the cat") and record["text"].endswith("the mat")


def test_cli_arm_refuses_infill_and_suffix(capsys, checkpoints):
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(checkpoints["arm"]), "--infill", "a <|mask:2|> b")
    assert_one_line_error(code, err, "needs an MDM")
    code, _, err = run_cli(capsys, "likelihood", "--checkpoint", str(checkpoints["arm"]), "--prefix", "the",
                           "--text", "cat", "--suffix", "sat")
    assert_one_line_error(code, err, "needs an MDM")


def test_cli_likelihood_of_a_span(capsys, checkpoints):
    code, out, err = run_cli(capsys, "likelihood", "--checkpoint", str(checkpoints["mdm"]), "--prefix", "the",
                             "--text", " cat", "--suffix", " sat", "--method", "chain")
    assert code == 0, err
    record = json.loads(out)
    assert record["suffix_tokens"] > 0 and record["nll_nats"] > 0 and record["tokens"] == 2
