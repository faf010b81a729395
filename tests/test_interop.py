"""Hugging Face interop against the peers' own code: tiny random Llama / Qwen2 (transformers) and LLaDA / Dream
(../shared/reference, Fast-dLLM's copies of their modeling files) saved with save_pretrained, loaded by smdm.

Oracles: logits within 1e-5 (fp32); low-confidence block sampling token-identical to LLaDA's `generate`; exports
loaded by transformers / LLaDA's / Dream's code give the same logits; smdm -> HF -> smdm is bit-exact.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, TOY_TEXT, assert_one_line_error, run_cli
from safetensors.torch import load_file, save_file

from smdm.checkpoint import load_checkpoint, load_for_inference, save_checkpoint
from smdm.config import ModelConfig
from smdm.errors import SmdmError
from smdm.interop import load_model_dir
from smdm.interop.export import export_hf
from smdm.model import Transformer
from smdm.sample import generate

REFERENCE = REPO_ROOT.parent / "shared" / "reference"
ROWS, MASK = 320, 310  # embedding rows of the tiny foreign models; [MASK] inside them, as in LLaDA / Dream
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (norms and biases too), so a misplaced tensor cannot hide behind an init of 0/1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator) * 0.1
            param.copy_(1.0 + noise if name.endswith("norm.weight") else noise)


@pytest.fixture(scope="module")
def peers():
    """(llada_config, llada_model, llada_generate, dream_config, dream_model) from ../shared/reference."""
    if not (REFERENCE / "load.py").is_file():
        pytest.skip(f"{REFERENCE} not present (the peers' model code is only on the developers' machines)")
    pytest.importorskip("transformers")
    sys.path.insert(0, str(REFERENCE))
    try:
        import load
    finally:
        sys.path.remove(str(REFERENCE))
    llada_config, llada_model = load.llada()
    # generate.py imports `model.modeling_llada`: load it while the LLaDA package is the one named `model`.
    spec = importlib.util.spec_from_file_location("llada_generate", REFERENCE / "fast_dllm" / "llada" / "generate.py")
    llada_generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(llada_generate)
    dream_config, dream_model = load.dream()
    return llada_config, llada_model, llada_generate.generate, dream_config, dream_model


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 300-token BPE (fewer tokens than the 320 embedding rows, as LLaDA pads its embedding)."""
    from smdm.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("tok")
    train_bpe(TOY_TEXT, 300, root / "tokenizer.json")
    return root


