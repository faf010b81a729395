"""ONE training loop for masked diffusion (MDM) and autoregressive (ARM) models.

The objective is a switch, not a second script: both see the same data, schedule, optimizer and checkpoints,
so MDM-vs-ARM comparisons are fair. Budgets come as steps, tokens or FLOPs (C = 6·N·D, N = non-embedding
parameters, as the paper counts). A run directory holds `metrics.jsonl`, `checkpoint/` and `summary.json`;
`resume=True` continues bit-exactly from the last checkpoint (weights, optimizer, data position, RNG).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from smdm.checkpoint import load_checkpoint, lock_run_dir, resolve_checkpoint_dir, save_checkpoint
from smdm.config import ModelConfig, non_embedding_params
from smdm.data.packed import PackedDataset, load_manifest
from smdm.data.prepare import tokenizer_file as manifest_tokenizer_file
from smdm.data.sft import SFTDataset, read_sft_manifest
from smdm.diffusion import (
    arm_sft_step_loss,
    arm_step_loss,
    mdm_sft_step_loss,
    mdm_step_loss,
    random_length,
)
from smdm.distributed import (
    DistInfo,
    all_reduce_mean,
    destroy_distributed,
    device_peak_flops,
    full_model_state,
    full_optimizer_state,
    init_distributed,
    load_full_optimizer_state,
    no_gradient_sync,
    parallelize,
    resolve_strategy,
)
from smdm.errors import SmdmError
from smdm.model import Transformer

Objective = Literal["mdm", "arm"]


@dataclass
class TrainConfig:
    """Everything a run needs; saved in the run directory so a run can be inspected and resumed."""

    data_dir: str
    out_dir: str
    model: str = "tiny-3m"
    objective: Objective = "mdm"
    seq_len: int | None = None  # default: the model's block size
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio (the paper: 10%)
    warmup_steps: int | None = None  # default: 1% of the run (the paper's recipe)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_steps: int | None = None
    max_tokens: int | None = None
    flops: float | None = None  # C = 6·N·D
    epochs: float | None = None  # passes over the training split (natural for SFT)
    stop_after_steps: int | None = None  # end this job early (with a checkpoint); resume later: time-sliced jobs
    random_length_prob: float = 0.01  # fraction of batches cut to a random length
    low_discrepancy: bool = False  # stratified t across a batch for the MDM training loss
    prompt_dropout: float = 0.0  # SFT, MDM: hide each example's whole prompt with this probability (standard CFG)
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
    resume: bool = False
    init_from: str | None = None  # start from these weights and their config (fine-tuning); --model is ignored
    progress: bool = True

    def validate(self) -> None:
        budgets = [b for b in (self.max_steps, self.max_tokens, self.flops, self.epochs) if b is not None]
        if len(budgets) != 1:
            raise SmdmError("give exactly one budget: --max-steps, --max-tokens, --flops or --epochs")
        if any(b <= 0 for b in budgets):
            raise SmdmError("the training budget must be positive")
        if self.objective not in ("mdm", "arm"):
            raise SmdmError(f"unknown objective {self.objective!r}; use mdm or arm")
        for name in ("batch_size", "grad_accum", "eval_every", "save_every", "log_every", "eval_blocks",
                     "eval_mc_samples", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise SmdmError(f"{name} must be at least 1")
        if not 0 <= self.random_length_prob <= 1:
            raise SmdmError("random_length_prob must lie in [0, 1]")
        if self.lr <= 0:
            raise SmdmError("lr must be positive")
        if not 0 <= self.prompt_dropout < 1:
            raise SmdmError("prompt_dropout must lie in [0, 1)")
        if self.prompt_dropout > 0 and self.objective == "arm":
            raise SmdmError("prompt dropout trains classifier-free guidance, which only MDMs support")


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


def total_steps_for(config: TrainConfig, tokens_per_step: int, n_params: int, rows: int | None = None,
                    rows_per_step: int | None = None) -> int:
    """Optimizer steps implied by the budget; FLOPs use C = 6·N·D; epochs need the split's rows per step."""
    if config.max_steps is not None:
        return int(config.max_steps)
    if config.epochs is not None:
        if not rows or not rows_per_step:
            raise SmdmError("an --epochs budget needs a dataset with a known number of rows")
        return max(1, math.ceil(config.epochs * rows / rows_per_step))
    if config.max_tokens is not None:
        tokens = config.max_tokens
    else:
        tokens = config.flops / (6 * n_params)
    steps = int(tokens // tokens_per_step)
    if steps < 1:
        raise SmdmError(f"the budget covers {int(tokens)} tokens, less than one step of {tokens_per_step} tokens")
    return steps


def step_generator(seed: int, step: int, micro: int, rank: int = 0) -> torch.Generator:
    """The random stream of one micro-batch: a pure function of (seed, step, micro, rank), so a resume replays it."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + micro) * 131 + rank)


def model_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters incl. the head) + the attention term 12·L·d·T (PaLM)."""
    matmul_params = non_embedding_params(config) + config.vocab_size * config.n_embd
    return 6.0 * matmul_params + 12.0 * config.n_layer * config.n_embd * seq_len


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains are not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2),
                             fused=device.type == "cuda")


