"""jsonl records (SFT data, task and benchmark files) checked one line at a time, each problem named by file:line.

A benchmark file with one broken line should either fail with that line's address (the default: a silently
smaller test set changes the metric) or, when asked, skip it and report it, never crash with a traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from smdm.errors import SmdmError

T = TypeVar("T")


def read_records(path: str | Path, parse: Callable[[dict, str], T], skip_bad_lines: bool = False,
                 limit: int | None = None) -> tuple[list[T], list[str]]:
    """(records, problems of the lines skipped): `parse(obj, "file:line")` turns an object into a record or raises
    SmdmError; bad JSON, non-objects and parse errors fail at once unless skip_bad_lines. Stops after `limit` records.
    """
    path = Path(path)
    if not path.is_file():
        raise SmdmError(f"{path}: no such file")
    records: list[T] = []
    problems: list[str] = []
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            if limit is not None and len(records) >= limit:
                break
            where = f"{path}:{lineno}"
            try:
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError:
                    raise SmdmError(f"{where}: not UTF-8") from None
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SmdmError(f"{where}: bad JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise SmdmError(f"{where}: expected a JSON object")
                records.append(parse(obj, where))
            except SmdmError as error:
                if not skip_bad_lines:
                    raise
                problems.append(str(error))
    if not records:
        raise SmdmError(f"{path}: no usable records" + (f" ({len(problems)} bad lines skipped)" if problems else ""))
    return records, problems


def string_field(obj: dict, key: str, where: str) -> str:
    """obj[key] as a non-empty string, else an error naming the line and the field."""
    if key not in obj:
        raise SmdmError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise SmdmError(f"{where}: field {key!r} must be a non-empty string")
    return value


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """Write one JSON object per line atomically (temp file + rename): a half-written file would silently shorten
    an evaluation or a training set. Parent directories are created; a write failure is one SmdmError line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise SmdmError(f"could not write {path}: {error.strerror or error}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
