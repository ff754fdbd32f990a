"""The spread over training seeds of `train/evaluate.py` results: per row, the mean and the worst seed.

    python train/seed_spread.py outputs/lora-demo/eval-base outputs/lora-demo-seed1/eval-base ...
    python train/seed_spread.py --by color outputs/lora-demo*/eval-lora

Each argument is one seed's evaluation folder (its adherence.json). Rows are guidance scales (`--by scale`, the
default: shape, colour, position and all-three accuracy) or asked-for colours at the first guidance scale (`--by
color`: colour and all-three accuracy). Prints a Markdown table: mean over the folders, then the worst folder's value
and its name, for each column.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SCORES = ("shape", "color", "position", "all")


def load(folder: Path) -> dict:
    path = folder / "adherence.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; give train/evaluate.py's --out_dir folders.")
    return json.loads(path.read_text(encoding="utf-8"))


def rows_by_scale(report: dict) -> dict[str, dict[str, float]]:
    """{guidance label: {score: accuracy}} of one evaluation."""
    rows = {}
    for entry in report["scales"]:
        label = f"{entry['guidance_scale']:g}" + (
            f" / control {entry['control_scale']:g}" if "control_scale" in entry else ""
        )
        rows[label] = {key: entry["accuracy"][key] for key in SCORES if key in entry["accuracy"]}
    return rows


def rows_by_color(report: dict) -> dict[str, dict[str, float]]:
    """{asked colour: {"color", "all"}} at the evaluation's first guidance scale."""
    groups: dict[str, list[dict]] = {}
    for sample in report["scales"][0]["samples"]:
        groups.setdefault(sample["expected"]["color"], []).append(sample)
    return {
        color: {key: sum(s["correct"][key] for s in samples) / len(samples) for key in ("color", "all")}
        for color, samples in groups.items()
    }


def spread(tables: dict[str, dict[str, dict[str, float]]]) -> list[tuple[str, str, float, float, str]]:
    """(row, column, mean, worst, worst folder) for every row and column the tables share."""
    names = list(tables)
    first = tables[names[0]]
    out = []
    for row, columns in first.items():
        for column in columns:
            values = {
                name: tables[name][row][column] for name in names if column in tables[name].get(row, {})
            }
            if len(values) != len(names):
                raise ValueError(
                    f"{row}/{column} is missing from some folders; evaluate every seed the same way."
                )
            worst = min(values, key=values.get)
            out.append((row, column, sum(values.values()) / len(values), values[worst], worst))
    return out


def format_spread(entries, by: str, num_folders: int) -> str:
    columns = list(dict.fromkeys(column for _, column, *_ in entries))
    header = (
        f"| {'guidance' if by == 'scale' else 'asked-for colour'} | "
        + " | ".join(f"{c}: mean | {c}: worst" for c in columns)
        + " |"
    )
    lines = [header, "|" + " --- |" * (1 + 2 * len(columns))]
    for row in dict.fromkeys(row for row, *_ in entries):
        cells = {column: (mean, worst) for r, column, mean, worst, _ in entries if r == row}
        lines.append(
            f"| {row} | "
            + " | ".join(f"{100 * cells[c][0]:.1f} % | {100 * cells[c][1]:.1f} %" for c in columns)
            + " |"
        )
    lines.append(f"({num_folders} seeds; worst = the lowest seed's value)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="Mean and worst seed of several train/evaluate.py results.")
    parser.add_argument("folders", nargs="+", type=Path, help="One evaluation folder per seed.")
    parser.add_argument("--by", choices=("scale", "color"), default="scale", help="Rows (default: scale).")
    args = parser.parse_args(argv)
    if len(args.folders) < 2:
        parser.error(f"give at least two folders (one per seed), got {len(args.folders)}.")
    read = rows_by_scale if args.by == "scale" else rows_by_color
    tables = {str(folder): read(load(folder)) for folder in args.folders}
    text = format_spread(spread(tables), args.by, len(tables))
    print(text)
    return text


if __name__ == "__main__":
    main()