@torch.no_grad()
def evaluate(model: Transformer, blocks: torch.Tensor, objective: Objective, mc_samples: int = 4,
             batch_size: int = 16, device: torch.device | str = "cpu", dtype: str = "auto",
             seed: int = 1234, prompt_lengths: torch.Tensor | None = None) -> float:
    """Validation loss in nats/token. MDM: the ELBO bound averaged over mc_samples fixed mask draws per block.

    With `prompt_lengths` (SFT rows) the loss covers response tokens only, as in training.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with autocast_context(device, dtype):
        for start in range(0, blocks.size(0), batch_size):
            batch = blocks[start:start + batch_size].to(device)
            lengths = None if prompt_lengths is None else prompt_lengths[start:start + batch_size]
            if objective == "arm":
                loss = arm_step_loss(model, batch) if lengths is None else arm_sft_step_loss(model, batch, lengths)
                total += loss.item() * batch.size(0)
                count += batch.size(0)
                continue
            for draw in range(mc_samples):
                generator = torch.Generator().manual_seed(seed + 7919 * draw + start)
                if lengths is None:
                    loss = mdm_step_loss(model, batch, generator, low_discrepancy=True)
                else:
                    loss = mdm_sft_step_loss(model, batch, lengths, generator, low_discrepancy=True)
                total += loss.item() * batch.size(0)
                count += batch.size(0)
    model.train(was_training)
    return total / count


class MetricsLog:
    """Append-only JSONL log; on resume, rows past the checkpoint's step are dropped (they will be redone)."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            path.write_text("")

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")


def _iterate_steps(start: int, end: int, enabled: bool) -> Iterator[tuple[int, Any]]:
    bar = tqdm(range(start, end), initial=start, total=end, disable=not enabled, unit="step", dynamic_ncols=True)
    for step in bar:
        yield step, bar


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


