"""Checkpoints: round trip, atomic writes, and every way a checkpoint can be wrong."""

from __future__ import annotations

import errno
import json

import pytest
import safetensors.torch
import torch

from smdm.checkpoint import load_checkpoint, save_checkpoint
from smdm.config import ModelConfig
from smdm.errors import SmdmError
from smdm.model import Transformer


@pytest.fixture
def model_and_config():
    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny-test", vocab_size=61)
    return Transformer(config), config


def test_round_trip_preserves_weights_and_metadata(tmp_path, model_and_config):
    model, config = model_and_config
    (tmp_path / "tok.json").write_text("{}")
    save_checkpoint(tmp_path / "ckpt", model, config, {"objective": "mdm", "step": 3}, tokenizer_file=tmp_path / "tok.json")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == config and loaded.meta["step"] == 3 and not loaded.model.causal
    assert loaded.tokenizer_path.read_text() == "{}"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[name])


def test_arm_checkpoint_loads_causal(tmp_path, model_and_config):
    _, config = model_and_config
    save_checkpoint(tmp_path / "arm", Transformer(config, causal=True), config, {"objective": "arm"})
    assert load_checkpoint(tmp_path / "arm").model.causal


def test_truncated_weights_are_detected(tmp_path, model_and_config):
    model, config = model_and_config
    save_checkpoint(tmp_path / "ckpt", model, config, {"objective": "mdm"})
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SmdmError, match="corrupted or truncated"):
        load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(SmdmError, match="corrupted or truncated"):
        load_checkpoint(tmp_path / "ckpt", verify=False)


def test_flipped_bytes_are_detected_by_checksum(tmp_path, model_and_config):
    model, config = model_and_config
    save_checkpoint(tmp_path / "ckpt", model, config, {"objective": "mdm"})
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SmdmError, match="checksum"):
        load_checkpoint(tmp_path / "ckpt")


def test_checkpoint_of_another_architecture_is_rejected(tmp_path, model_and_config):
    _, config = model_and_config
    other = tmp_path / "other"
    other.mkdir()
    safetensors.torch.save_file({"transformer.wte.weight": torch.zeros(3, 3)}, str(other / "model.safetensors"))
    (other / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(SmdmError, match="'GPT2LMHeadModel' is not supported"):
        load_checkpoint(other)
    # A Hugging Face directory is imported (smdm.interop); an incomplete config.json is named.
    (other / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(SmdmError, match="lacks 'hidden_size'"):
        load_checkpoint(other)
    # Our format tag but weights of a different shape: a clear shape error, not a torch traceback.
    model = Transformer(config)
    save_checkpoint(tmp_path / "ckpt", model, config, {"objective": "mdm"})
    record = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    record["model"]["n_embd"] = 128
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(record))
    with pytest.raises(SmdmError, match="shape"):
        load_checkpoint(tmp_path / "ckpt", verify=False)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SmdmError, match="no smdm checkpoint"):
        load_checkpoint(tmp_path / "nothing")


def test_full_disk_leaves_previous_checkpoint_intact(tmp_path, model_and_config, monkeypatch):
    model, config = model_and_config
    save_checkpoint(tmp_path / "ckpt", model, config, {"objective": "mdm", "step": 1})

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("smdm.checkpoint.save_file", full_disk)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(SmdmError, match="No space left on device.*previous checkpoint is intact"):
        save_checkpoint(tmp_path / "ckpt", model, config, {"objective": "mdm", "step": 2})
    monkeypatch.undo()
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.meta["step"] == 1
    assert not torch.equal(loaded.model.lm_head.weight, model.lm_head.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind


def test_interrupted_swap_is_recovered(tmp_path, model_and_config):
    # A kill between the two renames leaves only the previous checkpoint under its ".old" name.
    model, config = model_and_config
    save_checkpoint(tmp_path / "ckpt", model, config, {"objective": "mdm", "step": 5})
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt.old-123")
    assert load_checkpoint(tmp_path / "ckpt").meta["step"] == 5
