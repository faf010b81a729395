"""Offline lm-evaluation-harness tasks: the YAMLs here read local jsonl files, so no hub is needed.

Where the files are: the `data_dir` metadata of the TaskManager (what `smdm eval --data-dir` passes), else the
environment variable SMDM_EVAL_DATA. Each YAML names its file (`arc_easy.jsonl`, ...) and the record kind; the
files come from `smdm eval convert` (smdm/tasks/commonsense.py) or are written by hand in the same format.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from smdm.data.jsonl import read_records
from smdm.errors import SmdmError

TASK_DIR = Path(__file__).resolve().parent
DATA_ENV = "SMDM_EVAL_DATA"


def task_names() -> list[str]:
    """The tasks shipped here: one YAML per task, named like the task."""
    return sorted(p.stem for p in TASK_DIR.glob("*.yaml"))


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding the task jsonl files: the explicit one, else $SMDM_EVAL_DATA."""
    chosen = data_dir or os.environ.get(DATA_ENV)
    if not chosen:
        raise SmdmError(f"no evaluation data directory: pass --data-dir (or data_dir metadata) or set {DATA_ENV}; "
                        "write one with `smdm eval convert`")
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise SmdmError(f"{path}: evaluation data directory does not exist; write it with `smdm eval convert`")
    return path


def _check_multiple_choice(record: dict, where: str) -> None:
    choices, gold = record.get("choices"), record.get("gold")
    if not isinstance(record.get("query"), str):
        raise SmdmError(f"{where}: missing string field 'query'")
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
        raise SmdmError(f"{where}: 'choices' must be a list of at least two non-empty strings")
    if not (isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(choices)):
        raise SmdmError(f"{where}: 'gold' must be an index into 'choices', got {gold!r}")


def _check_fields(*names: str):
    def check(record: dict, where: str) -> None:
        for name in names:
            if not (isinstance(record.get(name), str) and record[name].strip()):
                raise SmdmError(f"{where}: missing non-empty string field {name!r}")
    return check


SCHEMAS = {"multiple_choice": _check_multiple_choice, "lambada": _check_fields("text"),
           "completion": _check_fields("prompt", "completion")}


def read_task_file(path: Path, kind: str) -> list[tuple[str, dict[str, Any]]]:
    """Validated (file:line, record) pairs of one task file; every problem names file:line."""
    if kind not in SCHEMAS:
        raise SmdmError(f"unknown task file kind {kind!r}; use one of {', '.join(SCHEMAS)}")
    if not path.is_file():
        raise SmdmError(f"{path}: task file not found; write it with `smdm eval convert` or point --data-dir "
                        f"(or {DATA_ENV}) at the directory holding it")
    def parse(record: dict[str, Any], where: str) -> tuple[str, dict[str, Any]]:
        SCHEMAS[kind](record, where)
        return where, record

    return read_records(path, parse)[0]


@dataclass(frozen=True)
class TaskSpec:
    """What one shipped task reads: its file name in the data directory and the record kind."""

    name: str
    file: str
    kind: str

    def path(self, data_dir: str | os.PathLike | None = None) -> Path:
        return resolve_data_dir(data_dir) / self.file


class _IgnoreFunctions(yaml.SafeLoader):
    """Reads our YAMLs without importing the `!function` targets."""


_IgnoreFunctions.add_constructor("!function", lambda loader, node: None)


def task_spec(name: str) -> TaskSpec:
    """The file and kind a shipped task reads (from its YAML, the one place they are written)."""
    path = TASK_DIR / f"{name}.yaml"
    if not path.is_file():
        raise SmdmError(f"{name!r} is not one of our tasks ({', '.join(task_names())})")
    kwargs = (yaml.load(path.read_text(), Loader=_IgnoreFunctions) or {}).get("dataset_kwargs") or {}
    return TaskSpec(name, kwargs["file"], kwargs["kind"])


def load_local(file: str, kind: str, data_dir: str | None = None, split: str = "test", **_metadata: Any):
    """`custom_dataset` of the YAMLs: the task file as a one-split DatasetDict (lm-eval passes all metadata)."""
    import datasets

    records = [record for _, record in read_task_file(resolve_data_dir(data_dir) / file, kind)]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(records)})
