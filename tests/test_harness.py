"""lm-eval integration: converters into our task jsonl, the `smdm` harness model, offline tasks, `smdm eval`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO_ROOT, assert_one_line_error, run_cli, shared_file

from smdm.errors import SmdmError
from smdm.tasks.commonsense import SUBSETS, convert_commonsense, convert_official

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")

from smdm.harness import SmdmLM, cut_at, evaluate_tasks
from smdm.likelihood import arm_score, chain_rule_score, is_greedy_continuation, score
from smdm.sample import generate
from smdm.tasks.lm_eval import read_task_file, task_names

MC_TASKS = ["arc_easy", "piqa", "openbookqa", "social_iqa", "winogrande", "boolq"]


# --- converters ------------------------------------------------------------------------------------------------

def _adapters(instruction: str, answer: str) -> dict:
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


HAND_MADE = {
    "ARC-Easy": [_adapters("Please choose the correct answer to the question: Which is a gas?\n\nAnswer1: ice "
                           "Answer2: steam Answer3: rock Answer4: wood Answer5: sand\n\n"
                           "Answer format: answer1/answer2/answer3/answer4/answer5", "answer2")],
    "piqa": [_adapters("Please choose the correct solution to the question: Open a jar\n\nSolution1: twist the lid"
                       "\n\nSolution2: eat the lid \n\nAnswer format: solution1/solution2", "solution1")],
    "winogrande": [_adapters("Please choose the correct answer to fill in the blank to complete the given sentence: "
                             "Ann beat Bo because _ was faster.\n\nOption1: Ann Option2: Bo Answer format: "
                             "option1/option2", "option1")],
    "boolq": [_adapters("Please answer the following question with true or false, question: is water wet?\n\n"
                        "Answer format: true/false", "true")],
}


def _write_source(root: Path, folder: str, records: list, split: str = "test") -> Path:
    path = root / folder / f"{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=4))
    return path


def test_convert_hand_made_llm_adapters_records(tmp_path):
    for folder, records in HAND_MADE.items():
        _write_source(tmp_path / "src", folder, records)
    counts = convert_commonsense(tmp_path / "src", tmp_path / "out", ["arc_easy", "piqa", "winogrande", "boolq"])
    assert counts == {"arc_easy": 1, "piqa": 1, "winogrande": 1, "boolq": 1}
    read = {name: json.loads((tmp_path / "out" / f"{name}.jsonl").read_text()) for name in counts}
    assert read["arc_easy"] == {"query": "Question: Which is a gas?\nAnswer:",
                                "choices": ["ice", "steam", "rock", "wood", "sand"], "gold": 1}
    assert read["piqa"] == {"query": "Question: Open a jar\nAnswer:", "choices": ["twist the lid", "eat the lid"],
                            "gold": 0}
    assert read["winogrande"] == {"query": "Ann beat Bo because", "choices": ["Ann was faster.", "Bo was faster."],
                                  "gold": 0}
    assert read["boolq"] == {"query": "Question: is water wet?\nAnswer:", "choices": ["no", "yes"], "gold": 1}


@pytest.mark.parametrize("content, fragment", [
    (None, "no such file"),
    ('[\n  {"instruction": "x"}\n]', "test.json:2: missing string field 'answer'"),
    (('{"instruction": "Please choose the correct answer to the question: q\\n\\nAnswer1: a Answer2: b", '
     '"answer": "answer1"}\nnot json\n'), "test.json:2: not JSON"),
    (('[\n  {"instruction": "Please choose the correct answer to the question: q\\n\\nAnswer1: a Answer2: b", '
     '"answer": "answer1"},\n  {"instruction": "oops"\n]'), "test.json:4: not JSON"),
    (('[{"instruction": "Please choose the correct answer to the question: q\\n\\nAnswer1: a Answer2: b", '
     '"answer": "answer3"}]'), "test.json:1: answer 'answer3' is not one of answer1..answer2"),
    (('[{"instruction": "Please choose the correct solution to the question: q\\n\\nSolution1: a", '
     '"answer": "solution1"}]'), "test.json:1: instruction does not start with"),
])
def test_converter_errors_name_file_and_line(tmp_path, content, fragment):
    if content is not None:
        (tmp_path / "ARC-Easy").mkdir()
        (tmp_path / "ARC-Easy" / "test.json").write_text(content)
    with pytest.raises(SmdmError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        convert_commonsense(tmp_path, tmp_path / "out", ["arc_easy"])
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_convert_the_real_commonsense_files(tmp_path):
    source = shared_file("commonsense")
    counts = convert_commonsense(source, tmp_path)
    assert counts == {"arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500, "social_iqa": 1954,
                      "piqa": 1838, "winogrande": 1267, "boolq": 3270}  # the counts of its README
    for name, subset in SUBSETS.items():
        answers = Counter(r["answer"] for r in json.loads((source / subset.folder / "test.json").read_text()))
        rows = [record for _, record in read_task_file(tmp_path / f"{name}.jsonl", "multiple_choice")]
        golds = Counter(r["gold"] for r in rows)
        if name == "boolq":
            assert golds == {1: answers["true"], 0: answers["false"]}
        else:  # gold k comes from answer "<label>{k+1}", for every record
            assert sorted(golds.values()) == sorted(answers.values())
        assert all(len(r["choices"]) >= 2 and all(c.strip() == c and c for c in r["choices"]) for r in rows)
        assert not any("Answer format" in r["query"] or "Answer1:" in r["query"] for r in rows)


def test_convert_official_hellaswag_race_lambada(tmp_path):
    (tmp_path / "hs.jsonl").write_text(json.dumps({"ctx_a": "A man sits.", "ctx_b": "he", "activity_label": "Rest",
                                                   "endings": ["stands [title] up", "sleeps"], "label": 1}) + "\n")
    assert convert_official("hellaswag", tmp_path / "hs.jsonl", tmp_path / "out") == 1
    assert json.loads((tmp_path / "out" / "hellaswag.jsonl").read_text()) == {
        "query": "Rest: A man sits. He", "choices": ["stands. up", "sleeps"], "gold": 1}
    (tmp_path / "race").mkdir()
    (tmp_path / "race" / "1.txt").write_text(json.dumps({"article": "Tom ran.", "questions": ["Who ran?", "Did he?"],
                                                         "options": [["Tom", "Ann"], ["yes", "no"]],
                                                         "answers": ["A", "B"]}))
    assert convert_official("race", tmp_path / "race", tmp_path / "out") == 2
    lines = [json.loads(x) for x in (tmp_path / "out" / "race.jsonl").read_text().splitlines()]
    assert lines[1] == {"query": "Article: Tom ran.\n\nQuestion: Did he?\nAnswer:", "choices": ["yes", "no"],
                        "gold": 1}
    (tmp_path / "lambada.txt").write_text("the cat sat on the mat\n\nthe end of the story\n")
    assert convert_official("lambada", tmp_path / "lambada.txt", tmp_path / "out") == 2
    (tmp_path / "race" / "2.txt").write_text(json.dumps({"article": "x", "questions": ["q"], "options": [["a", "b"]],
                                                         "answers": ["C"]}))
    with pytest.raises(SmdmError, match=r"2\.txt:1: answer 'C'"):
        convert_official("race", tmp_path / "race", tmp_path / "out")


@pytest.mark.parametrize("line, fragment", [
    ('{"query": "q", "choices": ["a", "b"]}', ":2: 'gold' must be an index"),
    ('{"query": "q", "choices": "ab", "gold": 0}', ":2: 'choices' must be a list"),
    ("[1, 2]", ":2: expected a JSON object"),
    ("{oops", ":2: bad JSON"),
])
def test_task_file_reader_names_the_bad_line(tmp_path, line, fragment):
    path = tmp_path / "piqa.jsonl"
    path.write_text('{"query": "q", "choices": ["a", "b"], "gold": 1}\n' + line + "\n")
    with pytest.raises(SmdmError, match=fragment):
        read_task_file(path, "multiple_choice")


# --- the harness model on tiny trained checkpoints -------------------------------------------------------------

def _train(toy_data: Path, root: Path, objective: str, steps: int) -> Path:
    """A tiny-test model with a 512-token context (room for long PIQA choices), briefly trained on the toy corpus."""
    from smdm.checkpoint import save_checkpoint
    from smdm.cli import main
    from smdm.config import ModelConfig
    from smdm.model import Transformer
    from smdm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(toy_data.parent / "tokenizer.json")
    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny-test", vocab_size=tokenizer.vocab_size, block_size=512)
    save_checkpoint(root / f"init-{objective}", Transformer(config, causal=objective == "arm"), config,
                    {"objective": objective}, tokenizer_file=tokenizer.path)
    out = root / objective
    assert main(["train", "--data", str(toy_data), "--out", str(out), "--init-from", str(root / f"init-{objective}"),
                 "--objective", objective, "--seq-len", "32", "--batch-size", "4", "--max-steps", str(steps),
                 "--no-progress", "--threads", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def checkpoints(toy_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("harness")
    return {"mdm": _train(toy_data, root, "mdm", 120), "arm": _train(toy_data, root, "arm", 120)}


@pytest.fixture(scope="module")
def models(checkpoints) -> dict[str, SmdmLM]:
    return {"mdm": SmdmLM(checkpoint=str(checkpoints["mdm"]), mc_samples=16, batch_size=16, seed=3),
            "mdm_chain": SmdmLM(checkpoint=str(checkpoints["mdm"]), nll_type="chain"),
            "arm": SmdmLM(checkpoint=str(checkpoints["arm"]))}


def request(*args) -> SimpleNamespace:
    """What lm-eval hands a model: an object whose .args holds the request."""
    return SimpleNamespace(args=args)


CONTEXT, CONTINUATION = "the cat sat on the", " mat and the dog"


def test_loglikelihood_is_our_score(models):
    for name, lm in models.items():
        ids = lm.tokenizer.encode(CONTEXT + CONTINUATION)
        prefix = lm.tokenizer.encode(CONTEXT)
        assert ids[:len(prefix)] == prefix
        target = ids[len(prefix):]
        if name == "mdm":
            expected = score(lm.model, prefix, target, method="mc", mc_samples=16, batch_size=16, seed=3).nll
        elif name == "mdm_chain":
            expected = chain_rule_score(lm.model, prefix, target).nll
        else:
            expected = arm_score(lm.model, prefix, target).nll
        (logprob, greedy), = lm.loglikelihood([request(CONTEXT, CONTINUATION)])
        assert logprob == pytest.approx(-expected, abs=1e-6) and isinstance(greedy, bool)
        # lm-eval's convention: a space ending the context belongs to the continuation
        assert lm.loglikelihood([request(CONTEXT + " ", CONTINUATION[1:])])[0][0] == pytest.approx(logprob, abs=1e-6)
    with pytest.raises(SmdmError, match="needs an MDM"):
        SmdmLM(checkpoint=str(models["arm"].config.checkpoint), cfg_scale=1.0).loglikelihood(
            [request(CONTEXT, CONTINUATION)])


def test_is_greedy_marks_exactly_the_greedy_continuation(models):
    for name in ("mdm", "arm"):
        lm = models[name]
        prefix = lm.tokenizer.encode(CONTEXT)
        greedy = generate(lm.model, [prefix], 4, temperature=0.0).completions[0]
        text = lm.tokenizer.decode(greedy)
        assert lm.tokenizer.encode(CONTEXT + text)[len(prefix):] == greedy  # the text round-trips to the same ids
        assert lm.loglikelihood([request(CONTEXT, text)])[0][1] is True
        other = [(greedy[0] + 1) % lm.tokenizer.vocab_size] + greedy[1:]
        other_text = lm.tokenizer.decode(other)
        _, target2 = lm.scoring_pair(CONTEXT, other_text)
        assert target2 != greedy
        assert lm.loglikelihood([request(CONTEXT, other_text)])[0][1] is False
        if name == "mdm":
            assert is_greedy_continuation(lm.model, prefix, greedy)


def test_loglikelihood_rolling_covers_every_token_once(models):
    lm = models["arm"]
    short = "the quick brown fox jumps over the lazy dog."
    ids = lm.tokenizer.encode(short)
    assert lm.loglikelihood_rolling([request(short)])[0] == pytest.approx(
        -arm_score(lm.model, [lm.tokenizer.eos_id], ids).nll, abs=1e-5)
    chain = models["mdm_chain"]
    assert chain.loglikelihood_rolling([request(short)])[0] == pytest.approx(
        -chain_rule_score(chain.model, [lm.tokenizer.eos_id], ids).nll, abs=1e-5)
    long = " ".join(["the cat sat on the mat and the dog sat on the log."] * 60)
    ids = lm.tokenizer.encode(long)
    windows = lm.rolling_windows(long)
    assert len(ids) > lm.block_size and len(windows) > 1
    assert [t for _, target in windows for t in target] == ids
    stream = [lm.tokenizer.eos_id] + ids
    start = 1
    for prefix, target in windows:
        assert len(prefix) + len(target) <= lm.block_size and prefix == stream[start - len(prefix):start]
        start += len(target)
    total = lm.loglikelihood_rolling([request(long)])[0]
    assert total == pytest.approx(-sum(arm_score(lm.model, p, t).nll for p, t in windows), rel=1e-6)
    mdm = models["mdm"]  # an MDM's rolling score is the Monte-Carlo bound of each window, given EOS first
    assert mdm.loglikelihood_rolling([request(short)])[0] == pytest.approx(-score(
        mdm.model, [lm.tokenizer.eos_id], lm.tokenizer.encode(short), mc_samples=16, batch_size=16, seed=3).nll)


def test_generate_until_cuts_at_the_stop_strings(models):
    for name in ("mdm", "arm"):
        lm = models[name]
        prompts = ["the cat sat", "to be or not"]
        free = lm.generate_until([request(p, {"until": [], "max_gen_toks": 12}) for p in prompts])
        assert all(free) and free == lm.generate_until([request(p, {"max_gen_toks": 12}) for p in prompts])
        stop = free[0].strip().split(" ")[1]  # a word in the middle of the first generation
        cut = lm.generate_until([request(prompts[0], {"until": [stop], "max_gen_toks": 12}),
                                 request(prompts[1], {"until": "\n", "max_gen_toks": 12})])
        assert cut[0] == free[0].split(stop)[0] and stop not in cut[0]
        assert cut[1] == free[1].split("\n")[0]
    assert cut_at("a. b\nc", [".", "\n"]) == "a" and cut_at("abc", []) == "abc"


# --- lm-eval end to end ------------------------------------------------------------------------------------------

def test_shipped_tasks_cover_the_papers_benchmarks():
    assert {f"smdm_{name}" for name in MC_TASKS + ["hellaswag", "race", "lambada", "arc_challenge"]} <= \
        set(task_names())


def _mc_accuracy(lm: SmdmLM, path: Path, limit: int) -> float:
    """Accuracy computed directly from our scores: the arg-max choice against gold."""
    rows = [record for _, record in read_task_file(path, "multiple_choice")][:limit]
    hits = [max(range(len(r["choices"])), key=lambda i: lm.loglikelihood_pair(r["query"], " " + r["choices"][i])[0])
            == r["gold"] for r in rows]
    return sum(hits) / len(hits)


def test_simple_evaluate_offline_on_the_shared_commonsense_tasks(checkpoints, models, tmp_path):
    convert_commonsense(shared_file("commonsense"), tmp_path / "data", MC_TASKS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "SMDM_EVAL_DATA": str(tmp_path / "data")}
    tasks = ",".join(f"smdm_{t}" for t in MC_TASKS)
    result = subprocess.run([sys.executable, "-m", "smdm", "eval", "--tasks", tasks, "--limit", "3", "--model-args",
                             f"checkpoint={checkpoints['mdm']},mc_samples=4,batch_size=4", "--out",
                             str(tmp_path / "results.json")], env=env, capture_output=True, text=True, cwd=REPO_ROOT,
                            check=False, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["results"]) == {f"smdm_{t}" for t in MC_TASKS}
    for metrics in results["results"].values():
        assert 0.0 <= metrics["acc_norm,none"] <= 1.0
    # lm-eval's MDM accuracy is exactly the one the Monte-Carlo bound gives (same seed, same draws): the choice of
    # least NLL against gold, scored here with smdm.likelihood directly, not through the harness.
    mdm = SmdmLM(checkpoint=str(checkpoints["mdm"]))
    for task in MC_TASKS:
        rows = [record for _, record in read_task_file(tmp_path / "data" / f"{task}.jsonl", "multiple_choice")][:3]
        nll = [[score(mdm.model, *mdm.scoring_pair(r["query"], " " + c), method="mc", mc_samples=4, batch_size=4,
                      seed=0).nll for c in r["choices"]] for r in rows]
        expected = sum(min(range(len(n)), key=n.__getitem__) == r["gold"] for n, r in zip(nll, rows)) / len(rows)
        assert results["results"][f"smdm_{task}"]["acc,none"] == pytest.approx(expected)
    assert all(n["effective"] == 3 for n in results["n-samples"].values())
    # In-process with the ARM: lm-eval's accuracy is exactly the one our own scores give.
    summary = evaluate_tasks(["smdm_piqa", "smdm_arc_easy"], {"checkpoint": str(checkpoints["arm"])},
                             str(tmp_path / "data"), limit=5)
    for task in ("piqa", "arc_easy"):
        assert summary["results"][f"smdm_{task}"]["acc,none"] == pytest.approx(
            _mc_accuracy(models["arm"], tmp_path / "data" / f"{task}.jsonl", 5))


# --- bad input through the CLI: one line, exit 2 ---------------------------------------------------------------

@pytest.fixture
def data_dir(tmp_path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    (path / "piqa.jsonl").write_text('{"query": "Question: open a jar\\nAnswer:", "choices": ["twist", "eat"], '
                                     '"gold": 0}\n')
    return path


def _eval(capsys, checkpoint: Path, data: Path, task: str = "smdm_piqa", extra: str = "") -> tuple[int, str, str]:
    return run_cli(capsys, "eval", "--tasks", task, "--model-args", f"checkpoint={checkpoint}{extra}",
                   "--data-dir", str(data))


def test_eval_errors_are_one_line(capsys, checkpoints, data_dir, tmp_path):
    mdm = checkpoints["mdm"]
    assert_one_line_error(*_eval(capsys, mdm, data_dir, "smdm_boolq")[::2], "boolq.jsonl", "task file not found")
    (data_dir / "arc_easy.jsonl").write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": "q"}\n')
    assert_one_line_error(*_eval(capsys, mdm, data_dir, "smdm_arc_easy")[::2], "arc_easy.jsonl:2", "choices")
    assert_one_line_error(*_eval(capsys, mdm, data_dir, extra=",nll_type=elbo")[::2], "nll_type", "elbo")
    assert_one_line_error(*_eval(capsys, mdm, data_dir, extra=",temperture=1")[::2], "temperture")
    assert_one_line_error(*_eval(capsys, mdm, data_dir, "smdm_nonesuch")[::2], "unknown task", "smdm_nonesuch")
    assert_one_line_error(*_eval(capsys, mdm, tmp_path / "absent")[::2], "absent", "does not exist")
    (data_dir / "winogrande.jsonl").write_text(json.dumps({"query": "x", "choices": ["cat " * 600, "dog"],
                                                           "gold": 1}) + "\n")
    assert_one_line_error(*_eval(capsys, mdm, data_dir, "smdm_winogrande")[::2], "winogrande.jsonl:1",
                          "continuation has", "context is 512")
    code, _, err = run_cli(capsys, "eval", "convert", "--source", str(tmp_path / "nowhere"), "--out", str(tmp_path))
    assert_one_line_error(code, err, "nowhere", "no such file")
    code, _, err = run_cli(capsys, "eval", "--tasks", "smdm_piqa")
    assert_one_line_error(code, err, "--model-args")


def test_eval_convert_cli(capsys, tmp_path):
    for folder, records in HAND_MADE.items():
        _write_source(tmp_path / "src", folder, records)
    code, out, err = run_cli(capsys, "eval", "convert", "--source", str(tmp_path / "src"), "--out",
                             str(tmp_path / "out"), "--tasks", "piqa,boolq")
    assert code == 0, err
    assert "smdm_piqa" in out and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["boolq.jsonl", "piqa.jsonl"]


def test_a_block_diffusion_checkpoint_scores_and_generates_through_the_adapter(toy_data, tmp_path):
    """Issue 16's likelihood in the lm-eval adapter: a BDM is scored by its block ELBO (the shared `score`, with the
    adapter's draws) and generates through the block sampler."""
    from smdm.train import TrainConfig, train

    train(TrainConfig(data_dir=str(toy_data), out_dir=str(tmp_path / "bdm"), model="tiny-test", seq_len=32,
                      batch_size=4, max_steps=20, lr=3e-3, objective="bdm", diffusion_block_size=4,
                      eval_every=1000, eval_blocks=2, progress=False, threads=1))
    lm = SmdmLM(checkpoint=str(tmp_path / "bdm"), mc_samples=8, batch_size=8, seed=3)
    assert lm.model.diffusion_block_size == 4
    prefix, target = lm.scoring_pair(CONTEXT, CONTINUATION)
    expected = score(lm.model, prefix, target, method="mc", mc_samples=8, batch_size=8, seed=3)
    (logprob, greedy), = lm.loglikelihood([request(CONTEXT, CONTINUATION)])
    assert logprob == pytest.approx(-expected.nll, abs=1e-6) and expected.stderr > 0 and isinstance(greedy, bool)
    rolling, = lm.loglikelihood_rolling([request(CONTEXT + CONTINUATION)])
    assert rolling < 0
    text, = lm.generate_until([request("the cat", {"until": ["\n"], "max_gen_toks": 8})])
    assert isinstance(text, str) and "\n" not in text
