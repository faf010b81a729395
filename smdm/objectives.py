"""One Objective type per model family: what the training loop, evaluation and the loaders ask instead of strings.

An objective knows its losses (pre-training and SFT), whether its Transformer is `causal`, how long a training block
is, how many targets a block carries and how validation draws its noise. The loop (`smdm.train`) is the same for
every family; adding one (block diffusion, Arriola et al. 2025) is one new class registered in `OBJECTIVES`.
The math itself lives in `smdm.diffusion` as pure tensor functions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from smdm.block_diffusion import bdm_sft_step_loss, bdm_step_loss, check_block_size, check_time_range
from smdm.diffusion import (
    LOSS_WEIGHTINGS,
    MASK_EPS,
    arm_sft_step_loss,
    arm_step_loss,
    mdm_sft_step_loss,
    mdm_step_loss,
)
from smdm.errors import SmdmError


@dataclass(frozen=True)
class Objective:
    """The interface every family implements; options are fields of the subclass (recorded in checkpoints)."""

    name: ClassVar[str]
    causal: ClassVar[bool]
    compute_factor: ClassVar[float] = 1.0  # training FLOPs per token relative to one pass over the block

    def block_length(self, seq_len: int) -> int:
        """Tokens in one packed pre-training block that yields `seq_len` model inputs."""
        return seq_len

    def min_length(self) -> int:
        """The shortest block the random-length cut may leave (the paper cuts 1% of batches to [1, L])."""
        return 1

    def check_context(self, context: int) -> None:
        """Refuse a model context (positions) the family cannot fill; every length works by default."""

    def targets(self, tokens: torch.Tensor, sft: bool) -> int:
        """Model inputs a batch carries (the tokens/s column counts these)."""
        return tokens.numel()

    def loss(self, model: torch.nn.Module, tokens: torch.Tensor, generator: torch.Generator,
             mask_id: int) -> torch.Tensor:
        """One draw of the pre-training loss on clean blocks (B, block_length)."""
        raise NotImplementedError

    def sft_loss(self, model: torch.nn.Module, tokens: torch.Tensor, prompt_lengths: torch.Tensor,
                 generator: torch.Generator, mask_id: int) -> torch.Tensor:
        """One draw of the fine-tuning loss: response tokens only."""
        raise NotImplementedError

    def validation_draws(self, model: torch.nn.Module, tokens: torch.Tensor, prompt_lengths: torch.Tensor | None,
                         draws: int, seed: int) -> Iterator[torch.Tensor]:
        """The validation loss of one batch, once per fixed noise draw (deterministic given `seed`)."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The family's own options, as recorded in a checkpoint beside its name."""
        return {}


@dataclass(frozen=True)
class Autoregressive(Objective):
    """Next-token prediction; a block carries one extra token so it predicts seq_len targets."""

    name: ClassVar[str] = "arm"
    causal: ClassVar[bool] = True

    def block_length(self, seq_len: int) -> int:
        return seq_len + 1

    def min_length(self) -> int:
        return 2

    def targets(self, tokens: torch.Tensor, sft: bool) -> int:
        return tokens.numel() if sft else tokens.size(0) * (tokens.size(1) - 1)

    def loss(self, model: torch.nn.Module, tokens: torch.Tensor, generator: torch.Generator,
             mask_id: int) -> torch.Tensor:
        return arm_step_loss(model, tokens)

    def sft_loss(self, model: torch.nn.Module, tokens: torch.Tensor, prompt_lengths: torch.Tensor,
                 generator: torch.Generator, mask_id: int) -> torch.Tensor:
        return arm_sft_step_loss(model, tokens, prompt_lengths)

    def validation_draws(self, model: torch.nn.Module, tokens: torch.Tensor, prompt_lengths: torch.Tensor | None,
                         draws: int, seed: int) -> Iterator[torch.Tensor]:
        # Exact: one pass, whatever the number of draws asked for the MDM.
        yield arm_step_loss(model, tokens) if prompt_lengths is None else arm_sft_step_loss(model, tokens,
                                                                                           prompt_lengths)


