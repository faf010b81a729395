"""ONE training loop for every family (MDM, ARM, ...) and stage (pre-training, SFT).

The objective (`smdm.objectives`) is a value, not a second script: every family sees the same data, schedule,
optimizer and checkpoints, so MDM-vs-ARM comparisons are fair. Budgets come as steps, tokens, epochs or FLOPs (counted
by `smdm.flops`, the same account as the IsoFLOP sweeps). A run directory holds `train_config.json` (re-runnable with
`smdm train --config`), `metrics.jsonl`, `checkpoint/` and `summary.json`; `resume=True` continues bit-exactly from
the last checkpoint (weights, optimizer, data position, RNG).
"""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from smdm.adapt import WithAttentionMask, adaptation_record, adapted_config, annealed_attention_mask
from smdm.checkpoint import Checkpoint, load_checkpoint, lock_run_dir, resolve_checkpoint_dir, save_checkpoint
from smdm.config import CONFIGS, ModelConfig, non_embedding_params
from smdm.data.packed import PackedDataset, load_manifest
from smdm.data.prepare import tokenizer_file as manifest_tokenizer_file
from smdm.data.sft import SFTDataset, read_sft_manifest
from smdm.diffusion import random_length
from smdm.distributed import (
    DistInfo,
    all_reduce_mean,
    destroy_distributed,
    full_model_state,
    full_optimizer_state,
    init_distributed,
    load_full_optimizer_state,
    no_gradient_sync,
    parallelize,
    resolve_strategy,
)
from smdm.errors import SmdmError
from smdm.flops import FLOPS_COUNTS, device_peak_flops, flops_per_token, hardware_flops_per_token
from smdm.lora import (
    ADAPTER_DIR,
    attach_lora,
    check_lora_options,
    has_adapter_state,
    load_adapter,
    lora_config,
    merged_state,
    quantize_base,
    read_adapter_state,
    save_adapter,
)
from smdm.model import INITS, Transformer, set_dropout, smdm_init_
from smdm.objectives import Objective, make_objective, objective_names


