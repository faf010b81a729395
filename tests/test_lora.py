"""LoRA fine-tuning through PEFT: only the adapter trains, PEFT's own format, merge, resume, bad options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from safetensors.torch import load_file

from smdm.checkpoint import load_checkpoint
from smdm.config import ModelConfig
from smdm.errors import SmdmError
from smdm.finetune import finetune
from smdm.model import Transformer
from smdm.tokenizer import train_bpe
from smdm.train import TrainConfig, evaluate

peft = pytest.importorskip("peft", reason="LoRA tests need peft (pip install 'smdm[lora]')")

TEXTS = ["what is two plus two? four. what is one plus one? two. the capital of france is paris."] * 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer, prompt/response pairs, and a tiny base MDM and ARM fine-tuned on them (the models to adapt)."""
    root = tmp_path_factory.mktemp("lora")
    tokenizer = train_bpe(TEXTS, 280, root / "tokenizer.json")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is {w} plus {w}?", "completion": f" {w} and {w}."}) + "\n"
                            for w in ("one", "two", "four", "paris", "france", "capital") * 4))
    paths = {"tokenizer": Path(tokenizer.path), "data": data}
    for objective in ("mdm", "arm"):
        finetune([data], _config(root / f"base_{objective}", objective=objective, max_steps=2),
                 tokenizer=tokenizer.path)
        paths[objective] = root / f"base_{objective}"
    return paths


def _config(out: Path, **overrides) -> TrainConfig:
    settings = {"data_dir": "", "out_dir": str(out), "model": "tiny-test", "batch_size": 4, "lr": 1e-2,
                "eval_every": 1000, "save_every": 1000, "log_every": 1, "eval_blocks": 4, "progress": False,
                "threads": 1}
    settings.update(overrides)
    return TrainConfig(**settings)


def _lora_run(setup, out: Path, objective: str, **overrides) -> dict:
    options = {"objective": objective, "init_from": str(setup[objective]), "max_steps": 4, "lora_rank": 4,
               "merge": True, **overrides}
    return finetune([setup["data"]], _config(out, **options))


def _peft_model(base: Path, adapter: Path) -> torch.nn.Module:
    """What a PEFT user does: the base model, then PeftModel.from_pretrained on the adapter directory."""
    return peft.PeftModel.from_pretrained(load_checkpoint(base).model, str(adapter)).eval()


