"""Shared fixtures: tiny configs, a prepared toy corpus, and the location of ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def shared_file(relative: str) -> Path:
    """A path under ../shared/data, or skip the test with a message when it is absent (a user's fresh clone)."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} not present (../shared/data is only on the developers' machines)")
    return path


@pytest.fixture(autouse=True)
def _single_thread_determinism():
    """Tests compare exact numbers across code paths; one thread keeps float reductions in one order."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `smdm ARGV` in-process: (exit code, stdout, stderr). An escaping exception fails the test."""
    from smdm.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    """The CLI's contract for bad input: exit code 2 and one `smdm: error:` line naming the problem."""
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("smdm: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


TOY_TEXT = [
    "the cat sat on the mat and the dog sat on the log.",
    "a bird in the hand is worth two in the bush.",
    "to be or not to be, that is the question.",
    "all that glitters is not gold; all who wander are not lost.",
    "the quick brown fox jumps over the lazy dog again and again.",
] * 8


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """A small corpus tokenized with a freshly trained BPE: the data directory of `smdm prepare`."""
    from smdm.data.prepare import PrepareConfig, prepare_corpus
    from smdm.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("toy")
    corpus = root / "corpus.jsonl"
    import json

    corpus.write_text("".join(json.dumps({"text": f"{i}: {t}"}) + "\n" for i, t in enumerate(TOY_TEXT)))
    tokenizer = train_bpe([t for t in TOY_TEXT], 300, root / "tokenizer.json")
    prepare_corpus([corpus], tokenizer, root / "tokens", PrepareConfig(val_fraction=0.2), progress=False)
    return root / "tokens"
