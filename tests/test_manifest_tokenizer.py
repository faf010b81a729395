"""The tokenizer a data manifest records is found from any directory, and never left out of a checkpoint silently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TOY_TEXT, assert_one_line_error, run_cli

from smdm.data.prepare import MANIFEST, tokenizer_file
from smdm.errors import SmdmError
from smdm.tokenizer import train_bpe

TRAIN = ("--model", "tiny-test", "--seq-len", "32", "--batch-size", "2", "--max-steps", "1", "--no-progress",
         "--threads", "1", "--eval-blocks", "2", "--eval-mc-samples", "1")


@pytest.fixture
def project(tmp_path, toy_data) -> Path:
    """A user's project directory: a corpus and a tokenizer under relative paths."""
    root = tmp_path / "project"
    (root / "runs" / "demo").mkdir(parents=True)
    shutil.copy(toy_data.parent / "tokenizer.json", root / "runs" / "demo" / "tokenizer.json")
    (root / "corpus.txt").write_text("\n\n".join(TOY_TEXT))
    return root


def test_relative_tokenizer_path_works_from_another_directory(project, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(project)
    code, _, err = run_cli(capsys, "prepare", "--input", "corpus.txt", "--tokenizer", "runs/demo/tokenizer.json",
                           "--out", "data", "--val-fraction", "0.3")
    assert code == 0, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = run_cli(capsys, "train", "--data", str(project / "data"), "--out", "run", *TRAIN)
    assert code == 0, err
    assert (elsewhere / "run" / "checkpoint" / "tokenizer.json").is_file()
    code, out, err = run_cli(capsys, "sample", "--checkpoint", "run", "--length", "4", "--steps", "2",
                             "--seed", "0")
    assert code == 0 and out.strip(), err


def test_missing_tokenizer_stops_before_training(toy_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(toy_data, data)
    manifest = json.loads((data / MANIFEST).read_text())
    manifest["tokenizer"]["path"] = str(tmp_path / "moved" / "tokenizer.json")
    (data / MANIFEST).write_text(json.dumps(manifest))
    code, _, err = run_cli(capsys, "train", "--data", str(data), "--out", str(tmp_path / "run"), *TRAIN)
    assert_one_line_error(code, err, "moved/tokenizer.json", "not found")
    assert not (tmp_path / "run").exists()  # no run directory, no checkpoint without its tokenizer


def test_tokenizer_path_relative_to_the_manifest(toy_data, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(toy_data, data)
    shutil.copy(toy_data.parent / "tokenizer.json", tmp_path / "tok.json")
    manifest = json.loads((data / MANIFEST).read_text())
    manifest["tokenizer"]["path"] = "../tok.json"
    monkeypatch.chdir(toy_data)  # a cwd where ../tok.json does not exist
    assert tokenizer_file(manifest, data) == (tmp_path / "tok.json").resolve()


def test_another_tokenizer_under_the_recorded_name_is_refused(toy_data, tmp_path):
    manifest = json.loads((toy_data / MANIFEST).read_text())
    other = train_bpe(["a completely different corpus of words"] * 4, 280, tmp_path / "tokenizer.json")
    manifest["tokenizer"]["path"] = str(other.path)
    with pytest.raises(SmdmError, match="not the tokenizer the data was prepared with"):
        tokenizer_file(manifest, toy_data)


def test_prepare_records_an_absolute_path(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    code, _, err = run_cli(capsys, "prepare", "--input", "corpus.txt", "--tokenizer", "runs/demo/tokenizer.json",
                           "--out", "data")
    assert code == 0, err
    recorded = json.loads((project / "data" / MANIFEST).read_text())["tokenizer"]["path"]
    assert Path(recorded) == (project / "runs" / "demo" / "tokenizer.json").resolve()
