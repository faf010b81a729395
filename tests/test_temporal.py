"""Perplexity over time: corpora specs, block scoring through the shared likelihood API, the report files."""

from __future__ import annotations

import json
import math

import pytest
from conftest import TOY_TEXT, assert_one_line_error, run_cli

from smdm.errors import SmdmError
from smdm.tasks.temporal import parse_corpus_spec


@pytest.fixture(scope="module")
def runs(toy_data, tmp_path_factory):
    from smdm.train import TrainConfig, train

    root = tmp_path_factory.mktemp("temporal")
    for objective in ("mdm", "arm", "bdm"):
        train(TrainConfig(data_dir=str(toy_data), out_dir=str(root / objective), model="tiny-test", seq_len=32,
                          batch_size=4, max_steps=30, lr=3e-3, objective=objective, eval_every=1000,
                          eval_blocks=2, progress=False, threads=1,
                          diffusion_block_size=4 if objective == "bdm" else None))
    (root / "early.txt").write_text(" ".join(TOY_TEXT[:5]))  # text like the training data
    (root / "late.txt").write_text("zebra quantum vortex 42 fjords! " * 20)  # text unlike it
    return root


def test_corpus_spec():
    with pytest.raises(SmdmError, match="LABEL=GLOB"):
        parse_corpus_spec("no-equals-sign")
    with pytest.raises(SmdmError, match="no files match"):
        parse_corpus_spec("x=/nonexistent/*.txt")


def test_models_score_familiar_text_better_and_report_is_written(capsys, runs):
    code, _, err = run_cli(capsys, "perplexity", "--checkpoint", str(runs / "mdm"), "--checkpoint",
                             str(runs / "arm"), "--corpus", f"early={runs / 'early.txt'}", "--corpus",
                             f"late={runs / 'late.txt'}", "--out", str(runs / "report"), "--seq-len", "16",
                             "--max-blocks", "4", "--mc-samples", "8")
    assert code == 0, err
    rows = json.loads((runs / "report" / "temporal.json").read_text())
    assert {r["corpus"] for r in rows} == {"early", "late"} and len(rows) == 4
    score = {(r["model"].split()[0], r["corpus"]): r for r in rows}
    for family in ("MDM", "ARM"):
        assert score[(family, "early")]["nats_per_token"] < score[(family, "late")]["nats_per_token"]
    assert score[("ARM", "early")]["stderr"] == 0 and score[("MDM", "early")]["stderr"] > 0
    assert math.isclose(rows[0]["perplexity"], math.exp(rows[0]["nats_per_token"]))
    assert "| early |" in (runs / "report" / "temporal.md").read_text()
    assert "corpora" in err  # the progress bar (--no-progress turns it off: next test)


def test_block_diffusion_scores_corpora_with_its_block_elbo(capsys, runs):
    code, _, err = run_cli(capsys, "perplexity", "--checkpoint", str(runs / "bdm"), "--corpus",
                           f"early={runs / 'early.txt'}", "--corpus", f"late={runs / 'late.txt'}", "--out",
                           str(runs / "bdm-report"), "--seq-len", "16", "--max-blocks", "4", "--mc-samples", "8",
                           "--no-progress")
    assert code == 0, err
    assert "corpora" not in err
    rows = {r["corpus"]: r for r in json.loads((runs / "bdm-report" / "temporal.json").read_text())}
    assert rows["early"]["model"].startswith("BDM") and rows["early"]["stderr"] > 0  # a Monte-Carlo bound
    assert rows["early"]["nats_per_token"] < rows["late"]["nats_per_token"]


def test_bad_corpus_is_one_line(capsys, runs):
    code, _, err = run_cli(capsys, "perplexity", "--checkpoint", str(runs / "mdm"), "--corpus", "x=/nope/*.txt",
                           "--out", str(runs / "r2"))
    assert_one_line_error(code, err, "no files match")
