"""File integrity: a manifest of sizes and SHA-256s, written last into a folder and verified before it is read.

Checkpoints and the latent cache both use it: a folder whose manifest verifies was completely written and has not
been damaged since (cut short, zeroed, edited); anything else is named with the file at fault.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"


def file_sha256(path: Path) -> str:
    """The file's SHA-256, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record every file's size and SHA-256 in `manifest.json`; write it last, once everything else is on disk."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files
    }
    (folder / MANIFEST).write_text(json.dumps({"files": entries}, indent=1) + "\n")


def verify_manifest(folder: Path) -> str | None:
    """None if every file in the folder's manifest is there with its size and checksum, else what is wrong."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"it has no {MANIFEST}, so it was never completely written"
    try:
        recorded = json.loads(manifest.read_text())["files"]
        entries = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in recorded.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return f"{manifest} is damaged"
    for name, (size, sha256) in entries.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes where {size} were written (cut short?)"
        if file_sha256(path) != sha256:
            return f"{path} does not match the checksum recorded when it was written"
    return None
