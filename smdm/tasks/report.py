"""Every task writes the same kind of record: metrics + the settings that made them + which weights, as JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smdm.checkpoint import Checkpoint


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
