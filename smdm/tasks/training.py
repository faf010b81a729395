"""The model a task evaluates: a given checkpoint, or one fine-tuned (or trained from scratch) on the task's data.

Shared by the reversal-curse and GSM8K tasks, so the rule "from scratch, fit a BPE to the task's own text" and the
refusal of MDM-only sampler options before an ARM is trained live in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from smdm.checkpoint import Checkpoint, load_for_inference
from smdm.errors import SmdmError
from smdm.sample import SamplerSettings
from smdm.tokenizer import Tokenizer


@dataclass
class TaskModel:
    """Where a task's model comes from, and how it is trained when it is trained here (in OUT/run)."""

    out: str
    checkpoint: str | None = None  # evaluate this model as it is
    init_from: str | None = None  # fine-tune this checkpoint; neither: train from scratch
    model: str = "tiny-1m"  # config when training from scratch
    objective: str = "mdm"
    diffusion_block_size: int | None = None  # bdm only
    epochs: float = 30
    batch_size: int = 32
    lr: float = 3e-3
    low_discrepancy: bool = False  # MDM training recipe (see TrainConfig)
    loss_weighting: str = "elbo"
    save_every: int = 500
    vocab_size: int = 1024  # BPE size when training from scratch
    padding: str = "longest"
    tokenizer: str | None = None
    resume: bool = False
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    dtype: str | None = None  # of a given checkpoint's weights (see load_for_inference)
    progress: bool = True

    def refuse_arm_options(self, sampler: SamplerSettings, extra: dict[str, object] | None = None) -> None:
        """Before training an ARM: MDM-only sampler options would only fail after an hour of training."""
        if self.checkpoint is not None or self.objective != "arm":
            return
        used = {**sampler.mdm_only(), **{k: v for k, v in (extra or {}).items() if v is not None}}
        for flag in used:
            if "cfg" in flag:
                raise SmdmError(f"classifier-free guidance needs an MDM (it masks the prompt); {flag} cannot apply "
                                "to --objective arm")
            raise SmdmError(f"{flag} is an MDM sampler option; an ARM decodes one token per step")

    def load(self, train_files: list[Path], text_mode: bool, template: str = "plain",
             tokenizer_files: list[Path] | None = None) -> tuple[Checkpoint, Tokenizer]:
        """The checkpoint as given, or one fine-tuned (or trained) here on `train_files`.

        From scratch, the BPE is fitted to `tokenizer_files` (default: train_files), so a run on a few examples
        still gets a tokenizer that covers the task's whole vocabulary.
        """
        if self.checkpoint:
            return load_for_inference(self.checkpoint, self.tokenizer, self.device, self.dtype)
        from smdm.data.sft import SFTConfig, read_examples
        from smdm.finetune import finetune
        from smdm.tokenizer import train_bpe
        from smdm.train import TrainConfig

        tokenizer = self.tokenizer
        if tokenizer is None and self.init_from is None:  # from scratch: a BPE fitted to the task's own text
            tokenizer = Path(self.out) / "tokenizer.json"
            if not tokenizer.is_file():  # kept on --resume: the data was tokenized with it
                sft = SFTConfig(template=template)
                texts = [e.prompt + e.response for f in (tokenizer_files or train_files)
                         for e in read_examples(f, sft)[0]]
                Path(self.out).mkdir(parents=True, exist_ok=True)
                train_bpe(texts, self.vocab_size, tokenizer)
        config = TrainConfig(data_dir="", out_dir=str(Path(self.out) / "run"), model=self.model,
                             objective=self.objective, diffusion_block_size=self.diffusion_block_size,
                             epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                             low_discrepancy=self.low_discrepancy, loss_weighting=self.loss_weighting,
                             init_from=self.init_from, seed=self.seed, threads=self.threads, device=self.device,
                             resume=self.resume, eval_every=10**9, save_every=self.save_every,
                             progress=self.progress)
        finetune(train_files, config, SFTConfig(mode="text" if text_mode else "response", template=template,
                                                seed=self.seed, padding=self.padding), tokenizer=tokenizer)
        return load_for_inference(str(Path(config.out_dir) / "checkpoint"), None, self.device)
