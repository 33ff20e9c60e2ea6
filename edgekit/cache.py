"""The on-disk cache for converted checkpoints and weights trained on first use.

Entries are directories written atomically (built in a temp dir, then renamed) with a
``manifest.json`` of SHA-256 hashes; an entry whose files no longer match is treated as
missing and rebuilt, so a crash mid-write or a corrupted file is never half-read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

MANIFEST = "cache-manifest.json"


def cache_root() -> Path:
    """``$EDGEKIT_CACHE`` or ``~/.cache/edgekit``."""
    root = os.environ.get("EDGEKIT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "edgekit"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _hash_tree(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): file_sha256(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def is_valid(entry: Path) -> bool:
    """True when ``entry`` exists and every file still has the hash recorded at write time."""
    manifest = entry / MANIFEST
    if not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return recorded == _hash_tree(entry)


def atomic_directory(target: Path, build: Callable[[Path], None], meta: dict | None = None) -> Path:
    """Run ``build(tmpdir)``, hash what it wrote, and rename the result onto ``target``.

    A previous (invalid) ``target`` is replaced; if ``build`` raises, nothing is left behind.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        (tmp / MANIFEST).write_text(json.dumps({"files": _hash_tree(tmp), "meta": meta or {}}, indent=1))
        if target.exists():
            stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
            target.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def cached_entry(name: str, build: Callable[[Path], None], meta: dict | None = None) -> Path:
    """The valid cache directory ``name``, building it (atomically) when missing or corrupt."""
    entry = cache_root() / name
    if is_valid(entry):
        return entry
    return atomic_directory(entry, build, meta)