@dataclass(frozen=True)
class ClippedRates:
    """The diffusion families' clipped masking-rate range for training (BD3-LM, Arriola et al. 2025 Sec. 4: rates
    drawn from [mask_rate_min, mask_rate_max], a lower-variance, biased estimate); validation stays unclipped."""

    mask_rate_min: float | None = None
    mask_rate_max: float | None = None

    def rate_range(self) -> tuple[float, float] | None:
        """The clipped range, None when neither end is set (the unclipped default path)."""
        if self.mask_rate_min is None and self.mask_rate_max is None:
            return None
        low = MASK_EPS if self.mask_rate_min is None else self.mask_rate_min
        high = 1.0 if self.mask_rate_max is None else self.mask_rate_max
        check_time_range(low, high)
        return low, high

    def rate_options(self) -> dict[str, float]:
        """The ends that were set, as a checkpoint records them."""
        return {k: v for k, v in (("mask_rate_min", self.mask_rate_min), ("mask_rate_max", self.mask_rate_max))
                if v is not None}


@dataclass(frozen=True)
class LossWeighting:
    """The diffusion families' training-loss weighting: "elbo" (each masked token's CE over its masking rate, the
    bound itself) or "ce" (the unweighted masked CE of Sahoo et al. 2026); validation is the ELBO either way."""

    loss_weighting: str = "elbo"

    def check_weighting(self) -> None:
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise SmdmError(f"unknown loss weighting {self.loss_weighting!r}; use one of {', '.join(LOSS_WEIGHTINGS)}")

    def weighting_options(self) -> dict[str, str]:
        # Only a non-default weighting is recorded, so checkpoints of the default recipe are unchanged and a resume
        # cannot silently switch the training loss.
        return {} if self.loss_weighting == "elbo" else {"loss_weighting": self.loss_weighting}


@dataclass(frozen=True)
class MaskedDiffusion(ClippedRates, LossWeighting, Objective):
    """The MDM's ELBO (Nie et al. 2025, Eq. 3); `low_discrepancy` stratifies t across a batch, `prompt_dropout`
    hides whole prompts in SFT (standard CFG training), `loss_weighting` "ce" trains on the unweighted masked
    cross-entropy (Sahoo et al. 2026), `mask_rate_min`/`mask_rate_max` clip the training masking rates; validation
    stays the true ELBO."""

    name: ClassVar[str] = "mdm"
    causal: ClassVar[bool] = False
    low_discrepancy: bool = False
    prompt_dropout: float = 0.0

    def __post_init__(self) -> None:
        self.check_weighting()
        self.rate_range()

    def loss(self, model: torch.nn.Module, tokens: torch.Tensor, generator: torch.Generator,
             mask_id: int) -> torch.Tensor:
        return mdm_step_loss(model, tokens, generator, self.low_discrepancy, mask_id=mask_id,
                             weighting=self.loss_weighting, rate_range=self.rate_range())

    def sft_loss(self, model: torch.nn.Module, tokens: torch.Tensor, prompt_lengths: torch.Tensor,
                 generator: torch.Generator, mask_id: int) -> torch.Tensor:
        return mdm_sft_step_loss(model, tokens, prompt_lengths, generator, self.prompt_dropout,
                                 self.low_discrepancy, mask_id=mask_id, weighting=self.loss_weighting,
                                 rate_range=self.rate_range())

    def options(self) -> dict[str, Any]:
        return self.weighting_options() | self.rate_options()

    def validation_draws(self, model: torch.nn.Module, tokens: torch.Tensor, prompt_lengths: torch.Tensor | None,
                         draws: int, seed: int) -> Iterator[torch.Tensor]:
        # The true ELBO whatever the training recipe: stratified t, fixed seeds, so every number compares.
        for draw in range(draws):
            generator = torch.Generator().manual_seed(seed + 7919 * draw)
            if prompt_lengths is None:
                yield mdm_step_loss(model, tokens, generator, low_discrepancy=True)
            else:
                yield mdm_sft_step_loss(model, tokens, prompt_lengths, generator, low_discrepancy=True)


