"""Stratified (low-discrepancy) t lowers the variance of the Monte-Carlo likelihood estimate of a trained MDM.

An untrained model's loss barely depends on the mask ratio, so stratifying it cannot help; the claim is about
trained models, so this trains one for a few seconds. Variance is that of the estimate across seeds.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from smdm.likelihood import mc_score


@pytest.fixture(scope="module")
def trained_mdm(toy_data, tmp_path_factory):
    from smdm.checkpoint import load_checkpoint
    from smdm.cli import main
    from smdm.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("ld") / "mdm"
    assert main(["train", "--data", str(toy_data), "--out", str(out), "--model", "tiny-test", "--seq-len", "32",
                 "--batch-size", "8", "--max-steps", "600", "--no-progress", "--threads", "1"]) == 0
    return load_checkpoint(out).model, Tokenizer.from_file(Path(toy_data).parent / "tokenizer.json")


def test_stratified_t_lowers_the_variance_of_the_count_estimator(trained_mdm):
    model, tokenizer = trained_mdm
    prefix, target = tokenizer.encode("3: the cat sat on the mat and"), tokenizer.encode(" the dog sat on the log.")

    def variance(low_discrepancy: bool) -> float:
        return statistics.variance([mc_score(model, prefix, target, mc_samples=16, batch_size=16, estimator="count",
                                             low_discrepancy=low_discrepancy, seed=seed).nll for seed in range(150)])

    # Measured 0.37 with 200 seeds; each variance from 150 seeds is within ~±25% (2 SE), so 0.7 is a safe bound.
    assert variance(True) < 0.7 * variance(False)
