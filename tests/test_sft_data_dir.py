"""SFT data: the data directory is replaced atomically, and chat roles keep their own tags."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from smdm.data.sft import CHAT_ASSISTANT, CHAT_SYSTEM, CHAT_USER, SFTConfig, chat_prompt, prepare_sft, read_examples
from smdm.errors import SmdmError
from smdm.tokenizer import Tokenizer


@pytest.fixture
def tokenizer(toy_data) -> Tokenizer:
    return Tokenizer.from_file(toy_data.parent / "tokenizer.json")


def _pairs(path: Path, responses: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": "say", "response": r}) + "\n" for r in responses))
    return path


def test_failed_swap_keeps_the_previous_data(tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "data"
    first = prepare_sft([_pairs(tmp_path / "a.jsonl", ["the cat", "the dog"])], tokenizer, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_replace = os.replace

    def replace_failing_into_out(src, dst):
        if Path(dst) == out and Path(src).name.endswith(".tmp"):  # the new data moving in: e.g. a full disk
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_failing_into_out)
    with pytest.raises(OSError):
        prepare_sft([_pairs(tmp_path / "b.jsonl", ["a bird", "a fox", "a log"])], tokenizer, out)
    monkeypatch.setattr(os, "replace", real_replace)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old data, whole, where it was
    assert json.loads((out / "manifest.json").read_text())["splits"] == first["splits"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary or .old-PID left


def test_replacing_data_swaps_in_the_new_rows(tokenizer, tmp_path):
    out = tmp_path / "data"
    prepare_sft([_pairs(tmp_path / "a.jsonl", ["the cat", "the dog"])], tokenizer, out)
    second = prepare_sft([_pairs(tmp_path / "b.jsonl", ["a bird", "a fox", "a log"])], tokenizer, out)
    assert second["splits"]["train"]["examples"] == 3
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["examples"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_system_message_is_a_system_turn(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "system", "content": "be brief."},
                                             {"role": "user", "content": "capital of france?"},
                                             {"role": "assistant", "content": "paris."}]}) + "\n")
    [example], _ = read_examples(path, SFTConfig(template="chat"))
    assert example.prompt == CHAT_SYSTEM + "be brief.\n" + CHAT_USER + "capital of france?\n" + CHAT_ASSISTANT
    assert example.response == "paris."
    # Inference renders the same prompt, so a model fine-tuned with a system message is asked the same way.
    assert chat_prompt([("capital of france?", None)], system="be brief.") == example.prompt


def test_unknown_role_is_refused_with_its_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "tool", "content": "42"},
                                             {"role": "assistant", "content": "ok."}]}) + "\n")
    with pytest.raises(SmdmError, match=r"chat.jsonl:1: unknown role 'tool'"):
        read_examples(path, SFTConfig(template="chat"))
