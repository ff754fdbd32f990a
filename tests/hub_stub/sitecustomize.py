"""Loaded by training processes under test (via PYTHONPATH): records Hub calls instead of making them.

Each call appends one JSON line to $LDM_TEST_HUB_RECORD, listing the files an upload would send.
"""

import fnmatch
import json
import os
from concurrent.futures import Future
from pathlib import Path

import huggingface_hub


def _record(entry: dict) -> None:
    with open(os.environ["LDM_TEST_HUB_RECORD"], "a") as f:
        f.write(json.dumps(entry) + "\n")


def create_repo(self, repo_id, **kwargs):
    _record({"call": "create_repo", "repo_id": repo_id})
    return f"https://huggingface.co/{repo_id}"


def upload_folder(
    self, *, repo_id, folder_path, path_in_repo=None, ignore_patterns=None, run_as_future=False, **kw
):
    root = Path(folder_path)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    files = [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in ignore_patterns or [])]
    _record(
        {
            "call": "upload_folder",
            "repo_id": repo_id,
            "path_in_repo": path_in_repo,
            "files": files,
            "run_as_future": run_as_future,
        }
    )
    if run_as_future:
        future = Future()
        future.set_result("commit")
        return future
    return "commit"


huggingface_hub.HfApi.create_repo = create_repo
huggingface_hub.HfApi.upload_folder = upload_folder
