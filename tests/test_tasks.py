"""GSM8K and MT-Bench tasks: answer normalisation, accuracy, two-stage generation, FastChat answer files, the
GSM8K pipeline end to end on the real data, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
from conftest import assert_one_line_error, run_cli, shared_file

from smdm.data.sft import SFTConfig, chat_prompt
from smdm.errors import SmdmError
from smdm.sample import SamplerSettings
from smdm.tasks import gsm8k, mtbench
from smdm.tasks.gsm8k import (
    GSM8KConfig,
    accuracy,
    evaluate_gsm8k,
    extract_answer,
    format_prompt,
    is_correct,
    normalize_number,
    write_sft_file,
)
from smdm.tasks.mtbench import MTBenchConfig, generate_answers

# ---------------------------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("text, expected", [
    ("72", "72"),
    ("1,000", "1000"),
    ("$1,000.00", "1000"),  # decimals equal to integers are integers
    ("12,345,678.90", "12345678.9"),
    ("0.50", "0.5"),
    (".5", "0.5"),
    ("18 dollars.", "18"),  # units and the trailing period
    ("50%", "50"),
    ("$ 7", "7"),
    ("-5", "-5"),
    ("-$5", "-5"),
    ("3/4", "0.75"),
    ("-3/4", "-0.75"),
    ("1/3", "1/3"),  # no terminating decimal: an exact fraction
    ("6/3", "2"),
    ("5.", "5"),
    ("1,2,3", "1"),  # a list, not a thousands separator
    ("10 - 5", "10"),  # a minus with a space is an operator, not a sign
    ("v2 7", "7"),  # digits inside a word are not a number
    ("seventy", None),
    ("", None),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("She sold 48/2 = 24 clips.\nAltogether 48+24 = 72.\n#### 72", "72"),
    ("Total: $1,200.\n#### $1,200.00 dollars", "1200"),
    ("#### 5 apples and 3 pears", "5"),  # the first number after the mark
    ("#### 7\n#### 9", "7"),  # the first mark
    ("She has 3 and then 4 more, so 7 in all.", "7"),  # no mark: the last number
    ("3 then 4 ####", "4"),  # a mark without a number: the last number
    ("The loss is -15.", "-15"),
    ("no numbers here", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_accuracy_on_hand_made_generations():
    generations = ["2 + 3 = 5\n#### 5", "#### 1,000", "It is 12 dollars.", "#### 4", "I don't know", "#### -2.0"]
    targets = ["5", "1000", "12", "5", "3", "-2"]
    assert [is_correct(g, t) for g, t in zip(generations, targets)] == [True, True, True, False, False, True]
    assert accuracy(generations, targets) == pytest.approx(4 / 6)
    with pytest.raises(SmdmError):
        accuracy(["#### 1"], [])


def test_write_sft_file_formats_prompts_and_strips_calculator(tmp_path):
    src = tmp_path / "train.jsonl"
    src.write_text(json.dumps({"question": "Q1?", "answer": "48/2 = <<48/2=24>>24.\n#### 24"}) + "\n"
                   + "not json\n" + json.dumps({"question": "Q2?", "answer": "#### 1"}) + "\n")
    info = write_sft_file(src, tmp_path / "sft.jsonl", skip_bad_lines=True)
    rows = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert info["examples"] == 2 and info["bad_lines"] == 1 and f"{src}:2" in info["problems"][0]
    assert rows[0] == {"prompt": "Question: Q1?\nAnswer:", "response": " 48/2 = 24.\n#### 24"}
    write_sft_file(src, tmp_path / "keep.jsonl", strip_calculator=False, limit=1, skip_bad_lines=True)
    rows = [json.loads(line) for line in (tmp_path / "keep.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and "<<48/2=24>>" in rows[0]["response"]
    with pytest.raises(SmdmError, match=f"{src}:2"):
        write_sft_file(src, tmp_path / "strict.jsonl")


# --------------------------------------------------------------------------------------------- tiny chat models

QUESTIONS = ["Write a poem about the sea.", "Name a fruit.", "What is two plus two?", "Say hello.",
             "Describe a cat.", "Tell me a joke."]
REPLY = "I am a tiny model."


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory):
    """A tiny ARM and MDM fine-tuned (briefly) to give one reply in the chat template, with their BPE."""
    from smdm.finetune import finetune
    from smdm.tokenizer import train_bpe
    from smdm.train import TrainConfig

    root = tmp_path_factory.mktemp("chat")
    (root / "chat.jsonl").write_text("".join(json.dumps({"prompt": q, "response": REPLY}) + "\n" for q in QUESTIONS))
    texts = [chat_prompt([(q, REPLY)]) for q in QUESTIONS] * 3 + [format_prompt("Tom has 3 apples. #### 5")]
    train_bpe(texts, 300, root / "tok.json")
    for objective, steps in (("arm", 40), ("mdm", 80)):
        config = TrainConfig(data_dir="", out_dir=str(root / objective), model="tiny-test", objective=objective,
                             max_steps=steps, batch_size=6, lr=3e-3, eval_every=10**9, save_every=10**6,
                             log_every=10**6, progress=False, threads=1)
        finetune([root / "chat.jsonl"], config, SFTConfig(template="chat"), tokenizer=root / "tok.json")
    return root


def _load(root, objective):
    from smdm.checkpoint import load_for_inference

    return load_for_inference(str(root / objective / "checkpoint"), None, "cpu")


class GenerateSpy:
    """Records every call of the real `generate` (prompts and options) and passes it through."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, model, prompts, length, **options):
        self.calls.append({"prompts": [list(p) for p in prompts], "length": length, **options})
        return self.real(model, prompts, length, **options)