@pytest.mark.parametrize("objective", ["mdm", "arm"])
def test_only_the_adapter_trains_and_merge_equals_base_plus_adapter(setup, tmp_path, objective):
    summary = _lora_run(setup, tmp_path / "run", objective, lora_targets=["qkv", "gate_up", "down", "proj"])
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == ["down", "gate_up", "proj", "qkv"]
    assert config["base_model_name_or_path"] == str(setup[objective])
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in saved.items())  # B left zero: trained
    assert summary["trainable_params"] == sum(v.numel() for v in saved.values())
    # The optimizer covers the adapter only.
    state = torch.load(adapter / "state.pt", weights_only=True)
    assert set(state["optimizer"]["state"]) == {k.replace(".lora_A.", ".lora_A.default.").replace(
        ".lora_B.", ".lora_B.default.") for k in saved}

    base = load_checkpoint(setup[objective])
    merged = load_checkpoint(tmp_path / "run")
    assert merged.meta["lora_merged"] is True and merged.meta["lora"]["rank"] == 4
    assert merged.config == base.config
    base_weights, merged_weights = base.model.state_dict(), merged.model.state_dict()
    for name, weight in base_weights.items():
        adapted = any(f".{module}." in name for module in ("qkv", "gate_up", "down", "proj"))
        if adapted:  # W + (alpha / r) B A, and nothing else moved
            stem = name.removesuffix(".weight")
            delta = 2.0 * saved[f"base_model.model.{stem}.lora_B.weight"] @ saved[f"base_model.model.{stem}.lora_A.weight"]
            torch.testing.assert_close(merged_weights[name], weight + delta, atol=1e-6, rtol=0)
            assert delta.abs().max() > 0
        else:
            assert torch.equal(merged_weights[name], weight), name

    tokens = torch.randint(0, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        via_peft = _peft_model(setup[objective], adapter)(tokens)
        torch.testing.assert_close(merged.model(tokens), via_peft, atol=1e-5, rtol=0)
        assert not torch.allclose(base.model(tokens), via_peft, atol=1e-4)


def test_peft_loaded_adapter_is_the_trained_model(setup, tmp_path):
    """The validation loss the run reported is what PEFT's own loader gives on the saved adapter."""
    summary = _lora_run(setup, tmp_path / "run", "mdm", merge=False, lora_dropout=0.1)
    assert summary["checkpoint"] is None and not (tmp_path / "run" / "checkpoint").exists()
    from smdm.data.sft import SFTDataset
    from smdm.objectives import make_objective

    manifest = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    split = "val" if manifest["splits"].get("val", {}).get("examples") else "train"
    blocks, lengths = SFTDataset(tmp_path / "run" / "data", split, shuffle=False).rows(4)
    model = _peft_model(setup["mdm"], tmp_path / "run" / "adapter")
    loss = evaluate(model, blocks, make_objective("mdm"), 4, 16, "cpu", prompt_lengths=lengths)
    assert loss == pytest.approx(summary["final_val_loss"], abs=1e-6)


def test_lora_resume_is_bit_exact(setup, tmp_path):
    options = {"lora_dropout": 0.2, "save_every": 2, "max_steps": 6}
    _lora_run(setup, tmp_path / "ref", "mdm", **options)
    _lora_run(setup, tmp_path / "cut", "mdm", stop_after_steps=3, **options)
    assert not (tmp_path / "cut" / "checkpoint").exists()  # merged only at the end of the run
    _lora_run(setup, tmp_path / "cut", "mdm", resume=True, **options)
    for name in ("adapter/adapter_model.safetensors", "checkpoint/model.safetensors"):
        a, b = load_file(str(tmp_path / "ref" / name)), load_file(str(tmp_path / "cut" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    with pytest.raises(SmdmError, match="another lora"):  # resuming with other settings is refused
        _lora_run(setup, tmp_path / "cut", "mdm", resume=True, **{**options, "lora_rank": 8, "max_steps": 8})


def _fused_model_and_tokens() -> tuple[Transformer, torch.Tensor]:
    """A seeded tiny model with GQA and q/k/v biases (every fused layer LoRA can target), and a batch of ids."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(name="t", block_size=32, vocab_size=50, n_layer=2, n_head=4, n_embd=64,
                                    n_query_groups=2, qkv_bias=True)).eval()
    return model, torch.randint(0, 50, (2, 8))


def test_lora_layers_are_applied_inside_the_fused_layers():
    """qkv and gate_up are split by weight in the plain path; a wrapped layer must still add its update."""
    from smdm.lora import attach_lora, lora_config

    model, tokens = _fused_model_and_tokens()
    with torch.no_grad():
        before = model(tokens)
    for target in ("qkv", "gate_up"):
        wrapped = Transformer(model.config).eval()
        wrapped.load_state_dict(model.state_dict())
        peft_model = attach_lora(wrapped, lora_config(2, None, None, [target], "base"), "base")
        with torch.no_grad():
            torch.testing.assert_close(peft_model(tokens), before, atol=1e-6, rtol=0)  # B = 0: the base model
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_()
            assert not torch.allclose(peft_model(tokens), before, atol=1e-3), target


def test_bad_lora_options_are_one_line_errors(setup, tmp_path, capsys):
    base = ["sft", "--data", str(setup["data"]), "--max-steps", "1", "--no-progress", "--threads", "1"]
    cases = [
        (["--init-from", str(setup["mdm"]), "--lora-alpha", "4"], "without --lora-rank"),
        (["--init-from", str(setup["mdm"]), "--merge"], "full fine-tune"),
        (["--init-from", str(setup["mdm"]), "--lora-quantize", "4bit"], "--lora-quantize without --lora-rank"),
        (["--init-from", str(setup["mdm"]), "--lora-rank", "4", "--lora-targets", "q_proj"], "unknown module"),
        (["--tokenizer", str(setup["tokenizer"]), "--model", "tiny-test", "--lora-rank", "4"], "--init-from"),
        (["--init-from", str(setup["mdm"]), "--lora-rank", "4", "--parallel", "fsdp"], "FSDP"),
    ]
    for index, (extra, fragment) in enumerate(cases):
        out = tmp_path / f"out{index}"
        code, _, err = run_cli(capsys, *base, "--out", str(out), *extra)
        assert_one_line_error(code, err, fragment)
        assert not out.exists() or not any(out.iterdir()), extra
    code, _, err = run_cli(capsys, *base, "--out", str(tmp_path / "zero"), "--init-from", str(setup["mdm"]),
                           "--lora-rank", "0")
    assert code == 2 and "lora-rank" in err


def test_tied_head_cannot_take_an_adapter():
    from smdm.lora import attach_lora, lora_config

    model = Transformer(ModelConfig(name="t", block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=32,
                                    tie_embeddings=True))
    with pytest.raises(SmdmError, match="tied"):
        attach_lora(model, lora_config(2, None, None, ["lm_head"], "base"), "base")


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_base_trains_the_adapter_and_merges_into_the_full_precision_base(setup, tmp_path, bits):
    pytest.importorskip("bitsandbytes", reason="--lora-quantize needs bitsandbytes")
    options = {"lora_quantize": bits, "lora_targets": ["qkv", "down"], "save_every": 2, "max_steps": 4}
    summary = _lora_run(setup, tmp_path / "ref", "mdm", **options)
    assert summary["final_val_loss"] < 10
    saved = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    assert all(".lora_" in k for k in saved)
    base = load_checkpoint(setup["mdm"]).model.state_dict()
    merged = load_checkpoint(tmp_path / "ref")
    assert merged.meta["lora"]["quantize"] == bits
    for name, weight in base.items():
        stem = name.removesuffix(".weight")
        if name.endswith("weight") and (".qkv." in name or ".down." in name):
            delta = 2.0 * saved[f"base_model.model.{stem}.lora_B.weight"] @ saved[f"base_model.model.{stem}.lora_A.weight"]
            torch.testing.assert_close(merged.model.state_dict()[name], weight + delta, atol=1e-6, rtol=0)
            assert delta.abs().max() > 0
        else:
            assert torch.equal(merged.model.state_dict()[name], weight), name
    # The quantized base is rebuilt identically on resume: bit-exact.
    _lora_run(setup, tmp_path / "cut", "mdm", stop_after_steps=2, **options)
    _lora_run(setup, tmp_path / "cut", "mdm", resume=True, **options)
    resumed = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    for key in saved:
        assert torch.equal(saved[key], resumed[key]), key


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantize_base_stores_the_block_layers_quantized(bits):
    bnb = pytest.importorskip("bitsandbytes", reason="--lora-quantize needs bitsandbytes")
    from smdm.lora import quantize_base

    model, tokens = _fused_model_and_tokens()
    with torch.no_grad():
        before = model(tokens)
        quantize_base(model, bits)
        after = model(tokens)
    kind = bnb.nn.Linear4bit if bits == "4bit" else bnb.nn.Linear8bitLt
    assert all(isinstance(b.attn.qkv, kind) and isinstance(b.mlp.down, kind) for b in model.blocks)
    assert model.blocks[0].attn.qkv.weight.dtype in (torch.uint8, torch.int8)  # stored in 4 / 8 bits
    assert not torch.equal(after, before)  # rounding happened ...
    torch.testing.assert_close(after, before, atol=0.05, rtol=0)  # ... and the model is still the same model


def test_smdm_sft_lora_flags(setup, tmp_path, capsys):
    code, stdout, err = run_cli(capsys, "sft", "--data", str(setup["data"]), "--init-from", str(setup["arm"]),
                                "--objective", "arm", "--out", str(tmp_path / "run"), "--max-steps", "2",
                                "--no-progress", "--threads", "1", "--lora-rank", "2", "--lora-alpha", "3",
                                "--lora-dropout", "0.1", "--lora-targets", "proj", "lm_head", "--merge")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["checkpoint"] == str(tmp_path / "run" / "checkpoint")
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (2, 3, 0.1)
    assert sorted(config["target_modules"]) == ["lm_head", "proj"]
    recorded = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert recorded["lora_rank"] == 2 and recorded["lora_targets"] == ["proj", "lm_head"] and recorded["merge"]
    assert load_checkpoint(tmp_path / "run").meta["lora"]["targets"] == ["lm_head", "proj"]
