"""Converters into the jsonl the offline lm-eval tasks read (smdm/tasks/lm_eval/*.yaml).

Multiple choice: one `{"query", "choices", "gold"}` object per line; the model scores `query + " " + choice`
(lm-eval's default target delimiter) and the gold index is the right choice. LAMBADA: `{"text"}`. Generation:
`{"prompt", "completion"}`.

Sources: the zero-shot commonsense sets of AGI-Edgerunners/LLM-Adapters (`<subset>/test.json`, a JSON list of
`{instruction, answer, ...}` with the choices inside the instruction as `Answer1: … Answer2: …`), and a user's own
copies of the official HellaSwag, RACE and LAMBADA files. Every problem is reported as `file:line: what`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from smdm.data.jsonl import write_jsonl
from smdm.errors import SmdmError


@dataclass(frozen=True)
class Subset:
    """One LLM-Adapters subset: where it lives and how its instruction is phrased."""

    task: str  # the jsonl stem our YAMLs read, e.g. "arc_easy" for task smdm_arc_easy
    folder: str
    lead_in: str  # text before the question, checked so a file of another subset is not silently misread
    query: str  # how the question is shown to the model (the lm-eval wording of the task)


_ANSWER = "Please choose the correct answer to the question: "
SUBSETS: dict[str, Subset] = {s.task: s for s in (
    Subset("arc_easy", "ARC-Easy", _ANSWER, "Question: {q}\nAnswer:"),
    Subset("arc_challenge", "ARC-Challenge", _ANSWER, "Question: {q}\nAnswer:"),
    Subset("openbookqa", "openbookqa", _ANSWER, "{q}"),
    Subset("social_iqa", "social_i_qa", _ANSWER, "Question: {q}\nAnswer:"),
    Subset("piqa", "piqa", "Please choose the correct solution to the question: ", "Question: {q}\nAnswer:"),
    Subset("winogrande", "winogrande",
           "Please choose the correct answer to fill in the blank to complete the given sentence: ", "{q}"),
    Subset("boolq", "boolq", "Please answer the following question with true or false, question: ",
           "Question: {q}\nAnswer:"),
)}
BOOLQ_CHOICES = ["no", "yes"]  # lm-eval's boolq wording; gold 1 for "true"
_FIRST_CHOICE = re.compile(r"\s*\b(Answer|Solution|Option)1:\s*")


def iter_json_records(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, value) of each record of a JSON array file or a jsonl file, so errors can say file:line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SmdmError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SmdmError(f"{path}: cannot read ({error})") from None
    if text.lstrip().startswith("["):
        yield from _array_records(path, text)
        return
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise SmdmError(f"{path}:{number}: not JSON ({error.msg})") from None


def _array_records(path: Path, text: str) -> Iterator[tuple[int, object]]:
    """Walk a JSON array element by element (raw_decode), keeping each element's line."""
    decoder = json.JSONDecoder()
    at = text.index("[") + 1
    while True:
        at = _skip_space(text, at)
        if at < len(text) and text[at] == "]":
            return
        try:
            value, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as error:
            raise SmdmError(f"{path}:{error.lineno}: not JSON ({error.msg})") from None
        yield text.count("\n", 0, at) + 1, value
        at = _skip_space(text, end)
        if at < len(text) and text[at] == ",":
            at += 1
        elif at >= len(text) or text[at] != "]":
            raise SmdmError(f"{path}:{text.count(chr(10), 0, at) + 1}: not JSON (expected ',' or ']')")


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at


def _field(record: object, name: str, where: str) -> str:
    if not isinstance(record, dict):
        raise SmdmError(f"{where}: expected an object, got {type(record).__name__}")
    value = record.get(name)
    if not isinstance(value, str):
        raise SmdmError(f"{where}: missing string field {name!r} (fields: {', '.join(map(str, record)) or 'none'})")
    return value


def convert_record(subset: Subset, record: object, where: str) -> dict:
    """One LLM-Adapters record -> {"query", "choices", "gold"}; `where` is file:line for errors."""
    instruction, answer = _field(record, "instruction", where), _field(record, "answer", where).strip().lower()
    if not instruction.startswith(subset.lead_in):
        raise SmdmError(f"{where}: instruction does not start with {subset.lead_in.strip()!r} "
                        f"(is this the {subset.folder} file?)")
    body = instruction[len(subset.lead_in):].rpartition("Answer format:")[0] or instruction[len(subset.lead_in):]
    if subset.task == "boolq":
        if answer not in ("true", "false"):
            raise SmdmError(f"{where}: answer {answer!r} is not true/false")
        question = body.strip()
        return {"query": subset.query.format(q=question), "choices": BOOLQ_CHOICES, "gold": int(answer == "true")}
    first = _FIRST_CHOICE.search(body)
    if first is None:
        raise SmdmError(f"{where}: no 'Answer1:' (or Solution1/Option1) choices in the instruction")
    question, label = body[:first.start()].strip(), first.group(1)
    pieces = re.split(rf"\s*\b{label}(\d+):\s*", body[first.start():])[1:]
    numbers, choices = [int(n) for n in pieces[0::2]], [c.strip() for c in pieces[1::2]]
    if numbers != list(range(1, len(numbers) + 1)) or len(choices) < 2 or not all(choices):
        raise SmdmError(f"{where}: choices are not numbered {label}1..{label}N with text")
    match = re.fullmatch(rf"{label.lower()}(\d+)", answer)
    if match is None or not 1 <= int(match.group(1)) <= len(choices):
        raise SmdmError(f"{where}: answer {answer!r} is not one of {label.lower()}1..{label.lower()}{len(choices)}")
    gold = int(match.group(1)) - 1
    if subset.task == "winogrande":  # score "option + rest of the sentence" after the text before the blank
        if question.count("_") != 1:
            raise SmdmError(f"{where}: the sentence needs exactly one '_' blank")
        before, after = question.split("_")
        return {"query": before.rstrip(), "choices": [c + after for c in choices], "gold": gold}
    return {"query": subset.query.format(q=question), "choices": choices, "gold": gold}