def _problems_file(path, n=3, long_question=False):
    rows = [{"question": f"Tom has {k} apples and buys {k + 1} more. How many?", "answer": f"{k}+{k + 1}\n#### "
             f"{2 * k + 1}"} for k in range(n)]
    if long_question:
        rows.append({"question": "apples " * 200, "answer": "#### 1"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_two_stage_generates_reasoning_then_answer_with_their_own_cfg(chat_models, tmp_path, monkeypatch):
    checkpoint, tokenizer = _load(chat_models, "mdm")
    spy = GenerateSpy(gsm8k.generate)
    monkeypatch.setattr(gsm8k, "generate", spy)
    config = GSM8KConfig(test_file=str(_problems_file(tmp_path / "test.jsonl")), length=16,
                         sampler=SamplerSettings(steps=8, cfg_scale=0.5),
                         two_stage=True, answer_cfg_scale=2.0, answer_length=4, batch_size=2)
    metrics, records = evaluate_gsm8k(checkpoint.model, tokenizer, config, progress=False)
    assert metrics["n"] == 3 and metrics["mode"] == "two-stage"
    # Two batches (2 + 1 questions), each: the reasoning stage, then the answer stage.
    assert [(c["length"], c["settings"].cfg_scale) for c in spy.calls] == [(16, 0.5), (4, 2.0), (16, 0.5), (4, 2.0)]
    assert spy.calls[0]["settings"].steps == 8 and spy.calls[1]["settings"].steps == 4
    for reasoning_call, answer_call in ((spy.calls[0], spy.calls[1]), (spy.calls[2], spy.calls[3])):
        for prompt, second in zip(reasoning_call["prompts"], answer_call["prompts"]):
            assert second[:len(prompt)] == prompt  # the question stays, followed by the reasoning and ####
            assert tokenizer.decode(second[len(prompt):]).endswith("\n####")
    for record in records:
        reasoning = record["generation"].split("\n####", 1)[0]
        assert record["generation"] == reasoning + "\n####" + record["answer_stage"]
        assert record["prediction"] == extract_answer(record["generation"])


def test_one_stage_calls_generate_once_per_batch_and_skips_questions_longer_than_the_context(chat_models, tmp_path,
                                                                                             monkeypatch):
    checkpoint, tokenizer = _load(chat_models, "arm")
    spy = GenerateSpy(gsm8k.generate)
    monkeypatch.setattr(gsm8k, "generate", spy)
    config = GSM8KConfig(test_file=str(_problems_file(tmp_path / "t.jsonl", long_question=True)), length=8)
    metrics, records = evaluate_gsm8k(checkpoint.model, tokenizer, config, progress=False)
    assert len(spy.calls) == 1 and spy.calls[0]["settings"].mdm_only() == {}  # an ARM gets no MDM options
    assert metrics["n"] == 3 and metrics["skipped_too_long"] == 1 and len(records) == 3


# ---------------------------------------------------------------------------------------------------- MT-Bench


def _questions_file(path):
    rows = [{"question_id": 81, "category": "writing", "turns": ["Write a poem about the sea.", "Make it shorter."]},
            {"question_id": 82, "category": "math", "turns": ["What is two plus two?", "And times three?"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("objective", ["arm", "mdm"])
def test_mtbench_answers_in_fastchat_format_with_turn_two_after_turn_one(chat_models, tmp_path, capsys, monkeypatch,
                                                                        objective):
    spy = GenerateSpy(mtbench.generate)
    monkeypatch.setattr(mtbench, "generate", spy)
    extra = ["--steps", "4", "--cfg-scale", "1.5"] if objective == "mdm" else []
    code, out, err = run_cli(capsys, "task", "mtbench", "--checkpoint", str(chat_models / objective / "checkpoint"),
                             "--questions", str(_questions_file(tmp_path / "q.jsonl")), "--out", str(tmp_path / "o"),
                             "--model-id", f"tiny-{objective}", "--length", "8", "--no-progress", *extra)
    assert code == 0, err
    lines = (tmp_path / "o" / "model_answer" / f"tiny-{objective}.jsonl").read_text().splitlines()
    answers = [json.loads(line) for line in lines]
    assert [a["question_id"] for a in answers] == [81, 82]
    for a in answers:
        assert set(a) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert a["model_id"] == f"tiny-{objective}" and len(a["answer_id"]) == 22
        assert isinstance(a["tstamp"], float) and len(a["choices"]) == 1 and a["choices"][0]["index"] == 0
        assert len(a["choices"][0]["turns"]) == 2 and all(isinstance(t, str) for t in a["choices"][0]["turns"])
    if objective == "arm":  # it learned its one reply
        assert answers[0]["choices"][0]["turns"][0] == REPLY
    # Turn 2 is asked after the model's own turn-1 answer, in the chat template.
    _, tokenizer = _load(chat_models, objective)
    assert len(spy.calls) == 2 and spy.calls[0]["settings"].cfg_scale == (1.5 if objective == "mdm" else None)
    for k, a in enumerate(answers):
        first = a["choices"][0]["turns"][0]
        assert first, "an empty turn-1 answer would make this check vacuous"
        second_prompt = tokenizer.decode(spy.calls[1]["prompts"][k])
        assert first + "\n<|user|>\n" + ["Make it shorter.", "And times three?"][k] in second_prompt
    record = json.loads((tmp_path / "o" / "mtbench.json").read_text())
    assert record["metrics"]["questions"] == 2 and record["metrics"]["turns"] == 4
    assert len(record["model"]["weights_sha256"]) == 64 and record["settings"]["length"] == 8
    assert "| writing | 1 |" in out and "| math | 1 |" in out


def test_mtbench_cuts_long_conversations_from_the_left(chat_models, tmp_path):
    checkpoint, tokenizer = _load(chat_models, "mdm")
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question_id": "long", "category": "x", "turns": ["sea " * 300 + "Name a fruit."]})
                    + "\n")
    records, stats, _ = generate_answers(checkpoint.model, tokenizer,
                                         MTBenchConfig(questions_file=str(path), model_id="m", length=8),
                                         progress=False)
    assert stats["truncated_prompts"] == 1 and len(records[0]["choices"][0]["turns"]) == 1


# ------------------------------------------------------------------------------------- GSM8K on the real data


def test_task_gsm8k_end_to_end_on_real_data(tmp_path, capsys):
    train = shared_file("gsm8k/train.jsonl")
    test = shared_file("gsm8k/test_dev.jsonl")
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "task", "gsm8k", "--train", str(train), "--test", str(test), "--out",
                                str(out), "--train-limit", "16", "--epochs", "2", "--batch-size", "4", "--limit", "4",
                                "--length", "32", "--steps", "8", "--two-stage", "--cfg-scale", "0.5",
                                "--answer-cfg-scale", "1.0", "--answer-length", "8", "--threads", "1",
                                "--no-progress")
    assert code == 0, err
    assert len((out / "gsm8k_sft.jsonl").read_text().splitlines()) == 16
    record = json.loads((out / "gsm8k.json").read_text())
    metrics = record["metrics"]
    assert metrics["n"] + metrics["skipped_too_long"] == 4 and metrics["n"] >= 1
    assert record["settings"]["two_stage"] and record["settings"]["train_limit"] == 16
    assert record["model"]["objective"] == "mdm" and len(record["model"]["weights_sha256"]) == 64
    generations = [json.loads(line) for line in (out / "gsm8k_generations.jsonl").read_text().splitlines()]
    references = [json.loads(line)["answer"].rsplit("####", 1)[1].strip() for line in test.open()][:4]
    assert [g["reference"] for g in generations] == references[:len(generations)]
    assert metrics["correct"] == sum(g["correct"] for g in generations)
    assert len(generations) == metrics["n"] and metrics["accuracy"] == pytest.approx(metrics["correct"] / metrics["n"])
    for g in generations:  # each verdict: the extracted final answer equals the reference number
        assert g["correct"] == (g["prediction"] is not None and float(g["prediction"]) == float(g["reference"]))
    assert "| two-stage |" in stdout
    # The saved model evaluated again gives the same generations.
    code, _, err = run_cli(capsys, "task", "gsm8k", "--test", str(test), "--out", str(tmp_path / "again"),
                           "--checkpoint", str(out / "run" / "checkpoint"), "--limit", "4", "--length", "32",
                           "--steps", "8", "--two-stage", "--cfg-scale", "0.5", "--answer-cfg-scale", "1.0",
                           "--answer-length", "8", "--no-progress")
    assert code == 0, err
    again = [json.loads(line) for line in (tmp_path / "again" / "gsm8k_generations.jsonl").read_text().splitlines()]
    assert [g["generation"] for g in again] == [g["generation"] for g in generations]


# --------------------------------------------------------------------------------------------------- bad input


def test_gsm8k_bad_input(chat_models, tmp_path, capsys):
    mdm, arm = str(chat_models / "mdm" / "checkpoint"), str(chat_models / "arm" / "checkpoint")
    good = _problems_file(tmp_path / "good.jsonl")
    base = ["task", "gsm8k", "--out", str(tmp_path / "o"), "--length", "8", "--no-progress"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + "{broken\n")
    code, _, err = run_cli(capsys, *base, "--test", str(bad), "--checkpoint", mdm)
    assert_one_line_error(code, err, f"{bad}:4", "bad JSON")
    code, _, err = run_cli(capsys, *base, "--test", str(bad), "--checkpoint", mdm, "--skip-bad-lines")
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "gsm8k.json").read_text())["metrics"]["skipped_bad_lines"] == 1

    bad.write_text(json.dumps({"question": "q"}) + "\n")
    code, _, err = run_cli(capsys, *base, "--test", str(bad), "--checkpoint", mdm)
    assert_one_line_error(code, err, f"{bad}:1", "'answer'")
    bad.write_text(json.dumps({"question": "q", "answer": "forty-two"}) + "\n")
    code, _, err = run_cli(capsys, *base, "--test", str(bad), "--checkpoint", mdm)
    assert_one_line_error(code, err, f"{bad}:1", "####")

    code, _, err = run_cli(capsys, *base, "--test", str(good), "--checkpoint", arm, "--cfg-scale", "1")
    assert_one_line_error(code, err, "classifier-free guidance", "ARM")
    code, _, err = run_cli(capsys, *base, "--test", str(good), "--checkpoint", arm, "--two-stage",
                           "--answer-cfg-scale", "1")
    assert_one_line_error(code, err, "classifier-free guidance", "ARM")
    # Refused before any training starts.
    code, _, err = run_cli(capsys, *base, "--test", str(good), "--train", str(good), "--objective", "arm",
                           "--cfg-scale", "1")
    assert_one_line_error(code, err, "classifier-free guidance", "--cfg-scale")
    assert not (tmp_path / "o" / "run").exists()
    code, _, err = run_cli(capsys, *base, "--test", str(good), "--checkpoint", mdm, "--answer-cfg-scale", "1")
    assert_one_line_error(code, err, "--two-stage")
    code, _, err = run_cli(capsys, *base, "--test", str(good))
    assert_one_line_error(code, err, "--train", "--checkpoint")
    code, _, err = run_cli(capsys, *base, "--test", str(tmp_path / "missing.jsonl"), "--checkpoint", mdm)
    assert_one_line_error(code, err, "missing.jsonl")
    code, _, err = run_cli(capsys, *base, "--test", str(good), "--checkpoint", mdm, "--length", "200")
    assert_one_line_error(code, err, "--length 200", "context length 128")


def test_mtbench_bad_input(chat_models, tmp_path, capsys):
    mdm, arm = str(chat_models / "mdm" / "checkpoint"), str(chat_models / "arm" / "checkpoint")
    questions = _questions_file(tmp_path / "q.jsonl")
    base = ["task", "mtbench", "--out", str(tmp_path / "o"), "--length", "4", "--no-progress"]

    code, _, err = run_cli(capsys, *base, "--questions", str(questions), "--checkpoint", arm, "--cfg-scale", "1")
    assert_one_line_error(code, err, "classifier-free guidance", "ARM")
    code, _, err = run_cli(capsys, *base, "--questions", str(questions), "--checkpoint", mdm, "--model-id", "a/b")
    assert_one_line_error(code, err, "model id")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(questions.read_text() + json.dumps({"question_id": 3, "category": "x"}) + "\n[1]\n")
    code, _, err = run_cli(capsys, *base, "--questions", str(bad), "--checkpoint", mdm)
    assert_one_line_error(code, err, f"{bad}:3", "'turns'")
    code, _, err = run_cli(capsys, *base, "--questions", str(bad), "--checkpoint", mdm, "--skip-bad-lines")
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "mtbench.json").read_text())["metrics"]["skipped_bad_lines"] == 2
    bad.write_text(json.dumps({"question_id": 1, "category": "x", "turns": []}) + "\n")
    code, _, err = run_cli(capsys, *base, "--questions", str(bad), "--checkpoint", mdm)
    assert_one_line_error(code, err, f"{bad}:1", "non-empty list")
