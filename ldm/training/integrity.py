"""File integrity: a manifest of sizes and SHA-256s, written last into a folder and verified before it is read; and
the check that a checkpoint's pickled accelerate state loads weights-only before accelerate reads it.

Checkpoints and the latent cache both use the manifest: a folder whose manifest verifies was completely written and
has not been damaged since (cut short, zeroed, edited); anything else is named with the file at fault. A manifest
detects damage, not tampering (whoever rewrites a file can rewrite the manifest): what keeps a hostile checkpoint from
running code is that nothing in it is loaded with more than tensors and plain values.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

from accelerate.utils import RNG_STATE_NAME
from accelerate.utils import load as load_pickled

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


# What accelerate's random states file holds; it loads that file inside a try that only logs "Could not load random
# states" at INFO on any error (accelerate 1.15 checkpointing.py), and the resume is then silently not exact.
RANDOM_STATE_KEYS = {"random_state", "numpy_random_seed", "torch_manual_seed"}


def _load_failure(err: Exception) -> str:
    """Why torch could not load a file, without torch's advice to retry with weights_only=False (which would run
    whatever code the file holds)."""
    text = str(err).strip()
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return f"its pickle asks to run {refused.group(1)}"
    if "weights_only" in text:  # torch's own reason follows "WeightsUnpickler error:"
        reason = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        return (
            f"not a tensor file torch.save wrote: {reason[0]}"
            if "WeightsUnpickler" in text
            else "not loadable"
        )
    return text.splitlines()[0] if text else type(err).__name__


def _load_state_file(file: Path):
    """`file` as accelerate loads it (weights only, its safe globals), memory-mapped when it is in torch's zip format;
    a legacy pickle is loaded whole (still weights only), so that its error says what it holds. torch's warnings about
    the pickle's protocol are silenced: the error, if any, says what matters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return load_pickled(file, map_location="cpu", mmap=True)
        except RuntimeError as err:
            if "mmap can only be used" not in str(err):
                raise
            return load_pickled(file, map_location="cpu")


def check_state_files(path: Path, process_index: int) -> None:
    """Every file accelerate unpickles on resume loads as it will then (weights only, memory-mapped: cheap even for a
    large optimizer state), and this process's random states are there and complete.

    Raises:
        ValueError: naming the file and what is wrong with it.
    """
    random_states = path / f"{RNG_STATE_NAME}_{process_index}.pkl"
    if not random_states.is_file():
        raise ValueError(
            f"Cannot resume from {path}: {random_states.name} is missing, so process {process_index}'s random "
            "states would not be restored and the resume would not be exact. Resume with the number of processes "
            "that saved it, or from another checkpoint."
        )
    for file in sorted(path.glob("*.bin")) + sorted(path.glob("*.pkl")):
        try:
            state = _load_state_file(file)
        except Exception as err:  # any failure: the message below replaces torch's advice
            raise ValueError(
                f"Cannot resume from {path}: {file.name} is not a file accelerate wrote ({_load_failure(err)}). A "
                "checkpoint never needs code to load, so it is not loaded; resume from another checkpoint."
            ) from None
        if file.name.startswith(RNG_STATE_NAME) and not (
            isinstance(state, dict) and RANDOM_STATE_KEYS <= state.keys()
        ):
            raise ValueError(
                f"Cannot resume from {path}: {file.name} does not hold the random states accelerate saves "
                f"({', '.join(sorted(RANDOM_STATE_KEYS))}), so the resume would not be exact; resume from another "
                "checkpoint."
            )
