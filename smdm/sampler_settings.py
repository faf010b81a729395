"""SamplerSettings: how to decode, as one validated type shared by `smdm sample`, the tasks, the lm-eval model, the
server and `smdm chat`, with the one function that adds its options to a parser.

Torch-free on purpose: the CLI builds every parser (and the server parses requests) without importing the sampler.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smdm.model import Transformer
    from smdm.sample import Plan

MDM_CACHES = ("none", "prefix", "dual")
ARM_CACHES = ("kv", "none")
REMASKINGS = ("low_confidence", "random")
# How many tokens each low-confidence step reveals: LLaDA's even split, or int(n·(1 - s/t)) on timesteps
# linspace(1, eps, steps + 1) with the rest at the last step — SMDM's diff_sample (eps 1e-5) and Dream's default
# `_sample` (maskgit_plus, eps 1e-3).
SCHEDULE_EPS = {"smdm": 1e-5, "dream": 1e-3}
SCHEDULES = ("even", *SCHEDULE_EPS)
SMDM_SCHEDULE_EPS = SCHEDULE_EPS["smdm"]


@dataclass(frozen=True)
class SamplerSettings:
    """How to decode, for every family: one type shared by `smdm sample`, the tasks, the lm-eval model and the
    server. `plan()` validates it against a model and a length, once, before any model call.

    steps (MDM, default: the length), block_length (default: one block), remasking, schedule ("even": LLaDA's
    split; "smdm": SMDM's diff_sample, floor(n·(1 - s/t)) per step and the rest at the last), temperature, top_p,
    cfg_scale (MDM; None: no guidance), threshold (MDM parallel decoding) and cache (MDM: none|prefix|dual; ARM:
    kv|none) are described in the module docstring.
    """

    steps: int | None = None
    block_length: int | None = None
    remasking: str = "low_confidence"
    schedule: str = "even"
    temperature: float = 0.0
    top_p: float = 1.0
    cfg_scale: float | None = None
    threshold: float | None = None
    cache: str | None = None
    stop_at_eos: bool = False

    @classmethod
    def from_namespace(cls, args: object, **overrides: object) -> SamplerSettings:
        """The settings parsed by `add_sampler_args` (attributes of an argparse namespace), then `overrides`."""
        values = {name: getattr(args, name) for name in cls.__dataclass_fields__ if hasattr(args, name)}
        values.update(overrides)
        return cls(**values)

    def options(self) -> dict[str, object]:
        """The keyword arguments of `generate` / `make_plan` (all but steps and temperature, passed positionally)."""
        return {"remasking": self.remasking, "block_length": self.block_length, "cfg_scale": self.cfg_scale,
                "threshold": self.threshold, "cache": self.cache, "top_p": self.top_p,
                "stop_at_eos": self.stop_at_eos, "schedule": self.schedule}

    def plan(self, model: Transformer, length: int, eos_id: int | None = None) -> Plan:
        """Validate against a model (its family) and a length; raises SmdmError naming the bad option."""
        from smdm.sample import make_plan

        return make_plan(model, length, self.steps, self.temperature, eos_id=eos_id, **self.options())

    def mdm_only(self) -> dict[str, object]:
        """The options set away from their defaults that only an MDM accepts (flag name -> value)."""
        defaults = SamplerSettings()
        names = ("steps", "block_length", "remasking", "schedule", "cfg_scale", "threshold")
        return {"--" + n.replace("_", "-"): getattr(self, n) for n in names if getattr(self, n) != getattr(defaults, n)}


def add_sampler_args(parser: argparse.ArgumentParser, defaults: SamplerSettings = SamplerSettings(),
                     skip: Sequence[str] = ()) -> None:
    """Add every sampler option to a parser, choices taken from the sampler's own constants."""
    from smdm.cli_types import finite_float, positive_int, probability

    options = {
        "steps": {"type": positive_int, "help": "MDM denoising steps (default: the length)"},
        "block_length": {"type": positive_int, "help": "MDM semi-autoregressive block length; steps are split "
                                                     "evenly across blocks (default: the length, one block)"},
        "remasking": {"choices": REMASKINGS, "help": "MDM: reveal the most confident predictions, or each masked "
                                                   "token with probability 1 - s/t"},
        "schedule": {"choices": SCHEDULES, "help": "MDM low-confidence tokens per step: even (LLaDA), smdm (SMDM's "
                                                 "diff_sample: int(n(1 - s/t)), the rest at the last) or dream (the "
                                                 "same on Dream's timesteps)"},
        "temperature": {"type": finite_float(0), "help": "0: greedy"},
        "top_p": {"type": probability, "help": "nucleus sampling mass (with temperature > 0)"},
        "cfg_scale": {"type": finite_float(), "help": "MDM classifier-free guidance w: uncond + (w + 1)(cond - "
                                                    "uncond), the prompt masked for uncond"},
        "threshold": {"type": probability, "help": "MDM parallel decoding: also reveal every token whose "
                                                 "confidence exceeds this"},
        "cache": {"choices": sorted(set(MDM_CACHES + ARM_CACHES)),
                      "help": "MDM: none (exact, default), prefix or dual (Fast-dLLM, approximate); "
                           "ARM: kv (default) or none"},
        "stop_at_eos": {"action": "store_true", "help": "stop once every sample has an EOS in its final tokens "
                                                     "(completions are cut there anyway)"},
    }
    for name, spec in options.items():
        if name in skip:
            continue
        if spec.get("action") != "store_true":
            spec["default"] = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), **spec)
