"""The package's shape: no import cycles (also none hidden inside functions), no private names across modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def ldm_imports() -> dict[str, list[tuple[str, list[str]]]]:
    """Every `ldm` import of every module, anywhere in its body: {module: [(imported module, names)]}."""
    found = {}
    for path in sorted((ROOT / "ldm").rglob("*.py")):
        imports = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ldm":
                imports.append((node.module, [alias.name for alias in node.names]))
            elif isinstance(node, ast.Import):
                imports += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "ldm"]
        found[module_name(path)] = imports
    return found


def test_no_import_cycles():
    graph = {module: {target for target, _ in imports} for module, imports in ldm_imports().items()}

    def visit(module: str, path: list[str]) -> None:
        for target in graph.get(module, ()):
            assert target not in path, f"import cycle: {' -> '.join([*path, target])}"
            visit(target, [*path, target])

    for module in graph:
        visit(module, [module])


def test_no_private_names_across_modules():
    for module, imports in ldm_imports().items():
        for target, names in imports:
            private = [name for name in names if name.startswith("_")]
            assert not private, f"{module} imports private {private} from {target}"


def test_training_batch_path_runs_one_way():
    """config -> sources/transforms -> data -> latent_cache -> encoders -> loss: none imports one after it."""
    order = ["config", "sources", "transforms", "data", "latent_cache", "encoders", "loss"]
    graph = ldm_imports()
    for position, name in enumerate(order):
        later = {f"ldm.training.{after}" for after in order[position + 1 :]}
        imported = {target for target, _ in graph[f"ldm.training.{name}"]}
        assert not imported & later, f"ldm.training.{name} imports {imported & later}"
