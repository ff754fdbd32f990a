"""Run a script with `benchmarks/torchvision_stub/` standing in for torchvision (which has no CPU build here).

    python benchmarks/run_with_torchvision_stub.py SCRIPT [ARGS...]     (what train_throughput.py launches for diffusers' script)

transformers and diffusers first settle that torchvision is absent (so they keep their PIL code paths);
only then do `import torchvision` and `from torchvision import transforms` resolve to the stand-ins.
"""

from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path

import diffusers  # noqa: F401  (decides at import that torchvision is absent)
from transformers.utils import import_utils

STUB = Path(__file__).resolve().parent / "torchvision_stub"


def install_stub() -> None:
    """Register the stand-in package and its transforms module under torchvision's names."""
    # transformers asks lazily and caches the answer: ask now, while the answer is still no.
    assert not import_utils.is_torchvision_available() and not import_utils.is_torchvision_v2_available()
    for name, path in (
        ("torchvision", STUB / "__init__.py"),
        ("torchvision.transforms", STUB / "transforms.py"),
    ):
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]


if __name__ == "__main__":
    install_stub()
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