def _train(config: TrainConfig, info: DistInfo) -> dict[str, Any]:
    device = info.device
    strategy = resolve_strategy(config.parallel, info)
    out_dir = Path(config.out_dir)
    checkpoint_dir = out_dir / "checkpoint"

    manifest = read_sft_manifest(config.data_dir)
    sft = manifest is not None
    manifest = manifest or load_manifest(config.data_dir)
    vocab_size = int(manifest["tokenizer"]["vocab_size"])
    initial = load_checkpoint(config.init_from) if config.init_from and not config.resume else None
    if initial is not None and initial.config.vocab_size != vocab_size:
        raise SmdmError(f"{config.init_from}: vocabulary {initial.config.vocab_size} != data's {vocab_size}")
    if initial is not None and initial.meta.get("objective", config.objective) != config.objective:
        raise SmdmError(f"{config.init_from}: an {initial.meta['objective']} checkpoint cannot start an "
                        f"{config.objective} run; pass --objective {initial.meta['objective']}")
    model_config = initial.config if initial else ModelConfig.from_name(config.model, vocab_size=vocab_size)
    if sft:  # rows have the length fixed when the examples were prepared
        seq_len = int(manifest["seq_len"])
        if config.seq_len is not None and config.seq_len != seq_len:
            raise SmdmError(f"{config.data_dir}: SFT rows are {seq_len} tokens, not --seq-len {config.seq_len}")
    else:
        seq_len = config.seq_len or model_config.block_size
    if seq_len > model_config.block_size:
        raise SmdmError(f"seq_len {seq_len} is longer than the block size {model_config.block_size} of "
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
        # An ARM block carries one extra token so it predicts seq_len targets, like the MDM sees seq_len tokens.
        block_len = seq_len + 1 if config.objective == "arm" else seq_len
        train_data = PackedDataset(config.data_dir, "train", seq_len=block_len, seed=config.seed,
                                   rank=info.rank, world_size=info.world_size)
        val_blocks = PackedDataset(config.data_dir, "val", seq_len=block_len, shuffle=False).blocks(config.eval_blocks)

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model = Transformer(model_config, causal=config.objective == "arm")
    n_params = non_embedding_params(model_config)
    tokens_per_step = config.batch_size * config.grad_accum * seq_len * info.world_size
    total_steps = total_steps_for(config, tokens_per_step, n_params, rows=len(train_data),
                                  rows_per_step=config.batch_size * config.grad_accum * info.world_size)
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, total_steps // 100)

    tokenizer_info = train_data.manifest.get("tokenizer", {})
    tokenizer_file = manifest_tokenizer_file(train_data.manifest, config.data_dir)  # before anything is written
    start_step, tokens_seen, train_state = 0, 0, None
    if config.resume and _has_checkpoint(checkpoint_dir):
        loaded = load_checkpoint(checkpoint_dir, with_train_state=True)
        if loaded.meta.get("objective") != config.objective or loaded.config != model_config:
            raise SmdmError(f"{checkpoint_dir}: checkpoint is a {loaded.meta.get('objective')} "
                            f"{loaded.config.name}, not this run's {config.objective} {model_config.name}")
        if loaded.meta.get("tokenizer", {}).get("fingerprint") != tokenizer_info.get("fingerprint"):
            raise SmdmError(f"{checkpoint_dir}: checkpoint was trained with another tokenizer than {config.data_dir}")
        model.load_state_dict(loaded.model.state_dict())
        train_state = loaded.train_state
        if train_state is None:
            raise SmdmError(f"{checkpoint_dir}: no training state to resume from (state.pt missing)")
    elif initial is not None:
        model.load_state_dict(initial.model.state_dict())

    model.to(device).train()
    train_model = parallelize(model, strategy, info, config.activation_checkpointing, config.compile)
    optimizer = make_optimizer(train_model, config, device)
    if train_state is not None:
        load_full_optimizer_state(train_model, optimizer, train_state["optimizer"])
        train_data.load_state_dict(train_state["data"])
        torch.set_rng_state(train_state["torch_rng"])
        random.setstate(train_state["python_rng"])
        start_step, tokens_seen = train_state["step"], train_state["tokens"]

    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(asdict(config), indent=2))
        log = MetricsLog(out_dir / "metrics.jsonl", resume_step=start_step if train_state is not None else None)
    else:
        log = None
    flops_per_token = model_flops_per_token(model_config, seq_len)
    peak_flops = config.peak_flops or device_peak_flops(device)
    meta = {
        "objective": config.objective,
        "tokenizer": {k: tokenizer_info.get(k) for k in ("fingerprint", "vocab_size", "eos_id")},
        "non_embedding_params": n_params,
        "sft": sft,
    }

    def checkpoint(step: int, tokens: int) -> None:
        # Gathering is collective (every rank takes part); only rank 0 writes.
        weights = full_model_state(train_model)
        optimizer_state = full_optimizer_state(train_model, optimizer)
        if info.is_main:
            state = {
                "step": step, "tokens": tokens, "optimizer": optimizer_state, "data": train_data.state_dict(),
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), "world_size": info.world_size,
            }
            save_checkpoint(checkpoint_dir, weights, model_config, {**meta, "step": step, "tokens": tokens},
                            train_state=state, tokenizer_file=tokenizer_file)
        if info.distributed:
            torch.distributed.barrier()

    val_loss = None
    window_start, window_tokens = time.perf_counter(), 0
    loss_value = float("nan")
    end_step = min(total_steps, config.stop_after_steps or total_steps)
    for step, bar in _iterate_steps(start_step, end_step, config.progress and info.is_main):
        lr = lr_at(step, total_steps, warmup, config.lr, config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for micro in range(config.grad_accum):
            # Keyed by the global micro-batch index, so N ranks x k micro-batches replay 1 rank x N·k exactly.
            generator = step_generator(config.seed, step, micro * info.world_size + info.rank)
            if sft:
                tokens, prompt_lengths = train_data.next_batch(config.batch_size)
                tokens = tokens.to(device)
            else:
                tokens = train_data.next_batch(config.batch_size)
                tokens = random_length(tokens, config.random_length_prob, generator,
                                       min_length=2 if config.objective == "arm" else 1).to(device)
            last = micro == config.grad_accum - 1
            with no_gradient_sync(train_model, strategy, last), autocast_context(device, config.dtype):
                if sft and config.objective == "mdm":
                    loss = mdm_sft_step_loss(train_model, tokens, prompt_lengths, generator, config.prompt_dropout,
                                             config.low_discrepancy, mask_id=model.mask_id)
                elif sft:
                    loss = arm_sft_step_loss(train_model, tokens, prompt_lengths)
                elif config.objective == "mdm":
                    loss = mdm_step_loss(train_model, tokens, generator, config.low_discrepancy,
                                         mask_id=model.mask_id)
                else:
                    loss = arm_step_loss(train_model, tokens)
                (loss / config.grad_accum).backward()
            step_loss += loss.item() / config.grad_accum
            window_tokens += tokens.size(0) * (tokens.size(1) - (config.objective == "arm" and not sft))
        grad_norm = torch.nn.utils.clip_grad_norm_(train_model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += tokens_per_step
        done = step + 1
        if not math.isfinite(step_loss):
            raise SmdmError(f"loss became {step_loss} at step {done}; lower the learning rate")
        loss_value = step_loss if math.isnan(loss_value) else 0.9 * loss_value + 0.1 * step_loss
        if done % config.log_every == 0 or done == total_steps:
            elapsed = time.perf_counter() - window_start
            tps = window_tokens * info.world_size / max(elapsed, 1e-9)  # global tokens/s
            global_loss = all_reduce_mean(step_loss, info)
            row = {"step": done, "tokens": tokens_seen, "lr": lr, "loss": global_loss,
                   "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
                   "tokens_per_s": tps}
            if peak_flops:
                row["mfu"] = flops_per_token * tps / (peak_flops * info.world_size)
            if device.type == "cuda":
                row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            if log is not None:
                log.write(row)
            postfix = {"loss": f"{loss_value:.3f}", "tok_s": f"{tps:,.0f}"}
            if "mfu" in row:
                postfix["mfu"] = f"{row['mfu']:.1%}"
            bar.set_postfix(postfix, refresh=False)
            window_start, window_tokens = time.perf_counter(), 0
        if done % config.eval_every == 0 or done == total_steps:
            val_loss = evaluate(model, val_blocks, config.objective, config.eval_mc_samples,
                                config.eval_batch_size, device, config.dtype, prompt_lengths=val_prompt_lengths)
            if log is not None:
                log.write({"step": done, "tokens": tokens_seen, "val_loss": val_loss})
                bar.write(f"step {done}: val loss {val_loss:.4f} nats/token", file=sys.stderr)
        if done % config.save_every == 0 or done in (total_steps, end_step):
            checkpoint(done, tokens_seen)

    if start_step >= total_steps and val_loss is None:
        val_loss = evaluate(model, val_blocks, config.objective, config.eval_mc_samples,
                            config.eval_batch_size, device, config.dtype, prompt_lengths=val_prompt_lengths)
    summary = {
        "objective": config.objective, "model": model_config.name, "non_embedding_params": n_params,
        "steps": total_steps, "tokens": tokens_seen, "flops_6nd": 6.0 * n_params * tokens_seen,
        "final_val_loss": val_loss, "checkpoint": str(checkpoint_dir),
    }
    if info.is_main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _has_checkpoint(directory: Path) -> bool:
    try:
        resolve_checkpoint_dir(directory)
        return True
    except SmdmError:
        return False