@dataclass(frozen=True)
class BlockDiffusion(ClippedRates, LossWeighting, Objective):
    """Block diffusion (BD3-LM, Arriola et al. 2025): masked diffusion inside blocks of `diffusion_block_size`
    tokens, conditioned on the clean previous blocks; one vectorised pass over 2L tokens (smdm.block_diffusion).

    `mask_rate_min`/`mask_rate_max` clip each block's masking rate to BD3-LM's lower-variance range for training,
    and `loss_weighting` "ce" drops the 1/t weight as for the MDM; validation always uses the unclipped ELBO.
    """

    name: ClassVar[str] = "bdm"
    causal: ClassVar[bool] = False
    # One pass over 2L tokens: twice the matmuls, and (block-sparse) attention over about as many keys per query.
    compute_factor: ClassVar[float] = 2.0
    diffusion_block_size: int | None = None
    low_discrepancy: bool = False
    prompt_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.diffusion_block_size is None or self.diffusion_block_size < 1:
            raise SmdmError("the bdm objective needs --diffusion-block-size B (a positive divisor of the context)")
        self.check_weighting()
        self.rate_range()

    def _time_range(self) -> tuple[float, float]:
        return self.rate_range() or (MASK_EPS, 1.0)

    def check_context(self, context: int) -> None:
        check_block_size(self.diffusion_block_size, context)

    def block_length(self, seq_len: int) -> int:
        check_block_size(self.diffusion_block_size, seq_len)
        return seq_len

    def loss(self, model: torch.nn.Module, tokens: torch.Tensor, generator: torch.Generator,
             mask_id: int) -> torch.Tensor:
        low, high = self._time_range()
        return bdm_step_loss(model, tokens, self.diffusion_block_size, generator, low, high, self.low_discrepancy,
                             mask_id=mask_id, weighting=self.loss_weighting)

    def sft_loss(self, model: torch.nn.Module, tokens: torch.Tensor, prompt_lengths: torch.Tensor,
                 generator: torch.Generator, mask_id: int) -> torch.Tensor:
        low, high = self._time_range()
        return bdm_sft_step_loss(model, tokens, prompt_lengths, self.diffusion_block_size, generator,
                                 self.prompt_dropout, low, high, self.low_discrepancy, mask_id=mask_id,
                                 weighting=self.loss_weighting)

    def validation_draws(self, model: torch.nn.Module, tokens: torch.Tensor, prompt_lengths: torch.Tensor | None,
                         draws: int, seed: int) -> Iterator[torch.Tensor]:
        # The unclipped block ELBO with stratified rates and fixed seeds, whatever the training range.
        for draw in range(draws):
            generator = torch.Generator().manual_seed(seed + 7919 * draw)
            if prompt_lengths is None:
                yield bdm_step_loss(model, tokens, self.diffusion_block_size, generator, low_discrepancy=True)
            else:
                yield bdm_sft_step_loss(model, tokens, prompt_lengths, self.diffusion_block_size, generator,
                                        low_discrepancy=True)

    def options(self) -> dict[str, Any]:
        return {"diffusion_block_size": self.diffusion_block_size} | self.weighting_options() | self.rate_options()


OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (MaskedDiffusion, Autoregressive, BlockDiffusion)}


def objective_names() -> list[str]:
    """The families `--objective` accepts."""
    return list(OBJECTIVES)


def make_objective(name: str, **options: Any) -> Objective:
    """The objective `name` with its options; options of other families are refused, not ignored."""
    if name not in OBJECTIVES:
        raise SmdmError(f"unknown objective {name!r}; use one of {', '.join(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    allowed = set(cls.__dataclass_fields__)
    for option, value in options.items():
        if option not in allowed and value not in (None, False, 0, 0.0):
            raise SmdmError(f"{option.replace('_', '-')} is not an option of the {name} objective")
    return cls(**{k: v for k, v in options.items() if k in allowed})


def is_causal(name: str) -> bool:
    """Whether the family's Transformer is causal (without building the objective)."""
    if name not in OBJECTIVES:
        raise SmdmError(f"unknown objective {name!r}; use one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name].causal


def parse_family(label: str) -> tuple[str, dict[str, int]]:
    """A family label of a study ("mdm", "arm", or "bdm:B" for block diffusion with blocks of B tokens) as the
    objective's name and options, so one sweep can hold several block sizes as separate families."""
    name, _, block = label.partition(":")
    if name not in OBJECTIVES:
        raise SmdmError(f"unknown objective {label!r}; use one of {', '.join(OBJECTIVES)} (bdm as bdm:B)")
    if name != "bdm":
        if block:
            raise SmdmError(f"{label!r}: only bdm takes a block size (bdm:B)")
        return name, {}
    if not block.isdigit() or int(block) < 1:
        raise SmdmError(f"{label!r}: block diffusion in a study is bdm:B with a block size B >= 1, e.g. bdm:8")
    return name, {"diffusion_block_size": int(block)}


def family_compute_factor(label: str) -> float:
    """Training FLOPs per token of a family relative to one pass (2 for block diffusion's 2L-token pass)."""
    return OBJECTIVES[parse_family(label)[0]].compute_factor
