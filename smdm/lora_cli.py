"""`smdm sft`'s LoRA flags, kept free of torch so the CLI starts fast (the training code is smdm.lora)."""

from __future__ import annotations

import argparse

from smdm.cli_types import fraction, positive_float, positive_int

LORA_TARGETS = ("qkv", "proj", "gate_up", "down", "lm_head")  # smdm's module names (smdm.model)
DEFAULT_TARGETS = ("qkv", "proj", "gate_up", "down")  # every linear layer of the blocks (QLoRA's recipe)
QUANTIZE = ("4bit", "8bit")  # frozen base layers through bitsandbytes (QLoRA)


def add_lora_args(parser: argparse.ArgumentParser) -> None:
    """`smdm sft`'s LoRA flags (TrainConfig fields; unset flags keep a recorded run config's values)."""
    unset = argparse.SUPPRESS
    parser.add_argument("--lora-rank", type=positive_int, default=unset,
                        help="train a rank-R LoRA adapter (PEFT) instead of every weight")
    parser.add_argument("--lora-alpha", type=positive_float, default=unset, help="LoRA scale alpha/R (default 2R)")
    parser.add_argument("--lora-dropout", type=fraction, default=unset, help="dropout on the adapter input (0)")
    parser.add_argument("--lora-targets", nargs="+", default=unset, metavar="MODULE",
                        help=f"smdm modules to adapt: {', '.join(LORA_TARGETS)} (default "
                             f"{' '.join(DEFAULT_TARGETS)})")
    parser.add_argument("--lora-quantize", choices=QUANTIZE, default=unset,
                        help="QLoRA: keep the frozen base's block layers in 4-bit NF4 (or 8-bit) via bitsandbytes")
    parser.add_argument("--merge", action="store_true", default=unset,
                        help="LoRA: at the end, write the merged weights as an smdm checkpoint in OUT/checkpoint")