def convert_subset(subset: Subset, source: Path) -> list[dict]:
    """All records of one LLM-Adapters file, converted."""
    return [convert_record(subset, record, f"{source}:{line}") for line, record in iter_json_records(source)]


def convert_commonsense(source_dir: str | Path, out_dir: str | Path, tasks: list[str] | None = None,
                        split: str = "test") -> dict[str, int]:
    """Convert `<source_dir>/<folder>/<split>.json` of each subset into `<out_dir>/<task>.jsonl`; returns counts.

    Every file is converted before any is written, so a bad file leaves the output directory unchanged.
    """
    names = tasks or list(SUBSETS)
    unknown = [n for n in names if n not in SUBSETS]
    if unknown:
        raise SmdmError(f"unknown commonsense task {unknown[0]!r}; use one of {', '.join(SUBSETS)}")
    converted = {name: convert_subset(SUBSETS[name], Path(source_dir) / SUBSETS[name].folder / f"{split}.json")
                 for name in names}
    for name, records in converted.items():
        write_jsonl(Path(out_dir) / f"{name}.jsonl", records)
    return {name: len(records) for name, records in converted.items()}


# --- A user's own copies of the paper's other benchmarks, in their official formats --------------------------------

def _hellaswag_text(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: drop the WikiHow bracket tags and double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def convert_hellaswag(source: Path) -> list[dict]:
    """Official HellaSwag jsonl (`ctx_a`, `ctx_b`, `activity_label`, `endings`, `label`), worded as lm-eval does."""
    records = []
    for line, record in iter_json_records(source):
        where = f"{source}:{line}"
        ctx = _field(record, "ctx_a", where) + " " + _field(record, "ctx_b", where).capitalize()
        endings, label = record.get("endings"), record.get("label")
        if not (isinstance(endings, list) and all(isinstance(e, str) for e in endings) and len(endings) >= 2):
            raise SmdmError(f"{where}: 'endings' must be a list of strings")
        if str(label) not in {str(i) for i in range(len(endings))}:
            raise SmdmError(f"{where}: 'label' must index the endings, got {label!r}")
        records.append({"query": _hellaswag_text(_field(record, "activity_label", where) + ": " + ctx),
                        "choices": [_hellaswag_text(e) for e in endings], "gold": int(label)})
    return records


def convert_race(source: Path) -> list[dict]:
    """Official RACE (a directory of .txt/.json files, each `{article, questions, options, answers}`): one item per
    question, the article before it."""
    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    if not files:
        raise SmdmError(f"{source}: no RACE files here")
    records = []
    for path in files:
        for line, record in iter_json_records(path):
            where = f"{path}:{line}"
            article = _field(record, "article", where)
            questions, options, answers = (record.get(k) for k in ("questions", "options", "answers"))
            if not (isinstance(questions, list) and isinstance(options, list) and isinstance(answers, list)
                    and len(questions) == len(options) == len(answers)):
                raise SmdmError(f"{where}: 'questions', 'options', 'answers' must be lists of one length")
            for question, choices, answer in zip(questions, options, answers):
                if not isinstance(choices, list) or answer not in list("ABCDEFGH"[:len(choices)]):
                    raise SmdmError(f"{where}: answer {answer!r} does not name one of the options")
                records.append({"query": f"Article: {article}\n\nQuestion: {question}\nAnswer:",
                                "choices": [str(c) for c in choices], "gold": "ABCDEFGH".index(answer)})
    return records


def convert_lambada(source: Path) -> list[dict]:
    """LAMBADA as plain text (one passage per line) or as jsonl with a "text" field -> {"text"}."""
    if source.suffix in (".jsonl", ".json"):
        return [{"text": _field(record, "text", f"{source}:{line}")} for line, record in iter_json_records(source)]
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SmdmError(f"{source}: no such file") from None
    return [{"text": line.strip()} for line in lines if line.strip()]


OFFICIAL = {"hellaswag": convert_hellaswag, "race": convert_race, "lambada": convert_lambada}


def convert_official(kind: str, source: str | Path, out_dir: str | Path) -> int:
    """Convert a user's copy of HellaSwag, RACE or LAMBADA into `<out_dir>/<kind>.jsonl`; returns the count."""
    if kind not in OFFICIAL:
        raise SmdmError(f"unknown format {kind!r}; use one of commonsense, {', '.join(OFFICIAL)}")
    records = OFFICIAL[kind](Path(source))
    if not records:
        raise SmdmError(f"{source}: no records")
    write_jsonl(Path(out_dir) / f"{kind}.jsonl", records)
    return len(records)
