"""`smdm export --checkpoint C --format hf --out DIR`: the parser and command of the interop package."""

from __future__ import annotations

import argparse


def cmd_export(args: argparse.Namespace) -> None:
    """Export a checkpoint (or HF directory) to a Hugging Face directory."""
    from smdm.interop.export import export_hf

    out = export_hf(args.checkpoint, args.out, args.tokenizer)
    print(f"exported {args.checkpoint} -> {out} ({args.format})")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `smdm export` on the CLI's subparsers."""
    from smdm.interop.export import FORMATS

    p = subparsers.add_parser("export", help="write a checkpoint as a Hugging Face directory (ARM: Llama; MDM: LLaDA)")
    p.add_argument("--checkpoint", required=True, help="smdm checkpoint or Hugging Face model directory")
    p.add_argument("--format", choices=FORMATS, default="hf")
    p.add_argument("--out", required=True, help="new directory to write (must not exist or be empty)")
    p.add_argument("--tokenizer", help="default: the tokenizer stored with the checkpoint")
    p.set_defaults(func=cmd_export)