def _with_tokenizer(directory: Path, tokenizer_dir: Path, chat_template: str | None = None) -> Path:
    (directory / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    record = {"eos_token": "<|endoftext|>"}
    if chat_template:
        record["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(record))
    return directory


def _peer_load(config_cls, model_cls, directory: Path) -> torch.nn.Module:
    """The peer's own classes on the directory's config.json and weights (their from_pretrained breaks under
    transformers 5: LLaDA never calls post_init, Dream's generation config fails validation)."""
    model = model_cls(config_cls.from_pretrained(str(directory)))
    weights = load_file(str(directory / "model.safetensors"))
    model.load_state_dict(weights, strict=not getattr(model.config, "tie_word_embeddings", False))
    return model.eval()


def _llada(peers, tmp_path, tokenizer_dir, seed=0, **overrides) -> tuple[torch.nn.Module, Path]:
    config_cls, model_cls = peers[0], peers[1]
    options = {"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2, "mlp_hidden_size": 96, "vocab_size": ROWS,
                   "embedding_size": ROWS, "mask_token_id": MASK, "block_type": "llama", "activation_type": "silu",
                   "layer_norm_type": "rms", "rope": True, "rope_theta": 500000.0, "weight_tying": False, "include_bias": False,
                   "max_sequence_length": 128, "rms_norm_eps": 1e-5, "attention_dropout": 0.0, "residual_dropout": 0.0,
                   "embedding_dropout": 0.0, "eos_token_id": 0, "pad_token_id": 0}
    options.update(overrides)
    model = model_cls(config_cls(**options), init_params=True)
    _randomize(model, seed)
    model.eval().save_pretrained(tmp_path / "llada")
    return model, _with_tokenizer(tmp_path / "llada", tokenizer_dir)


def _dream(peers, tmp_path, tokenizer_dir, seed=0) -> tuple[torch.nn.Module, Path]:
    config_cls, model_cls = peers[3], peers[4]
    model = model_cls(config_cls(vocab_size=ROWS, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, mask_token_id=MASK, pad_token_id=0,
                                 max_position_embeddings=128, rope_theta=1000000.0, rms_norm_eps=1e-6))
    _randomize(model, seed)
    model.eval().save_pretrained(tmp_path / "dream")
    return model, _with_tokenizer(tmp_path / "dream", tokenizer_dir)


def _hf_causal(family: str, tmp_path, tokenizer_dir, tie: bool = False) -> tuple[torch.nn.Module, Path]:
    transformers = pytest.importorskip("transformers")
    config_cls = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
    model_cls = transformers.LlamaForCausalLM if family == "llama" else transformers.Qwen2ForCausalLM
    config = config_cls(vocab_size=ROWS, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        rope_theta=250000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie, eos_token_id=0)
    with _plain_transformers():
        model = model_cls(config)
    _randomize(model, 1)
    model.eval().save_pretrained(tmp_path / family)
    return model, _with_tokenizer(tmp_path / family, tokenizer_dir)


@contextlib.contextmanager
def _plain_transformers():
    """Without the 'default' RoPE initialiser load.py adds for Dream, which transformers' own Llama/Qwen2 (whose
    configs keep rope_theta in rope_parameters) would otherwise pick up and fail on."""
    from transformers import modeling_rope_utils as rope

    patched = rope.ROPE_INIT_FUNCTIONS.pop("default", None)
    try:
        yield
    finally:
        if patched is not None:
            rope.ROPE_INIT_FUNCTIONS["default"] = patched


def _ids(n: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 300, (n, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- import: logits

@pytest.mark.parametrize("family,tie", [("llama", False), ("qwen2", True), ("qwen2", False)])
def test_llama_and_qwen2_import_as_arms_with_equal_logits(family, tie, tmp_path, tokenizer_dir):
    theirs, directory = _hf_causal(family, tmp_path, tokenizer_dir, tie)
    checkpoint, tokenizer = load_for_inference(directory, None, "cpu")
    assert checkpoint.meta["objective"] == "arm" and checkpoint.model.causal
    config = checkpoint.config
    assert (config.n_query_groups, config.rope_base, config.qkv_bias, config.tie_embeddings) == \
        (2, 250000.0, family == "qwen2", tie)
    assert tokenizer.vocab_size == 300 and checkpoint.config.vocab_size == ROWS
    x = _ids()
    torch.testing.assert_close(checkpoint.model(x), theirs(x).logits, **TOL)


def test_llada_imports_as_an_mdm_with_its_mask_id_and_equal_logits(peers, tmp_path, tokenizer_dir):
    theirs, directory = _llada(peers, tmp_path, tokenizer_dir, include_qkv_bias=True)
    checkpoint = load_checkpoint(directory)
    assert checkpoint.meta["objective"] == "mdm" and not checkpoint.model.causal
    assert checkpoint.model.mask_id == MASK and checkpoint.model.embed.weight.shape[0] == ROWS
    x = _ids()
    x[:, 5:9] = MASK
    torch.testing.assert_close(checkpoint.model(x), theirs(x, use_cache=False).logits, **TOL)


def test_dream_imports_as_a_shifted_mdm_whose_logit_i_predicts_token_i(peers, tmp_path, tokenizer_dir):
    theirs, directory = _dream(peers, tmp_path, tokenizer_dir)
    checkpoint = load_checkpoint(directory)
    assert checkpoint.config.shifted and checkpoint.config.qkv_bias and checkpoint.model.mask_id == MASK
    x = _ids()
    x[:, 5:9] = MASK
    raw = theirs(x).logits
    shifted = torch.cat([raw[:, :1], raw[:, :-1]], dim=1)  # Dream's generation_utils.py
    torch.testing.assert_close(checkpoint.model(x), shifted, **TOL)


def test_bf16_is_kept_when_asked(peers, tmp_path, tokenizer_dir):
    theirs, directory = _llada(peers, tmp_path, tokenizer_dir)
    checkpoint = load_model_dir(directory, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in checkpoint.model.parameters())
    assert load_checkpoint(directory, dtype="auto").model.embed.weight.dtype == torch.float32  # as saved
    expected = theirs.state_dict()["model.transformer.blocks.1.up_proj.weight"].to(torch.bfloat16)
    assert torch.equal(checkpoint.model.blocks[1].mlp.gate_up.weight[96:], expected)


def test_sharded_checkpoint_streams_every_shard(tmp_path, tokenizer_dir):
    theirs, _directory = _hf_causal("llama", tmp_path, tokenizer_dir)
    sharded = tmp_path / "sharded"
    theirs.save_pretrained(sharded, max_shard_size="40KB")
    assert len(list(sharded.glob("*.safetensors"))) > 2
    x = _ids()
    torch.testing.assert_close(load_checkpoint(sharded).model(x), theirs(x).logits, **TOL)


# --------------------------------------------------------------------------------------------- import: sampling

class _Logits:
    """What LLaDA's `generate` calls: model(x).logits (and model.device); `shift` applies Dream's sampler shift."""

    def __init__(self, model, shift: bool, **kwargs) -> None:
        self.model, self.shift, self.kwargs, self.device = model, shift, kwargs, torch.device("cpu")

    def __call__(self, x):
        logits = self.model(x, **self.kwargs).logits
        if self.shift:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return type("Out", (), {"logits": logits})


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_block_sampling_is_token_identical_to_the_peers_generate(family, peers, tmp_path, tokenizer_dir):
    # LLaDA's generate (low-confidence remasking, semi-autoregressive blocks) on the peer's own network; for Dream,
    # the network's logits shifted exactly as Dream's sampler shifts them.
    if family == "llada":
        theirs, directory = _llada(peers, tmp_path, tokenizer_dir)
        peer = _Logits(theirs, shift=False, use_cache=False)
    else:
        theirs, directory = _dream(peers, tmp_path, tokenizer_dir)
        peer = _Logits(theirs, shift=True)
    model = load_checkpoint(directory).model
    prompt = _ids(1, 7, seed=3)
    expected, _ = peers[2](peer, prompt, steps=8, gen_length=16, block_length=8, temperature=0.0,
                           remasking="low_confidence", mask_id=MASK)
    ours = generate(model, prompt, 16, steps=8, block_length=8, remasking="low_confidence")
    assert torch.equal(ours.tokens, expected)
    assert not (expected == MASK).any()


# --------------------------------------------------------------------------------------------- export

def _smdm_checkpoint(tmp_path, tokenizer_dir, objective: str, **overrides) -> Path:
    config = ModelConfig.from_name("tiny-test", vocab_size=300, block_size=64, n_query_groups=2, **overrides)
    torch.manual_seed(5)
    model = Transformer(config, causal=objective == "arm")
    _randomize(model, 7)
    meta = {"objective": objective}
    return save_checkpoint(tmp_path / f"{objective}-ckpt", model, config, meta,
                           tokenizer_file=tokenizer_dir / "tokenizer.json")


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": True, "tie_embeddings": True}])
def test_arm_exports_to_a_plain_transformers_model_and_round_trips_bit_exactly(overrides, tmp_path, tokenizer_dir,
                                                                                capsys):
    transformers = pytest.importorskip("transformers")
    source = _smdm_checkpoint(tmp_path, tokenizer_dir, "arm", **overrides)
    out = tmp_path / "hf"
    code, _stdout, err = run_cli(capsys, "export", "--checkpoint", str(source), "--format", "hf", "--out", str(out))
    assert code == 0, err
    record = json.loads((out / "config.json").read_text())
    assert record["architectures"] == ["Qwen2ForCausalLM" if overrides else "LlamaForCausalLM"]
    assert "auto_map" not in record
    with _plain_transformers():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = load_checkpoint(source).model
    x = _ids(seed=4)
    torch.testing.assert_close(theirs(x).logits, ours(x), **TOL)
    back = load_checkpoint(out)
    assert back.config == load_checkpoint(source).config and back.meta["objective"] == "arm"
    _assert_same_state(back.model, ours)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" in config and (out / "tokenizer.json").is_file()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 0


def test_mdm_exports_to_llada_layout_that_llada_loads(peers, tmp_path, tokenizer_dir):
    source = _smdm_checkpoint(tmp_path, tokenizer_dir, "mdm")
    out = export_hf(source, tmp_path / "llada-out")
    record = json.loads((out / "config.json").read_text())
    assert record["model_type"] == "llada" and record["mask_token_id"] == 300 and record["embedding_size"] == 301
    theirs = _peer_load(peers[0], peers[1], out)
    ours = load_checkpoint(source).model
    x = _ids(seed=6)
    x[:, 3:7] = 300  # smdm's [MASK]
    torch.testing.assert_close(theirs(x, use_cache=False).logits[..., :300], ours(x), **TOL)
    _assert_same_state(load_checkpoint(out).model, ours)


def test_llada_and_dream_round_trip_through_smdm(peers, tmp_path, tokenizer_dir):
    for family in ("llada", "dream"):
        theirs, directory = (_llada if family == "llada" else _dream)(peers, tmp_path, tokenizer_dir)
        out = export_hf(directory, tmp_path / f"{family}-again")
        config_cls, model_cls = (peers[0], peers[1]) if family == "llada" else (peers[3], peers[4])
        again = _peer_load(config_cls, model_cls, out)
        original, exported = theirs.state_dict(), load_file(str(out / "model.safetensors"))
        for key, tensor in exported.items():
            assert torch.equal(tensor, original[key]), key
        x = _ids(seed=8)
        kwargs = {"use_cache": False} if family == "llada" else {}
        assert torch.equal(again(x, **kwargs).logits, theirs(x, **kwargs).logits)


# --------------------------------------------------------------------------------------------- bad input

def test_bad_directories_are_one_line_errors_and_export_writes_nothing(tmp_path, tokenizer_dir, capsys):
    _, good = _hf_causal("llama", tmp_path, tokenizer_dir)
    capsys.readouterr()  # save_pretrained's progress bars

    def attempt(directory: Path, *fragments: str) -> None:
        out = tmp_path / "never"
        code, _, err = run_cli(capsys, "export", "--checkpoint", str(directory), "--out", str(out))
        assert_one_line_error(code, err, *fragments)
        assert not out.exists() and not list(tmp_path.glob(".never*"))
        code, _, err = run_cli(capsys, "sample", "--checkpoint", str(directory), "--prompt", "the", "--length", "4",
                               "--device", "cpu")
        assert_one_line_error(code, err, *fragments)

    def variant(name: str) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        for file in good.iterdir():
            (directory / file.name).write_bytes(file.read_bytes())
        return directory

    empty = tmp_path / "empty"
    empty.mkdir()
    attempt(empty, "no smdm checkpoint or Hugging Face model")
    no_weights = variant("no-weights")
    (no_weights / "model.safetensors").unlink()
    attempt(no_weights, "no weights")
    unknown = variant("unknown")
    record = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**record, "model_type": "mamba", "architectures": ["Mamba"]}))
    attempt(unknown, "'mamba' is not supported")
    sharded = variant("missing-shard")
    weights = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = sorted(weights)
    save_file({k: weights[k] for k in names[:5]}, str(sharded / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {k: f"model-0000{1 if i < 5 else 2}-of-00002.safetensors" for i, k in enumerate(names)}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    attempt(sharded, "model-00002-of-00002.safetensors", "missing")
    wrong = variant("wrong-shape")
    (wrong / "config.json").write_text(json.dumps({**record, "intermediate_size": 128}))
    attempt(wrong, "has shape", "config.json implies")
    truncated = variant("truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-100])
    attempt(truncated, "truncated")
    small = variant("small-vocab")
    (small / "config.json").write_text(json.dumps({**record, "vocab_size": 200}))
    attempt(small, "has shape")  # the weights have 320 rows
    # A tokenizer with more tokens than the embedding has rows: the weights fit config.json, the tokenizer does not.
    few_rows, _ = tmp_path / "few", None
    transformers = pytest.importorskip("transformers")
    with _plain_transformers():
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=280, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    model.save_pretrained(few_rows)
    capsys.readouterr()
    _with_tokenizer(few_rows, tokenizer_dir)
    attempt(few_rows, "300 tokens, more than the model's 280 embedding rows")


def test_export_refuses_a_non_empty_out_and_leaves_it_untouched(tmp_path, tokenizer_dir, capsys):
    source = _smdm_checkpoint(tmp_path, tokenizer_dir, "arm")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "export", "--checkpoint", str(source), "--out", str(out))
    assert_one_line_error(code, err, "not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_shifted_mdm_needs_a_prompt(tmp_path):
    model = Transformer(ModelConfig.from_name("tiny-test", vocab_size=50, shifted=True))
    with pytest.raises(SmdmError, match="shifted"):
        generate(model, [[]], 4)
    from smdm.likelihood import mc_score

    with pytest.raises(SmdmError, match="shifted"):
        mc_score(model, [], [1, 2, 3])


def test_sft_starts_from_a_llada_directory(peers, tmp_path, tokenizer_dir, capsys):
    # `smdm sft --init-from DIR`: tokenizer from the directory, the 320-row embedding (more rows than the
    # tokenizer's 300 tokens) accepted, LLaDA's [MASK] id used; with lr ~ 0 the weights stay the imported ones.
    theirs, directory = _llada(peers, tmp_path, tokenizer_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"the cat {i}", "completion": " sat on the mat"}) + "\n"
                            for i in range(8)))
    capsys.readouterr()
    code, _stdout, err = run_cli(capsys, "sft", "--data", str(data), "--init-from", str(directory), "--out",
                                str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "4", "--lr", "1e-12",
                                "--warmup-steps", "0", "--val-fraction", "0", "--no-progress", "--threads", "1")
    assert code == 0, err
    tuned = load_checkpoint(tmp_path / "run")
    assert tuned.config.mask_token_id == MASK and tuned.meta["objective"] == "mdm"
    x = _ids(seed=9)
    torch.testing.assert_close(tuned.model(x), theirs(x, use_cache=False).logits, rtol=1e-4, atol=1e-4)


def test_sampling_is_token_identical_to_dreams_own_sampler(peers, tmp_path, tokenizer_dir, capsys):
    # Dream's `_sample` (generation_utils.py) with alg="confidence_threshold" and threshold 0 reveals exactly
    # gen_length / steps of the most confident masked tokens per step, on logits it shifts itself: low-confidence
    # remasking in one block. Our sampler runs on the imported (shifted) model.
    from types import SimpleNamespace

    theirs, directory = _dream(peers, tmp_path, tokenizer_dir, seed=2)
    model = load_checkpoint(directory).model
    prompt = _ids(1, 6, seed=5)
    settings = SimpleNamespace(output_history=False, return_dict_in_generate=False, max_length=6 + 16,
                               mask_token_id=MASK, steps=8, eps=1e-3, alg="confidence_threshold", alg_temp=None,
                               temperature=0.0, top_p=None, top_k=None)
    with torch.no_grad():
        expected = theirs._sample(prompt, None, settings, lambda step, x, logits: x,
                                  lambda step, x, logits: logits, threshold=0.0)
    capsys.readouterr()  # Dream's sampler prints its step count and time
    ours = generate(model, prompt, 16, steps=8, remasking="low_confidence")
    assert torch.equal(ours.tokens, expected)
    assert not (expected == MASK).any()


@pytest.mark.parametrize("steps", [16, 8, 5])
def test_dream_schedule_is_token_identical_to_dreams_default_sampler(peers, tmp_path, tokenizer_dir, capsys, steps):
    # Dream's default `_sample` (alg="maskgit_plus", greedy): per step int(n·(1 - s/t)) of the n masked tokens on
    # timesteps linspace(1, 1e-3, steps + 1), the most confident first, the rest at the last step.
    from types import SimpleNamespace

    theirs, directory = _dream(peers, tmp_path, tokenizer_dir, seed=3)
    model = load_checkpoint(directory).model
    prompt = _ids(1, 6, seed=7)
    settings = SimpleNamespace(output_history=False, return_dict_in_generate=False, max_length=6 + 16,
                               mask_token_id=MASK, steps=steps, eps=1e-3, alg="maskgit_plus", alg_temp=None,
                               temperature=0.0, top_p=None, top_k=None)
    with torch.no_grad():
        expected = theirs._sample(prompt, None, settings, lambda step, x, logits: x, lambda step, x, logits: logits)
    capsys.readouterr()
    first: list[int] = []
    ours = generate(model, prompt, 16, steps=steps, schedule="dream",
                    on_step=lambda step, x: first.append(int((x == MASK).sum())) if step == 0 else None)
    assert torch.equal(ours.tokens, expected)
    # Its own schedule, not the even split: with one token per step on average, its first step reveals none.
    assert (16 - first[0]) == (0 if steps == 16 else int(16 * (1 - (1 - 0.999 / steps))))


def test_bf16_directory_exports_as_bf16_bit_exactly(peers, tmp_path, tokenizer_dir):
    theirs, _directory = _llada(peers, tmp_path, tokenizer_dir)
    theirs.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    _with_tokenizer(tmp_path / "bf16", tokenizer_dir)
    out = export_hf(tmp_path / "bf16", tmp_path / "bf16-again")
    original, exported = load_file(str(tmp_path / "bf16" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert original.keys() == exported.keys()
    for key in original:
        assert exported[key].dtype == torch.bfloat16 and torch.equal(exported[key], original[key]), key
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_lm_eval_model_scores_with_a_dream_directory(peers, tmp_path, tokenizer_dir):
    # The lm-eval adapter on an imported shifted MDM: an empty context is conditioned on EOS (as for an ARM), and
    # the score equals the library's Monte-Carlo bound on the same (prefix, target).
    pytest.importorskip("lm_eval")
    from smdm.harness import SmdmLM
    from smdm.likelihood import score

    _, directory = _dream(peers, tmp_path, tokenizer_dir)
    lm = SmdmLM(checkpoint=str(directory), device="cpu", mc_samples=8, batch_size=8)
    prefix, target = lm.scoring_pair("", "the cat sat")
    assert prefix == [lm.tokenizer.eos_id] and target
    expected = score(lm.model, prefix, target, method="mc", mc_samples=8, batch_size=8, seed=0).nll
    assert lm.loglikelihood_pair("", "the cat sat")[0] == pytest.approx(-expected)
    half = SmdmLM(checkpoint=str(directory), device="cpu", dtype="bf16")
    assert half.model.embed.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_decoding_of_an_imported_arm_matches_transformers_generate(family, tmp_path, tokenizer_dir):
    theirs, directory = _hf_causal(family, tmp_path, tokenizer_dir, tie=family == "qwen2")
    model = load_checkpoint(directory).model
    prompt = _ids(1, 5, seed=11)
    with _plain_transformers():
        expected = theirs.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12,
                                   pad_token_id=0, eos_token_id=None)
    for cache in ("kv", "none"):
        assert torch.equal(generate(model, prompt, 12, cache=cache).tokens, expected)


def test_chain_rule_likelihood_of_dream_matches_its_network_with_the_shift(peers, tmp_path, tokenizer_dir):
    # -log p(target | prefix) revealing left to right, computed by hand on Dream's own network (logits shifted as
    # its sampler shifts them) equals smdm's chain-rule score on the imported model.
    from smdm.likelihood import chain_rule_score

    theirs, directory = _dream(peers, tmp_path, tokenizer_dir, seed=4)
    model = load_checkpoint(directory).model
    prefix, target = [5, 17, 42], [7, 99, 3, 250]
    expected = 0.0
    with torch.no_grad():
        for k in range(len(target)):
            x = torch.tensor([prefix + target[:k] + [MASK] * (len(target) - k)])
            logits = theirs(x).logits
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            expected -= torch.log_softmax(logits[0, len(prefix) + k].double(), -1)[target[k]].item()
    assert chain_rule_score(model, prefix, target).nll == pytest.approx(expected, rel=1e-5)
