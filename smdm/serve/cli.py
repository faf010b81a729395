"""`smdm serve`: the command's arguments and the function that loads the model and runs uvicorn."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from smdm.cli_types import finite_float, port_number, positive_float, positive_int
from smdm.errors import SmdmError

API_KEY_ENV = "SMDM_API_KEY"


def add_parser(subparsers) -> None:
    """Register `smdm serve` on the CLI's subparsers."""
    p = subparsers.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API, with a playground")
    p.add_argument("--checkpoint", required=True, help="any checkpoint `smdm sample` accepts (MDM or ARM)")
    p.add_argument("--tokenizer")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every endpoint but /health (or set {API_KEY_ENV})")
    p.add_argument("--name", help="the model id clients pass as `model` (default: the checkpoint directory's name)")
    p.add_argument("--max-batch", type=positive_int, default=16, help="rows per batched sampler call (1: no batching)")
    p.add_argument("--batch-window-ms", type=finite_float(0), default=2.0,
                   help="how long the oldest waiting request waits for others to batch with")
    p.add_argument("--max-queue", type=positive_int, default=64, help="waiting requests; past it new ones get 429")
    p.add_argument("--timeout", type=positive_float, default=300.0, help="seconds per request, queueing included (504 after)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from smdm.serve.app import ServeConfig, create_app, model_family
    except ImportError as error:
        raise SmdmError(f"smdm serve needs the serve extra ({error.name} is missing): pip install -e \".[serve]\"") \
            from None
    import torch

    from smdm.checkpoint import load_for_inference

    for name, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if value < 1:
            raise SmdmError(f"{name} must be at least 1, got {value}")
    if not 0 < args.port < 65536:
        raise SmdmError(f"--port must lie in 1..65535, got {args.port}")
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint, tokenizer = load_for_inference(args.checkpoint, args.tokenizer, args.device)
    checkpoint.model.eval()
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    config = ServeConfig(name=args.name or Path(args.checkpoint).resolve().name, api_key=api_key,
                         max_batch=args.max_batch, window_ms=args.batch_window_ms, max_queue=args.max_queue,
                         timeout_s=args.timeout)
    app = create_app(checkpoint.model, tokenizer, config)
    family = model_family(checkpoint.model).upper()
    print(f"smdm serve: {family} `{config.name}` on http://{args.host}:{args.port}/ (playground at /, API at /v1)"
          f"{' with an API key' if api_key else ''}", file=sys.stderr, flush=True)
    sys.setswitchinterval(0.0005)  # the sampler thread gets the GIL back quickly from the HTTP thread
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
