"""Reversal-curse task: the metrics on hand-made generations, and the train-then-evaluate command end to end."""

from __future__ import annotations

import json
import math

import pytest
from conftest import assert_one_line_error, run_cli

from smdm.errors import SmdmError
from smdm.tasks.reversal import SPLITS, TRAIN_FILE, contains, corpus_bleu


def test_containment_is_case_insensitive_and_ignores_outer_spaces():
    assert contains(" Daphne Barrington", "it was daphne barrington, of course.")
    assert not contains(" Daphne Barrington", "it was Daphne.")
    assert not contains("   ", "anything")  # an empty reference never counts as a hit


def test_bleu_against_hand_computed_values():
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # precisions 5/6, 3/5, 2/4, 1/3 (clipped "the"), equal lengths: BLEU = (5/6 · 3/5 · 1/2 · 1/3)^(1/4)
    expected = 100 * (5 / 6 * 3 / 5 * 1 / 2 * 1 / 3) ** 0.25
    assert corpus_bleu(["the cat sat on a mat"], ["the cat sat on the mat"]) == pytest.approx(expected)
    # all precisions 1 but 4 of 6 words: brevity penalty exp(1 - 6/4)
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on"]) == pytest.approx(100 * math.exp(-0.5))
    assert corpus_bleu(["a b c d"], ["d c b a"]) == 0.0  # no matching 4-gram
    assert corpus_bleu(["x"], [""]) == 0.0
    with pytest.raises(SmdmError):
        corpus_bleu(["a"], [])


P2D = [("Ada Quill", "the inventor of the silent bell"), ("Bram Tove", "the painter of the blue moon"),
       ("Cleo Marsh", "the author of the lost map")]  # trained as name -> description
D2P = [("Dov Reyes", "the builder of the glass tower"), ("Eli Stone", "the singer of the last song"),
       ("Fay Lund", "the keeper of the north light")]  # trained as description -> name


def _reversal_dir(root):
    """A miniature of the reversal-curse layout: facts stated one way in training, asked both ways in the tests."""
    root.mkdir()
    write = lambda name, rows: (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    name_first = lambda facts: [{"prompt": f"{n} is known as", "completion": f" {d}."} for n, d in facts]
    name_last = lambda facts: [{"prompt": f"Known as {d},", "completion": f" {n}"} for n, d in facts]
    write(TRAIN_FILE, (name_first(P2D) + name_last(D2P)) * 4)
    write("p2d_prompts_test.jsonl", name_first(P2D))
    write("d2p_prompts_test.jsonl", name_last(D2P))
    write("p2d_reverse_prompts_test.jsonl", name_last(P2D))
    write("d2p_reverse_prompts_test.jsonl", name_first(D2P))
    return root


@pytest.mark.parametrize("objective", ["mdm", "arm"])
def test_task_reversal_trains_then_evaluates(tmp_path, capsys, objective):
    data = _reversal_dir(tmp_path / "data")
    out = tmp_path / objective
    code, stdout, err = run_cli(capsys, "task", "reversal", "--data-dir", str(data), "--out", str(out),
                                "--model", "tiny-test", "--objective", objective,
                                "--epochs", "40" if objective == "arm" else "5",
                                "--batch-size", "4", "--vocab-size", "300", "--threads", "1", "--no-progress",
                                "--rank", "2",
                                *(["--loss-weighting", "ce", "--low-discrepancy"] if objective == "mdm" else []))
    assert code == 0, err
    recipe = json.loads((out / "run" / "train_config.json").read_text())  # the MDM recipe options reach training
    assert (recipe["loss_weighting"], recipe["low_discrepancy"]) == (("ce", True) if objective == "mdm"
                                                                     else ("elbo", False))
    record = json.loads((out / "reversal.json").read_text())
    assert set(record["metrics"]) == set(SPLITS)
    assert record["model"]["objective"] == objective and len(record["model"]["weights_sha256"]) == 64
    for split, metrics in record["metrics"].items():
        assert metrics["n"] == 3
        # All 3 rows are among the examples: the accuracy is the paper's rule (answer contained, any case) on them.
        examples = record["examples"][split]
        assert len(examples) == 3 and metrics["accuracy"] == pytest.approx(
            sum(e["reference"].strip().lower() in e["generation"].lower() for e in examples) / 3)
        assert ("bleu" in metrics) == (SPLITS[split][1] == "description")
        if SPLITS[split][1] == "name":
            assert metrics["rank_n"] == 2 and metrics["rank_chance"] == pytest.approx(1 / 3)
        else:
            assert "rank_accuracy" not in metrics
    if objective == "arm":  # an ARM memorises the trained direction of this tiny set in 40 epochs (an MDM needs ~5x more)
        assert record["metrics"]["p2d"]["accuracy"] >= 2 / 3, record["examples"]["p2d"]
        assert record["metrics"]["d2p"]["rank_accuracy"] == 1.0, record["examples"]["d2p"]
    assert "| p2d_reverse |" in stdout
    # Evaluating the saved model again gives the same, deterministic answers.
    code, _, err = run_cli(capsys, "task", "reversal", "--data-dir", str(data), "--out", str(tmp_path / "again"),
                           "--checkpoint", str(out / "run" / "checkpoint"), "--no-progress")
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "reversal.json").read_text())
    assert again["examples"] == record["examples"]


def test_task_reversal_bad_input(tmp_path, capsys):
    code, _, err = run_cli(capsys, "task", "reversal", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "p2d_prompts_test.jsonl")
    data = _reversal_dir(tmp_path / "data")
    (data / "d2p_prompts_test.jsonl").write_text('{"prompt": "x"}\n')
    run_cli(capsys, "task", "reversal", "--data-dir", str(data), "--out", str(tmp_path / "m"), "--model", "tiny-test",
            "--epochs", "1", "--vocab-size", "300", "--threads", "1", "--no-progress", "--limit", "1")
    code, _, err = run_cli(capsys, "task", "reversal", "--data-dir", str(data), "--out", str(tmp_path / "m2"),
                           "--checkpoint", str(tmp_path / "m" / "run" / "checkpoint"), "--no-progress")
    assert_one_line_error(code, err, "d2p_prompts_test.jsonl:1", "completion")
    code, _, err = run_cli(capsys, "task", "reversal", "--data-dir", str(data), "--out", str(tmp_path / "a"),
                           "--objective", "arm", "--cfg-scale", "1", "--model", "tiny-test")
    assert_one_line_error(code, err, "--cfg-scale", "arm")
    assert not (tmp_path / "a" / "run").exists()  # refused before any training
    code, _, err = run_cli(capsys, "task", "reversal", "--data-dir", str(data), "--out", str(tmp_path / "w"),
                           "--objective", "arm", "--loss-weighting", "ce", "--model", "tiny-test")
    assert_one_line_error(code, err, "loss-weighting", "arm")
    assert not (tmp_path / "w" / "run").exists()
