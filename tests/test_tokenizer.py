"""Tokenizer: exact ids of the real Llama-2 / GPT-2 tokenizers, BPE training round-trips, one-line errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from smdm.errors import SmdmError
from smdm.tokenizer import MASK_TEXT, Tokenizer, train_bpe

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LLAMA = SHARED / "tokenizer_llama2" / "tokenizer.model"
GPT2 = SHARED / "tokenizer_gpt2"

UNICODE_SAMPLES = [
    "Hello world! The quick brown fox.",
    "naïve café — déjà vu; Straße, œuvre",
    "日本語のテキストと中文字符",
    "emoji 🤖🧪👩‍👩‍👧 and flags 🇫🇷",
    "combining e\u0301 and zero\u200bwidth, tabs\tand\nnewlines\r\n  double  spaces ",
    "Ελληνικά, русский, עברית, العربية",
    "\x00control\x07chars",
    "",
]


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"shared test data not found at {path} (only present in the development checkout)")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    corpus = [
        "The cat sat on the mat. The dog sat on the log.",
        "Masked diffusion models denoise masked tokens in parallel.",
        "Ünïcödé text: café, 日本語, emoji 🤖.",
    ] * 20
    return train_bpe(corpus, 300, tmp_path_factory.mktemp("bpe") / "tokenizer.json")


def test_llama_sentencepiece_ids() -> None:
    _need(LLAMA)
    tok = Tokenizer.from_file(LLAMA)
    assert tok.backend == "sentencepiece"
    assert tok.encode("Hello world!") == [15043, 3186, 29991]
    assert (tok.vocab_size, tok.eos_id, tok.bos_id, tok.pad_id, tok.mask_id) == (32000, 2, 1, 2, 32000)
    assert tok.encode("Hello world!", bos=True, eos=True) == [1, 15043, 3186, 29991, 2]
    assert tok.decode([15043, 3186, 29991]) == "Hello world!"
    assert tok.encode_batch(["Hello world!", "Hi"]) == [tok.encode("Hello world!"), tok.encode("Hi")]
    assert tok.fingerprint == hashlib.sha256(LLAMA.read_bytes()).hexdigest()
    # Loading the containing directory picks up tokenizer.model.
    assert Tokenizer.from_file(LLAMA.parent).encode("Hello world!") == [15043, 3186, 29991]


def test_llama_decode_mask_keeps_spaces() -> None:
    _need(LLAMA)
    tok = Tokenizer.from_file(LLAMA)
    ids = tok.encode("The quick brown fox jumps")
    ids[2] = tok.mask_id
    assert tok.decode(ids) == f"The quick{MASK_TEXT} fox jumps"
    assert tok.decode([tok.mask_id] * 2) == MASK_TEXT * 2
    assert tok.decode(tok.encode("a b", eos=True)).endswith("</s>")  # EOS is visible, not silently dropped


def test_gpt2_dir_ids() -> None:
    _need(GPT2)
    tok = Tokenizer.from_file(GPT2)
    text = "Hello world! The quick brown fox."
    assert tok.encode(text) == [15496, 995, 0, 383, 2068, 7586, 21831, 13]
    assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.mask_id, tok.bos_id) == (50257, 50256, 50256, 50257, None)
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("a<|endoftext|>b") == [64, 50256, 65]  # special token is atomic
    ids = tok.encode(text, eos=True)
    assert ids[-1] == 50256
    ids[1] = tok.mask_id
    assert tok.decode(ids) == f"Hello{MASK_TEXT}! The quick brown fox.<|endoftext|>"
    assert tok.encode_batch([text, "x"]) == [tok.encode(text), tok.encode("x")]
    for s in UNICODE_SAMPLES:
        assert tok.decode(tok.encode(s)) == s


def test_train_bpe_vocab_and_roundtrip(bpe: Tokenizer, tmp_path: Path) -> None:
    assert 257 <= bpe.vocab_size <= 300
    assert bpe.eos_id == 0 and bpe.pad_id == 0 and bpe.mask_id == bpe.vocab_size
    assert bpe.encode("x", eos=True)[-1] == 0
    for s in UNICODE_SAMPLES:
        ids = bpe.encode(s)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == s
    assert bpe.encode_batch(UNICODE_SAMPLES) == [bpe.encode(s) for s in UNICODE_SAMPLES]
    # Merges were learned: a frequent word is shorter than its bytes.
    assert len(bpe.encode("The cat sat on the mat.")) < len("The cat sat on the mat.")
    assert bpe.fingerprint == hashlib.sha256(bpe.path.read_bytes()).hexdigest()
    assert not [p for p in bpe.path.parent.iterdir() if p.name != "tokenizer.json"]  # no temp files left
    # Reload from the file and from its directory.
    again = Tokenizer.from_file(bpe.path.parent)
    assert again.encode("The cat") == bpe.encode("The cat") and again.fingerprint == bpe.fingerprint


def test_train_bpe_directory_target_and_too_small(tmp_path: Path) -> None:
    tok = train_bpe(["abc abc abd"] * 5, 260, tmp_path / "tok")
    assert tok.path == tmp_path / "tok" / "tokenizer.json"
    assert tok.vocab_size <= 260
    with pytest.raises(SmdmError, match="at least 257"):
        train_bpe(["abc"], 100, tmp_path / "small.json")


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("missing.model", None, "not found"),
        ("tok.txt", b"hello", "unknown tokenizer file type"),
        ("bad.json", b"{not json", "not a valid HF tokenizer.json"),
        ("bad.model", b"\x00\x01garbage", "not a valid SentencePiece model"),
    ],
)
def test_bad_tokenizer_files(tmp_path: Path, name: str, content: bytes | None, match: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SmdmError, match=match) as info:
        Tokenizer.from_file(path)
    msg = str(info.value)
    assert "\n" not in msg and name in msg


def test_directory_without_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(SmdmError, match="no tokenizer.json"):
        Tokenizer.from_file(tmp_path)


def test_hf_tokenizer_without_eos(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    path = tmp_path / "noeos.json"
    HFTokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).save(str(path))
    with pytest.raises(SmdmError, match="end-of-document"):
        Tokenizer.from_file(path)
    assert json.loads(path.read_text())["model"]["type"] == "WordLevel"


# --- Chat templates: the tokenizer's own Jinja template first, smdm's built-in one otherwise ------------------------

QWEN_STYLE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]


def _bpe_dir(tmp_path, config: dict | None) -> Tokenizer:
    from smdm.tokenizer import Tokenizer, train_bpe

    train_bpe(["the cat sat on the mat <|im_end|>"] * 4, 270, tmp_path / "tokenizer.json")
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_file(tmp_path)


def test_tokenizers_own_chat_template_is_used_with_system_turns(tmp_path):
    from smdm.data.sft import render_chat

    tokenizer = _bpe_dir(tmp_path, {"chat_template": QWEN_STYLE, "eos_token": "<|endoftext|>"})
    text = tokenizer.apply_chat_template(CHAT)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    example = render_chat(CHAT + [{"role": "assistant", "content": "Hello."}], "x", tokenizer)
    assert example.prompt == text and example.response == "Hello."


def test_builtin_chat_template_renders_system_turns_and_matches_the_sft_format(tmp_path):
    from smdm.data.sft import chat_prompt, chat_text
    from smdm.tokenizer import BUILTIN_CHAT_TEMPLATE

    tokenizer = _bpe_dir(tmp_path, None)
    assert tokenizer.chat_template is None and tokenizer.chat_template_source() == BUILTIN_CHAT_TEMPLATE
    rendered = tokenizer.apply_chat_template(CHAT)
    assert rendered == "<|system|>\nBe brief.\n<|user|>\nHi?\n<|assistant|>\n"
    assert chat_text(CHAT, tokenizer) == rendered  # the Python rendering SFT uses is the same template
    turns = [("a", "b"), ("c", None)]
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert chat_prompt(turns) == tokenizer.apply_chat_template(messages) == "<|user|>\na\n<|assistant|>\nb\n<|user|>\nc\n<|assistant|>\n"


def test_tokenizer_config_names_the_eos_token(tmp_path):
    tokenizer = _bpe_dir(tmp_path, None)
    assert tokenizer.eos_id == 0  # <|endoftext|> by name
    other = tokenizer.token_id("the")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "the"}}))
    from smdm.tokenizer import Tokenizer

    assert Tokenizer.from_file(tmp_path).eos_id == other


def test_eos_named_only_by_tokenizer_config_is_found(tmp_path):
    # Llama 3's vocabulary has none of the usual EOS names; its tokenizer_config.json names <|end_of_text|>.
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    tok = HFTokenizer(models.WordLevel({"hello": 0, "world": 1, "<|end_of_text|>": 2}, unk_token="hello"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(SmdmError, match="no end-of-document token"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    assert Tokenizer.from_file(tmp_path).eos_id == 2
