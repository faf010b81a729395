"""One tokenizer interface over HF `tokenizers` and SentencePiece, so data prep, training and sampling need not care."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from smdm.errors import SmdmError

MASK_TEXT = "[MASK]"
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
BPE_EOS = "<|endoftext|>"
# smdm's own chat format (the one `smdm.data.sft` renders) as a Jinja template, used when a tokenizer brings none.
BUILTIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>\n"
    "{% elif message['role'] == 'system' %}<|system|>\n"
    "{% else %}<|user|>\n{% endif %}"
    "{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _sha256_files(paths: Sequence[Path]) -> str:
    """Hash the exact bytes the tokenizer was built from, so data and checkpoints can detect a swapped tokenizer."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _config_token(path: Path, key: str) -> str | None:
    """The text of a special token named in a tokenizer_config.json (a string or {"content": ...}), if readable."""
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get(key) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None  # reported by Tokenizer._with_config
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


def _one_line(exc: BaseException) -> str:
    """Collapse a backend exception to one line so SmdmError messages stay one line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


class Tokenizer:
    """Text <-> ids with the ids the model needs (EOS for packing/padding, an extra MASK id) in one place."""

    def __init__(self, path: Path, files: Sequence[Path], backend: str, impl: object,
                 eos_token: str | None = None) -> None:
        self.path = Path(path)
        self.backend = backend  # "hf" or "sentencepiece"
        self._impl = impl
        self.files = [Path(f) for f in files]
        self.fingerprint = _sha256_files(files)
        self.chat_template: str | None = None  # the tokenizer's own Jinja template (tokenizer_config.json)
        if backend == "sentencepiece":
            sp = impl
            self.vocab_size = int(sp.get_piece_size())
            eos = int(sp.eos_id())
            if eos < 0:
                raise SmdmError(f"{path}: SentencePiece model defines no EOS id; use a model trained with eos_id >= 0")
            self.eos_id = eos
            bos = int(sp.bos_id())
            self.bos_id = bos if bos >= 0 else None
            # Control pieces (<s>, </s>) decode to "" in sentencepiece; render them literally like HF does.
            self._special_text = {i: sp.id_to_piece(i) for i in range(self.vocab_size) if sp.is_control(i)}
        else:
            tok = impl
            self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
            vocab = tok.get_vocab(with_added_tokens=True)
            # The EOS a tokenizer_config.json names (Llama 3: <|end_of_text|>) before the usual names.
            eos = next((vocab[t] for t in (eos_token, *EOS_CANDIDATES) if t is not None and t in vocab), None)
            if eos is None:
                wanted = ", ".join(EOS_CANDIDATES)
                raise SmdmError(f"{path}: no end-of-document token (one of {wanted}) in the vocabulary")
            self.eos_id = int(eos)
            bos = next((vocab[t] for t in BOS_CANDIDATES if t in vocab), None)
            self.bos_id = int(bos) if bos is not None else None
            self._special_text = {}
        self.pad_id = self.eos_id
        self.mask_id = self.vocab_size

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load by file type so callers can pass whatever tokenizer artifact they have."""
        p = Path(path)
        if not p.exists():
            raise SmdmError(
                f"{p}: tokenizer not found; pass a tokenizer.json, a SentencePiece .model, or a directory with one"
            )
        if p.is_dir():
            if (p / "tokenizer.json").is_file():
                return cls._load_hf_json(p / "tokenizer.json")
            if (p / "tokenizer.model").is_file():
                return cls._load_sentencepiece(p / "tokenizer.model")
            if (p / "encoder.json").is_file() and (p / "vocab.bpe").is_file():
                return cls._load_gpt2_dir(p)
            raise SmdmError(f"{p}: directory has no tokenizer.json, tokenizer.model, or encoder.json+vocab.bpe")
        suffix = p.suffix.lower()
        if suffix == ".json":
            return cls._load_hf_json(p)
        if suffix == ".model":
            return cls._load_sentencepiece(p)
        raise SmdmError(f"{p}: unknown tokenizer file type {suffix or '(none)'}; expected .json or .model")

    @classmethod
    def _load_hf_json(cls, p: Path) -> Tokenizer:
        """Load a HF tokenizer.json."""
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(str(p))
        except Exception as exc:  # tokenizers raises plain Exception on bad JSON
            raise SmdmError(f"{p}: not a valid HF tokenizer.json ({_one_line(exc)})") from exc
        config = p.parent / "tokenizer_config.json"
        return cls(p, [p], "hf", tok, eos_token=_config_token(config, "eos_token"))._with_config(config)

    @classmethod
    def _load_sentencepiece(cls, p: Path) -> Tokenizer:
        """Load a SentencePiece model (Llama / TinyLlama tokenizer)."""
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_file=str(p))
        except Exception as exc:
            raise SmdmError(f"{p}: not a valid SentencePiece model ({_one_line(exc)})") from exc
        return cls(p, [p], "sentencepiece", sp)._with_config(p.parent / "tokenizer_config.json")

    def _with_config(self, path: Path) -> Tokenizer:
        """Apply a HF tokenizer_config.json beside the tokenizer: its EOS/BOS/PAD tokens and Jinja chat template.

        A model's directory says which token ends a turn (LLaDA-Instruct: <|eot_id|>, Qwen2: <|im_end|>), which the
        vocabulary-name guesses above cannot know.
        """
        if not path.is_file():
            return self
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SmdmError(f"{path}: not valid JSON ({_one_line(exc)})") from None
        if not isinstance(record, dict):
            raise SmdmError(f"{path}: expected a JSON object")
        for key, attribute in (("eos_token", "eos_id"), ("bos_token", "bos_id"), ("pad_token", "pad_id")):
            token = record.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            token_id = self.token_id(token) if isinstance(token, str) else None
            if token_id is not None:
                setattr(self, attribute, token_id)
        template = record.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if isinstance(t, dict)
                             and t.get("name") == "default"), None)
        if isinstance(template, str) and template.strip():
            self.chat_template = template
        return self

    def token_id(self, text: str) -> int | None:
        """Id of one token given by its text (e.g. "</s>"), or None if it is not in the vocabulary."""
        if self.backend == "sentencepiece":
            piece = int(self._impl.piece_to_id(text))
            return piece if piece != self._impl.unk_id() or text == self._impl.id_to_piece(piece) else None
        found = self._impl.token_to_id(text)
        return None if found is None else int(found)

    def token_text(self, token_id: int) -> str:
        """The text of one token id (its piece / vocabulary entry)."""
        if self.backend == "sentencepiece":
            return str(self._impl.id_to_piece(token_id))
        return str(self._impl.id_to_token(token_id))

    def chat_template_source(self) -> str:
        """The Jinja chat template in force: the tokenizer's own, else smdm's built-in one."""
        return self.chat_template or BUILTIN_CHAT_TEMPLATE

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Render {role, content} messages (system, user, assistant) as the model was trained to see them.

        Uses the tokenizer's own template when it has one (as `transformers` does), in a sandboxed Jinja environment;
        system messages are system turns in both.
        """
        try:
            from jinja2 import TemplateError
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as exc:
            raise SmdmError("chat templates need jinja2: pip install jinja2") from exc

        def raise_exception(message: str) -> None:
            raise SmdmError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = raise_exception
        try:
            template = env.from_string(self.chat_template_source())
            return template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.token_text(self.bos_id) if self.bos_id is not None else "",
                eos_token=self.token_text(self.eos_id),
            )
        except TemplateError as exc:
            raise SmdmError(f"{self.path}: chat template error ({_one_line(exc)})") from None

    @classmethod
    def _load_gpt2_dir(cls, p: Path) -> Tokenizer:
        """Load GPT-2 style encoder.json + vocab.bpe as byte-level BPE, exactly as GPT-2 tokenizes."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        enc, merges = p / "encoder.json", p / "vocab.bpe"
        try:
            model = models.BPE.from_file(str(enc), str(merges))
            tok = HFTokenizer(model)
        except Exception as exc:
            raise SmdmError(f"{p}: encoder.json/vocab.bpe are not a valid BPE vocabulary ({_one_line(exc)})") from exc
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        vocab = tok.get_vocab(with_added_tokens=True)
        specials = [t for t in EOS_CANDIDATES + BOS_CANDIDATES if t in vocab]
        if specials:
            tok.add_special_tokens(specials)  # keeps their existing ids; stops BPE from splitting them
        return cls(p, [enc, merges], "hf", tok)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Raw ids (no post-processor specials), with BOS/EOS only where the caller asks."""
        if self.backend == "sentencepiece":
            ids = list(self._impl.encode(text))
        else:
            ids = list(self._impl.encode(text, add_special_tokens=False).ids)
        if bos:
            if self.bos_id is None:
                raise SmdmError(f"{self.path}: tokenizer has no BOS token; encode with bos=False")
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many documents at once; the backends parallelise this, which dominates data-prep time."""
        if not texts:
            return []
        if self.backend == "sentencepiece":
            return [list(x) for x in self._impl.encode(list(texts))]
        return [list(e.ids) for e in self._impl.encode_batch(list(texts), add_special_tokens=False)]

    def _decode_run(self, ids: list[int]) -> str:
        """Decode a run of ordinary ids."""
        if self.backend == "sentencepiece":
            return self._impl.decode(ids)
        return self._impl.decode(ids, skip_special_tokens=False)

    def _starts_with_space_marker(self, token_id: int) -> bool:
        """Whether a token carries a word-initial space that a backend would strip at the start of a decode."""
        if self.backend == "sentencepiece":
            piece = self._impl.id_to_piece(token_id)
        else:
            piece = self._impl.id_to_token(token_id)
        return bool(piece) and piece.startswith("\u2581")

    def decode(self, ids: Sequence[int]) -> str:
        """Text for ids, with mask ids (>= vocab_size) shown as "[MASK]" so partially denoised samples are readable."""
        ids = [int(i) for i in ids]
        parts: list[str] = []
        run: list[int] = []

        def flush() -> None:
            if not run:
                return
            text = self._decode_run(run)
            # SentencePiece/Metaspace drop the leading space of a decode; keep it when the run follows other text.
            if parts and self._starts_with_space_marker(run[0]) and not text.startswith(" "):
                text = " " + text
            parts.append(text)
            run.clear()

        for i in ids:
            if i >= self.vocab_size or i < 0:
                flush()
                parts.append(MASK_TEXT)
            elif i in self._special_text:
                flush()
                parts.append(self._special_text[i])
            else:
                run.append(i)
        flush()
        return "".join(parts)

    def __repr__(self) -> str:
        return (
            f"Tokenizer({str(self.path)!r}, backend={self.backend}, "
            f"vocab_size={self.vocab_size}, eos_id={self.eos_id})"
        )


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str | Path) -> Tokenizer:
    """Train a byte-level BPE on the user's own corpus, so small demos need no downloaded tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    min_size = len(alphabet) + 1
    if vocab_size < min_size:
        raise SmdmError(f"vocab_size {vocab_size} is too small for byte-level BPE; use at least {min_size}")
    out = Path(out_path)
    if out.suffix.lower() != ".json":
        out = out / "tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOS],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.token_to_id(BPE_EOS) != 0:
        raise SmdmError(f"BPE training did not place {BPE_EOS} at id 0; this is a bug in smdm")

    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        tok.save(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Tokenizer.from_file(out)