@dataclass
class TrainConfig:
    """Everything a run needs; saved as train_config.json so a run can be inspected, re-run and resumed."""

    data_dir: str
    out_dir: str
    model: str = "tiny-3m"
    objective: str = "mdm"  # a name from smdm.objectives.OBJECTIVES
    seq_len: int | None = None  # default: the model's block size
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio (the paper: 10%)
    warmup_steps: int | None = None  # default: 1% of the run (the paper's recipe)
    weight_decay: float = 0.1
    dropout: float = 0.0  # residual dropout while training (smdm.model.set_dropout; Gao et al. 2025); 0: none
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_steps: int | None = None
    max_tokens: int | None = None
    flops: float | None = None  # compute budget, counted as `flops_count` says (smdm.flops)
    flops_count: str = "attention"  # 6·N + 6·L·T·d, as the IsoFLOP sweeps count; "6n": the paper's code
    epochs: float | None = None  # passes over the training split (natural for SFT)
    stop_after_steps: int | None = None  # end this job early (with a checkpoint); resume later: time-sliced jobs
    random_length_prob: float = 0.01  # fraction of batches cut to a random length
    low_discrepancy: bool = False  # stratified t across a batch for the MDM training loss
    loss_weighting: str = "elbo"  # MDM/BDM training loss: "elbo" (1/t-weighted) or "ce" (Sahoo et al. 2026); val: ELBO
    init: str = "gpt2"  # initial weights: "gpt2" (N(0, 0.02), scaled residual outputs) or "smdm" (SMDM's own)
    max_unique_tokens: int | None = None  # train on the first U tokens of the split only, repeated (data-constrained)
    prompt_dropout: float = 0.0  # SFT, MDM: hide each example's whole prompt with this probability (standard CFG)
    diffusion_block_size: int | None = None  # bdm: tokens per diffusion block (BD3-LM); must divide seq_len
    mask_rate_min: float | None = None  # mdm, bdm: clipped masking-rate range for training (BD3-LM)
    mask_rate_max: float | None = None
    eval_every: int = 100
    eval_blocks: int = 32  # validation blocks
    eval_mc_samples: int = 4  # MDM: mask draws averaged per validation block
    eval_batch_size: int = 16
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    threads: int | None = None
    parallel: Literal["auto", "none", "ddp", "fsdp"] = "auto"  # auto: DDP under torchrun, else one process
    compile: bool = False  # torch.compile each Transformer block
    activation_checkpointing: bool = False  # recompute block activations in backward to save memory
    peak_flops: float | None = None  # per-device peak FLOP/s for the MFU column (known GPUs are detected)
    tensorboard: bool = False  # also log to OUT/tensorboard through torch.utils.tensorboard
    resume: bool = False
    init_from: str | None = None  # start from these weights and their config (fine-tuning); --model is ignored
    progress: bool = True
    # ARM -> MDM adaptation (smdm.adapt): an mdm run --init-from an ARM. None: shift (DiffuLLaMA, Dream).
    adapt_shift: bool | None = None
    attention_anneal_steps: int = 0  # causal -> bidirectional over the first K steps (DiffuLLaMA); 0: at once
    # LoRA through PEFT (smdm.lora): None = a full fine-tune. The adapter lives in OUT/adapter (PEFT's format).
    lora_rank: int | None = None
    lora_alpha: float | None = None  # default 2 * rank
    lora_dropout: float | None = None  # default 0
    lora_targets: list[str] | None = None  # smdm module names; default qkv, proj, gate_up, down
    lora_quantize: str | None = None  # LoRA: "4bit" (QLoRA's NF4) or "8bit" frozen base layers (bitsandbytes)
    merge: bool = False  # LoRA: also write the merged weights as an smdm checkpoint in OUT/checkpoint

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """A recorded run config (e.g. RUN/train_config.json); `overrides` replace its fields."""
        try:
            values = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise SmdmError(f"{path}: no such run config") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SmdmError(f"{path}: not a JSON run config ({error})") from None
        if not isinstance(values, dict):
            raise SmdmError(f"{path}: a run config is a JSON object of TrainConfig fields")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise SmdmError(f"{path}: unknown run-config fields {', '.join(unknown)}")
        values.update(overrides)
        values.setdefault("data_dir", "")
        values.setdefault("out_dir", "")
        return cls(**values)

    def make_objective(self) -> Objective:
        """The family this run trains, with its options."""
        recipe = {} if self.loss_weighting == "elbo" else {"loss_weighting": self.loss_weighting}
        return make_objective(self.objective, low_discrepancy=self.low_discrepancy,
                              prompt_dropout=self.prompt_dropout, diffusion_block_size=self.diffusion_block_size,
                              mask_rate_min=self.mask_rate_min, mask_rate_max=self.mask_rate_max, **recipe)

    def validate(self) -> None:
        """Refuse impossible settings before anything is read or written."""
        budgets = [b for b in (self.max_steps, self.max_tokens, self.flops, self.epochs) if b is not None]
        if len(budgets) != 1:
            raise SmdmError("give exactly one budget: --max-steps, --max-tokens, --flops or --epochs")
        if any(not b > 0 or not math.isfinite(b) for b in budgets):
            raise SmdmError("the training budget must be a positive finite number")
        if self.objective not in objective_names():
            raise SmdmError(f"unknown objective {self.objective!r}; use one of {', '.join(objective_names())}")
        if self.flops_count not in FLOPS_COUNTS:
            raise SmdmError(f"unknown FLOPs count {self.flops_count!r}; use one of {', '.join(FLOPS_COUNTS)}")
        for name in ("batch_size", "grad_accum", "eval_every", "save_every", "log_every", "eval_blocks",
                     "eval_mc_samples", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise SmdmError(f"{name} must be at least 1")
        for name in ("seq_len", "threads", "stop_after_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SmdmError(f"{name} must be at least 1")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise SmdmError("warmup_steps must be at least 0")
        for name, low, high in (("random_length_prob", 0, 1), ("min_lr_ratio", 0, 1), ("beta1", 0, 1),
                                ("beta2", 0, 1)):
            if not low <= getattr(self, name) <= high:
                raise SmdmError(f"{name} must lie in [{low}, {high}]")
        for name in ("lr", "grad_clip", "peak_flops"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise SmdmError(f"{name} must be a positive finite number, got {value}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise SmdmError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0 <= self.prompt_dropout < 1:
            raise SmdmError("prompt_dropout must lie in [0, 1)")
        if not 0 <= self.dropout < 1:
            raise SmdmError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.init not in INITS:
            raise SmdmError(f"unknown init {self.init!r}; use one of {', '.join(INITS)}")
        if self.init != "gpt2" and self.init_from is not None:
            raise SmdmError("--init draws weights from scratch; it cannot be combined with --init-from")
        if self.max_unique_tokens is not None and self.max_unique_tokens < 1:
            raise SmdmError("max_unique_tokens must be at least 1")
        if self.prompt_dropout > 0 and self.objective not in ("mdm", "bdm"):
            raise SmdmError("prompt dropout trains classifier-free guidance, which only MDMs support")
        if self.attention_anneal_steps < 0:
            raise SmdmError("attention_anneal_steps must be at least 0")
        if (self.adapt_shift is not None or self.attention_anneal_steps) and (
                self.objective not in ("mdm", "bdm") or not self.init_from):
            raise SmdmError("--adapt-shift / --attention-anneal-steps adapt an ARM into an MDM or a BDM: pass "
                            "--objective mdm|bdm --init-from an ARM checkpoint or a Hugging Face Llama/Qwen2 directory")
        if self.attention_anneal_steps and self.objective == "bdm":
            raise SmdmError("--attention-anneal-steps anneals an MDM's full attention; block diffusion keeps its "
                            "block-causal mask (adapt with --adapt-shift only)")
        check_lora_options(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets, self.merge,
                           self.init_from, self.parallel, self.lora_quantize)
        objective = self.make_objective()
        if self.init_from is None and self.model.lower() in CONFIGS:  # before any data is written
            objective.check_context(CONFIGS[self.model.lower()].block_size)
        if self.seq_len is not None:
            objective.check_context(self.seq_len)


def autocast_context(device: torch.device, dtype: str):
    """bf16 autocast on GPU (fast and stable); fp32 on CPU, where bf16 matmul is about 2x slower."""
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr_ratio: float) -> float:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at total_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def total_steps_for(config: TrainConfig, tokens_per_step: int, per_token_flops: float, rows: int | None = None,
                    rows_per_step: int | None = None) -> int:
    """Optimizer steps implied by the budget; FLOPs divide by `per_token_flops`; epochs need rows per step."""
    if config.max_steps is not None:
        return int(config.max_steps)
    if config.epochs is not None:
        if not rows or not rows_per_step:
            raise SmdmError("an --epochs budget needs a dataset with a known number of rows")
        return max(1, math.ceil(config.epochs * rows / rows_per_step))
    tokens = config.max_tokens if config.max_tokens is not None else config.flops / per_token_flops
    steps = int(tokens // tokens_per_step)
    if steps < 1:
        raise SmdmError(f"the budget covers {int(tokens)} tokens, less than one step of {tokens_per_step} tokens")
    return steps


def budget_flops_per_token(objective: Objective, model_config: ModelConfig, seq_len: int, count: str) -> float:
    """Training FLOPs a budget charges per token: the count's FLOPs times the family's passes per token (2 for
    block diffusion's 2L-token pass)."""
    return objective.compute_factor * flops_per_token(model_config, seq_len, count)


def step_generator(seed: int, step: int, micro: int, rank: int = 0) -> torch.Generator:
    """The random stream of one micro-batch (data cuts, times, masks): a pure function of (seed, step, micro, rank),
    so a resume replays it."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + micro) * 131 + rank)


# Dropout draws from torch's global RNG (on the model's device); it is seeded per micro-batch from this offset of
# the micro-batch generator's seed, so its masks are replayed by a resume on any device and never repeat the masking stream's numbers.
DROPOUT_SEED_OFFSET = 0x9E3779B97F4A7C15


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains are not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2),
                             fused=device.type == "cuda")


@torch.no_grad()
def evaluate(model: Transformer, blocks: torch.Tensor, objective: Objective | str, mc_samples: int = 4,
             batch_size: int = 16, device: torch.device | str = "cpu", dtype: str = "auto",
             seed: int = 1234, prompt_lengths: torch.Tensor | None = None) -> float:
    """Validation loss in nats/token, the objective's true bound (MDM: the ELBO over mc_samples fixed mask draws).

    With `prompt_lengths` (SFT rows) the loss covers response tokens only, as in training.
    """
    return evaluate_with_error(model, blocks, objective, mc_samples, batch_size, device, dtype, seed,
                               prompt_lengths)[0]


def evaluate_with_error(model: Transformer, blocks: torch.Tensor, objective: Objective | str, mc_samples: int = 4,
                        batch_size: int = 16, device: torch.device | str = "cpu", dtype: str = "auto",
                        seed: int = 1234, prompt_lengths: torch.Tensor | None = None) -> tuple[float, float]:
    """`evaluate`'s loss and the standard error of its Monte-Carlo part: the spread of the noise draws within each
    batch (the blocks are fixed), 0 for an exact loss (the ARM's) or a single draw.

    Why: a diffusion model's ELBO is an estimate; with the studies' 4 draws over 128 blocks one estimate moves by
    about 0.04 nats/token with the draws (measured in docs/data-constrained.md), as much as the gaps it is read for.
    """
    objective = make_objective(objective) if isinstance(objective, str) else objective
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total, count, rows, variance = 0.0, 0, 0, 0.0
    with autocast_context(device, dtype):
        for start in range(0, blocks.size(0), batch_size):
            batch = blocks[start:start + batch_size].to(device)
            lengths = None if prompt_lengths is None else prompt_lengths[start:start + batch_size]
            draws = []
            for loss in objective.validation_draws(model, batch, lengths, mc_samples, seed + start):
                draws.append(loss.item())
                total += draws[-1] * batch.size(0)
                count += batch.size(0)
            rows += batch.size(0)
            if len(draws) > 1:  # Var(mean of this batch's draws) = s^2 / draws, weighted by its rows
                variance += batch.size(0) ** 2 * statistics.variance(draws) / len(draws)
    model.train(was_training)
    return total / count, math.sqrt(variance) / rows


class MetricsLog:
    """Append-only JSONL log (and optionally TensorBoard); on resume, rows past the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int | None = None, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            path.write_text("")
        self.writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SmdmError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(str(tensorboard_dir), purge_step=resume_step)

    def write(self, row: dict[str, Any]) -> None:
        """Append one row; numbers also go to TensorBoard under their names, against the step."""
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer, if any."""
        if self.writer is not None:
            self.writer.close()


def train(config: TrainConfig, run_dir_locked: bool = False) -> dict[str, Any]:
    """Run (or resume) one training run; returns the summary also written to summary.json.

    The run directory is locked for the whole run (`lock_run_dir`); `run_dir_locked` says the caller already holds
    that lock (fine-tuning, which writes OUT/data first).
    """
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    owns_group = not torch.distributed.is_initialized()
    info = init_distributed(config.device)
    try:  # rank 0 writes the run directory, so rank 0 holds its lock
        with lock_run_dir(config.out_dir) if info.is_main and not run_dir_locked else nullcontext():
            return _train(config, info)
    finally:
        if owns_group:
            destroy_distributed()


@dataclass
class RunData:
    """A run's data: the training stream, fixed validation rows, and what the tokenizer was."""

    train: PackedDataset | SFTDataset
    val_blocks: torch.Tensor
    val_prompt_lengths: torch.Tensor | None  # SFT: prompt length of each validation row
    seq_len: int
    sft: bool
    tokenizer: dict[str, Any]  # the data manifest's tokenizer record


def starting_point(config: TrainConfig, objective: Objective,
                   vocab_size: int) -> tuple[Checkpoint | None, ModelConfig, bool]:
    """The weights to start from (--init-from, unless resuming), the model config of the run, and whether the run
    adapts an ARM: an ARM starting an mdm or bdm run is adapted (smdm.adapt): same weights, bidirectional (a BDM:
    inside each block), shifted unless told otherwise. An MDM may start a bdm run as it is: Arriola et al. (BD3-LM,
    ICLR 2025) fine-tune an MDLM pre-train into block diffusion (850k + 150k steps in kuleshov-group/bd3lms).
    """
    if (config.init_from and config.resume and config.lora_rank is None
            and _has_checkpoint(Path(config.out_dir) / "checkpoint")):
        initial = None  # the run's own checkpoint holds the weights; --init-from still fixes the architecture
        init_config, init_meta = _init_header(config.init_from)
    elif config.init_from:
        initial = load_checkpoint(config.init_from)
        init_config, init_meta = initial.config, initial.meta
    else:
        return None, ModelConfig.from_name(config.model, vocab_size=vocab_size), False
    if init_config.vocab_size != vocab_size and not (
            "source" in init_meta and vocab_size <= init_config.vocab_size):  # imported: padded embeddings
        raise SmdmError(f"{config.init_from}: vocabulary {init_config.vocab_size} != data's {vocab_size}")
    family = init_meta.get("objective", objective.name)
    adapting = config.adapt_shift is not None or config.attention_anneal_steps > 0
    if adapting and family != "arm":
        article = "an" if family == "mdm" else "a"  # "an MDM", "a BDM"
        raise SmdmError(f"{config.init_from}: the checkpoint is {article} {family.upper()}, not an ARM; --adapt-shift / "
                        "--attention-anneal-steps adapt an ARM into an MDM or a BDM")
    if family == "arm" and objective.name in ("mdm", "bdm"):
        return initial, adapted_config(init_config, config.adapt_shift is not False), True
    if family == "mdm" and objective.name == "bdm":  # BD3-LM's recipe: an MDLM pre-train fine-tuned into blocks
        return initial, init_config, False
    if family != objective.name:
        raise SmdmError(f"{config.init_from}: {family} checkpoints cannot start {objective.name} runs; "
                        f"pass --objective {family}")
    block = init_meta.get("objective_options", {}).get("diffusion_block_size")
    if block is not None and block != getattr(objective, "diffusion_block_size", None):
        raise SmdmError(f"{config.init_from}: a bdm checkpoint trained with block size {block} cannot start a run "
                        f"with --diffusion-block-size {objective.diffusion_block_size}")
    return initial, init_config, False


def _init_header(path: str) -> tuple[ModelConfig, dict[str, Any]]:
    """Config and meta of --init-from without reading its weights (a resumed run reloads its own checkpoint)."""
    from smdm.checkpoint import read_checkpoint_meta
    from smdm.interop import is_model_dir, model_dir_config
    from smdm.interop.loader import import_spec, read_record

    if is_model_dir(path):
        objective = import_spec(read_record(Path(path)), str(path))[3]
        return model_dir_config(path), {"objective": objective, "source": {"path": str(path)}}
    record = read_checkpoint_meta(path)
    return ModelConfig.from_dict(record["model"]), {k: v for k, v in record.items() if k not in ("model", "format")}


def load_run_data(config: TrainConfig, objective: Objective, model_config: ModelConfig, manifest: dict[str, Any],
                  sft: bool, info: DistInfo) -> RunData:
    """Open the training stream (this rank's share) and the validation rows, checking lengths against the model."""
    if sft and config.max_unique_tokens is not None:
        raise SmdmError("--max-unique-tokens limits pre-training data; SFT rows are limited when preparing them")
    if sft:  # rows have the length fixed when the examples were prepared
        seq_len = int(manifest["seq_len"])
        if config.seq_len is not None and config.seq_len != seq_len:
            raise SmdmError(f"{config.data_dir}: SFT rows are {seq_len} tokens, not --seq-len {config.seq_len}")
    else:
        seq_len = config.seq_len or model_config.block_size
    if seq_len > model_config.block_size:
        raise SmdmError(f"seq_len {seq_len} is longer than the context length {model_config.block_size} of "
                        f"{model_config.name}")
    val_prompt_lengths = None
    if sft:
        train_data = SFTDataset(config.data_dir, "train", seed=config.seed, rank=info.rank,
                                world_size=info.world_size)
        if len(train_data) == 0:
            raise SmdmError(f"{config.data_dir}: no training examples")
        val_split = "val" if manifest["splits"].get("val", {}).get("examples") else "train"
        val_blocks, val_prompt_lengths = SFTDataset(config.data_dir, val_split, shuffle=False).rows(config.eval_blocks)
    else:
        block_len = objective.block_length(seq_len)
        train_data = PackedDataset(config.data_dir, "train", seq_len=block_len, seed=config.seed,
                                   rank=info.rank, world_size=info.world_size, max_tokens=config.max_unique_tokens)
        val_blocks = PackedDataset(config.data_dir, "val", seq_len=block_len, shuffle=False).blocks(config.eval_blocks)
    return RunData(train_data, val_blocks, val_prompt_lengths, seq_len, sft, train_data.manifest.get("tokenizer", {}))


@dataclass
class Run:
    """The live state of a run: what the loop's steps, evaluations and checkpoints act on."""

    config: TrainConfig
    info: DistInfo
    objective: Objective
    model_config: ModelConfig
    data: RunData
    model: Transformer  # the plain model (evaluation, checkpoints)
    train_model: torch.nn.Module  # the same model, parallelized
    optimizer: torch.optim.Optimizer
    strategy: str
    total_steps: int
    warmup: int
    meta: dict[str, Any]
    tokenizer_file: Path | None
    start_step: int = 0
    tokens_seen: int = 0
    resumed: bool = False
    last_lr: float = 0.0  # of the latest step, for the log
    last_grad_norm: Any = None
    lora_record: dict[str, Any] | None = None  # a LoRA run: what OUT/adapter records (smdm.lora)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.config.out_dir) / "checkpoint"

    def per_token_flops(self) -> float:
        """Budget FLOPs per token under the run's count (smdm.flops)."""
        return budget_flops_per_token(self.objective, self.model_config, self.data.seq_len, self.config.flops_count)

    def evaluate(self) -> tuple[float, float]:
        """Validation loss of the current weights and the standard error of its Monte-Carlo part."""
        config = self.config
        return evaluate_with_error(self.model, self.data.val_blocks, self.objective, config.eval_mc_samples,
                                   config.eval_batch_size, self.info.device, config.dtype,
                                   prompt_lengths=self.data.val_prompt_lengths)

    def save(self, step: int) -> None:
        """Checkpoint weights, optimizer, data position and RNG. Gathering is collective; only rank 0 writes.

        A LoRA run writes its adapter (PEFT's format) and this state to OUT/adapter instead of the whole model.
        """
        lora = self.lora_record is not None
        weights = None if lora else full_model_state(self.train_model)
        optimizer_state = full_optimizer_state(self.train_model, self.optimizer)
        if self.info.is_main:
            state = {
                "step": step, "tokens": self.tokens_seen, "optimizer": optimizer_state,
                "data": self.data.train.state_dict(), "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(), "world_size": self.info.world_size,
            }
            if lora:
                save_adapter(self.model, self.config.out_dir, self.lora_record, state)
            else:
                save_checkpoint(self.checkpoint_dir, weights, self.model_config,
                                {**self.meta, "step": step, "tokens": self.tokens_seen}, train_state=state,
                                tokenizer_file=self.tokenizer_file)
        if self.info.distributed:
            torch.distributed.barrier()

    def step(self, step: int) -> tuple[float, int]:
        """One optimizer step over grad_accum micro-batches: (mean loss, model inputs processed on this rank)."""
        config, info, device = self.config, self.info, self.info.device
        lr = lr_at(step, self.total_steps, self.warmup, config.lr, config.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        step_loss, inputs = 0.0, 0
        for micro in range(config.grad_accum):
            # Keyed by the global micro-batch index, so N ranks x k micro-batches replay 1 rank x N·k exactly.
            generator = step_generator(config.seed, step, micro * info.world_size + info.rank)
            if config.dropout:
                torch.manual_seed((generator.initial_seed() + DROPOUT_SEED_OFFSET) % 2**64)
            prompt_lengths = None
            if self.data.sft:
                tokens, prompt_lengths = self.data.train.next_batch(config.batch_size)
                tokens = tokens.to(device)
            else:
                tokens = self.data.train.next_batch(config.batch_size)
                tokens = random_length(tokens, config.random_length_prob, generator,
                                       min_length=self.objective.min_length()).to(device)
            last = micro == config.grad_accum - 1
            model = self.train_model
            anneal = annealed_attention_mask(tokens.size(1), step, config.attention_anneal_steps, config.seed, device)
            if anneal is not None:  # ARM -> MDM adaptation, the first K steps only (smdm.adapt)
                model = WithAttentionMask(model, anneal)
            with no_gradient_sync(self.train_model, self.strategy, last), autocast_context(device, config.dtype):
                if prompt_lengths is None:
                    loss = self.objective.loss(model, tokens, generator, self.model.mask_id)
                else:
                    loss = self.objective.sft_loss(model, tokens, prompt_lengths, generator, self.model.mask_id)
                (loss / config.grad_accum).backward()
            step_loss += loss.item() / config.grad_accum
            inputs += self.objective.targets(tokens, self.data.sft)
        self.last_grad_norm = torch.nn.utils.clip_grad_norm_(self.train_model.parameters(), config.grad_clip)
        self.last_lr = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens_seen += config.batch_size * config.grad_accum * self.data.seq_len * info.world_size
        if not math.isfinite(step_loss):
            raise SmdmError(f"loss became {step_loss} at step {step + 1}; lower the learning rate")
        return step_loss, inputs


def build_run(config: TrainConfig, info: DistInfo) -> Run:
    """Data, model, optimizer and schedule of a run, restored from its checkpoint when resuming."""
    objective = config.make_objective()
    manifest = read_sft_manifest(config.data_dir)
    sft = manifest is not None
    manifest = manifest or load_manifest(config.data_dir)
    initial, model_config, adapted = starting_point(config, objective, int(manifest["tokenizer"]["vocab_size"]))
    objective.check_context(model_config.block_size)
    data = load_run_data(config, objective, model_config, manifest, sft, info)
    tokenizer_file = manifest_tokenizer_file(data.train.manifest, config.data_dir)  # before anything is written

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model = Transformer(model_config, causal=objective.causal,
                        diffusion_block_size=getattr(objective, "diffusion_block_size", None))
    if config.init == "smdm":
        smdm_init_(model)
    set_dropout(model, config.dropout)
    n_params = non_embedding_params(model_config)
    tokens_per_step = config.batch_size * config.grad_accum * data.seq_len * info.world_size
    total_steps = total_steps_for(config, tokens_per_step,
                                  budget_flops_per_token(objective, model_config, data.seq_len, config.flops_count),
                                  rows=len(data.train),
                                  rows_per_step=config.batch_size * config.grad_accum * info.world_size)
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, total_steps // 100)
    checkpoint_dir = Path(config.out_dir) / "checkpoint"
    lora_record = None
    if config.lora_rank is None:
        train_state = _resume_state(config, objective, model_config, data, checkpoint_dir, model)
    else:
        train_state = None
    if train_state is None and initial is not None:
        model.load_state_dict(initial.model.state_dict())
    if config.lora_rank is not None:  # the base stays frozen; only the adapter is trained (smdm.lora)
        model, train_state, lora_record = _with_lora(config, objective, model_config, data, model, info.device)

    model.to(info.device).train()
    strategy = resolve_strategy(config.parallel, info)
    train_model = parallelize(model, strategy, info, config.activation_checkpointing, config.compile)
    optimizer = make_optimizer(train_model, config, info.device)
    meta = {"objective": objective.name, **({"objective_options": objective.options()} if objective.options()
                                            else {}),
            "tokenizer": {k: data.tokenizer.get(k) for k in ("fingerprint", "vocab_size", "eos_id")},
            "non_embedding_params": n_params, "sft": sft, **({"dropout": config.dropout} if config.dropout else {})}
    if adapted:
        meta["adapted_from"] = adaptation_record(config.init_from, model_config.shifted,
                                                 config.attention_anneal_steps)
    if lora_record is not None:
        meta["lora"] = lora_record["lora"]
    run = Run(config, info, objective, model_config, data, model, train_model, optimizer, strategy, total_steps,
              warmup, meta, tokenizer_file, lora_record=lora_record)
    if train_state is not None:
        load_full_optimizer_state(train_model, optimizer, train_state["optimizer"])
        data.train.load_state_dict(train_state["data"])
        torch.set_rng_state(train_state["torch_rng"])
        random.setstate(train_state["python_rng"])
        run.start_step, run.tokens_seen, run.resumed = train_state["step"], train_state["tokens"], True
    return run


def _with_lora(config: TrainConfig, objective: Objective, model_config: ModelConfig, data: RunData,
               model: Transformer, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any] | None,
                                                                  dict[str, Any]]:
    """The PEFT model of a LoRA run, its adapter restored from OUT/adapter when resuming; (model, state, record)."""
    if config.lora_quantize is not None:
        quantize_base(model, config.lora_quantize, device)
    settings = lora_config(config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets,
                           str(config.init_from))
    record = {"base": str(config.init_from), "objective": objective.name, "model": model_config.to_dict(),
              "tokenizer": data.tokenizer.get("fingerprint"),
              "lora": {"rank": settings.r, "alpha": settings.lora_alpha, "dropout": settings.lora_dropout,
                       "targets": sorted(settings.target_modules), "quantize": config.lora_quantize}}
    if config.resume and has_adapter_state(config.out_dir):
        state = read_adapter_state(config.out_dir, record)
        return load_adapter(model, Path(config.out_dir) / ADAPTER_DIR, str(config.init_from)), state, record
    return attach_lora(model, settings, str(config.init_from)), None, record


def _resume_state(config: TrainConfig, objective: Objective, model_config: ModelConfig, data: RunData,
                  checkpoint_dir: Path, model: Transformer) -> dict[str, Any] | None:
    """With --resume and a checkpoint: load its weights into `model` and return its training state."""
    if not (config.resume and _has_checkpoint(checkpoint_dir)):
        return None
    loaded = load_checkpoint(checkpoint_dir, with_train_state=True)
    if (loaded.meta.get("objective") != objective.name or loaded.config != model_config
            or loaded.meta.get("objective_options", {}) != objective.options()):
        raise SmdmError(f"{checkpoint_dir}: checkpoint is a {loaded.meta.get('objective')} "
                        f"{loaded.config.name}, not this run's {objective.name} {model_config.name}")
    if loaded.meta.get("tokenizer", {}).get("fingerprint") != data.tokenizer.get("fingerprint"):
        raise SmdmError(f"{checkpoint_dir}: checkpoint was trained with another tokenizer than {config.data_dir}")
    model.load_state_dict(loaded.model.state_dict())
    if loaded.train_state is None:
        raise SmdmError(f"{checkpoint_dir}: no training state to resume from (state.pt missing)")
    return loaded.train_state


def _open_log(run: Run) -> MetricsLog | None:
    """Rank 0 writes train_config.json and the metrics log (cut back to the checkpoint on resume)."""
    if not run.info.is_main:
        return None
    out_dir = Path(run.config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_config.json").write_text(json.dumps(asdict(run.config), indent=2))
    return MetricsLog(out_dir / "metrics.jsonl", resume_step=run.start_step if run.resumed else None,
                      tensorboard_dir=out_dir / "tensorboard" if run.config.tensorboard else None)


def _iterate_steps(start: int, end: int, enabled: bool) -> Iterator[tuple[int, Any]]:
    bar = tqdm(range(start, end), initial=start, total=end, disable=not enabled, unit="step", dynamic_ncols=True)
    for step in bar:
        yield step, bar


def _train(config: TrainConfig, info: DistInfo) -> dict[str, Any]:
    run = build_run(config, info)
    log = _open_log(run)
    hardware_flops = run.objective.compute_factor * hardware_flops_per_token(run.model_config, run.data.seq_len)
    peak_flops = config.peak_flops or device_peak_flops(info.device)
    val_loss = None
    window_start, window_inputs = time.perf_counter(), 0
    smoothed = float("nan")
    end_step = min(run.total_steps, config.stop_after_steps or run.total_steps)
    try:
        for step, bar in _iterate_steps(run.start_step, end_step, config.progress and info.is_main):
            step_loss, inputs = run.step(step)
            window_inputs += inputs
            done = step + 1
            smoothed = step_loss if math.isnan(smoothed) else 0.9 * smoothed + 0.1 * step_loss
            if done % config.log_every == 0 or done == run.total_steps:
                elapsed = time.perf_counter() - window_start
                tps = window_inputs * info.world_size / max(elapsed, 1e-9)  # global tokens/s
                grad_norm = run.last_grad_norm
                row = {"step": done, "tokens": run.tokens_seen, "lr": run.last_lr,
                       "loss": all_reduce_mean(step_loss, info),
                       "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
                       "tokens_per_s": tps}
                if peak_flops:
                    row["mfu"] = hardware_flops * tps / (peak_flops * info.world_size)
                if info.device.type == "cuda":
                    row["peak_memory_gb"] = torch.cuda.max_memory_allocated(info.device) / 2**30
                if log is not None:
                    log.write(row)
                postfix = {"loss": f"{smoothed:.3f}", "tok_s": f"{tps:,.0f}"}
                if "mfu" in row:
                    postfix["mfu"] = f"{row['mfu']:.1%}"
                bar.set_postfix(postfix, refresh=False)
                window_start, window_inputs = time.perf_counter(), 0
            if done % config.eval_every == 0 or done == run.total_steps:
                val_loss, val_se = run.evaluate()
                if log is not None:
                    row = {"step": done, "tokens": run.tokens_seen, "val_loss": val_loss}
                    row.update({"val_loss_se": val_se} if val_se > 0 else {})  # an estimate (MDM, BDM): its error
                    log.write(row)
                    error = f" ± {val_se:.4f}" if val_se > 0 else ""
                    bar.write(f"step {done}: val loss {val_loss:.4f}{error} nats/token", file=sys.stderr)
            if done % config.save_every == 0 or done in (run.total_steps, end_step):
                run.save(done)
    finally:
        if log is not None:
            log.close()
    if run.start_step >= run.total_steps and val_loss is None:
        val_loss = run.evaluate()[0]
    if run.lora_record is not None and config.merge and end_step == run.total_steps and info.is_main:
        base_state = None
        if config.lora_quantize is not None:  # merge into the full-precision base, not its quantized copy
            base_state = load_checkpoint(config.init_from).model.state_dict()
        save_checkpoint(run.checkpoint_dir, merged_state(run.model, base_state), run.model_config,
                        {**run.meta, "step": end_step, "tokens": run.tokens_seen, "lora_merged": True},
                        tokenizer_file=run.tokenizer_file)
    return _write_summary(run, val_loss)


def _write_summary(run: Run, val_loss: float | None) -> dict[str, Any]:
    n_params = non_embedding_params(run.model_config)
    summary = {
        "objective": run.objective.name, "model": run.model_config.name, "non_embedding_params": n_params,
        "steps": run.total_steps, "tokens": run.tokens_seen, "flops_6nd": 6.0 * n_params * run.tokens_seen,
        "flops": run.per_token_flops() * run.tokens_seen, "flops_count": run.config.flops_count,
        "final_val_loss": val_loss, "checkpoint": str(run.checkpoint_dir),
    }
    if run.lora_record is not None:
        summary["adapter"] = str(Path(run.config.out_dir) / ADAPTER_DIR)
        summary["trainable_params"] = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
        if not run.config.merge:
            summary["checkpoint"] = None
    if run.info.is_main:
        (Path(run.config.out_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _has_checkpoint(directory: Path) -> bool:
    try:
        resolve_checkpoint_dir(directory)
        return True
    except SmdmError:
        return False
