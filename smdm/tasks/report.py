"""Every task writes the same kind of record: metrics + the settings that made them + which weights, as JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smdm.checkpoint import Checkpoint
from smdm.errors import SmdmError
from smdm.model import Transformer
from smdm.sample import SamplerSettings


def model_identity(checkpoint: Checkpoint) -> dict[str, Any]:
    """Name, family and weights hash of a checkpoint, so a result can be traced to the exact model."""
    meta_path = checkpoint.path / "config.json"
    sha = json.loads(meta_path.read_text())["weights_sha256"] if meta_path.is_file() else None
    return {"path": str(checkpoint.path), "config": checkpoint.config.name,
            "objective": checkpoint.meta.get("objective"), "weights_sha256": sha}


def write_results(path: str | Path, task: str, metrics: dict[str, Any], settings: dict[str, Any],
                  checkpoint: Checkpoint, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write {task, metrics, settings, model, ...extra} as JSON (parent directories created) and return it."""
    record = {"task": task, "metrics": metrics, "settings": settings, "model": model_identity(checkpoint),
              **(extra or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable in a terminal too); floats with 3 decimals."""
    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def check_generation_settings(model: Transformer, batch_size: int, limit: int | None, sampler: SamplerSettings,
                              cfg_flags: dict[str, float | None] | None = None) -> None:
    """The checks every generating task shares, run before the first question: CFG only on an MDM, sane sizes."""
    cfg_flags = {"--cfg-scale": sampler.cfg_scale, **(cfg_flags or {})}
    used = [flag for flag, value in cfg_flags.items() if value is not None]
    if model.causal and used:
        raise SmdmError("classifier-free guidance needs an MDM (it masks the prompt); this checkpoint is an ARM: "
                        f"drop {'/'.join(used)}")
    if batch_size < 1:
        raise SmdmError(f"batch size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise SmdmError(f"limit must be at least 1, got {limit}")
