"""Prompt adherence of a text-to-image pipeline on the held-out prompts of the shapes dataset, per guidance scale.

Every held-out prompt names a shape, a colour and a position (:mod:`ldm.shapes.synthetic`). The pipeline draws one image
per (prompt, seed) at each guidance scale s, :func:`ldm.shapes.detector.detect` reads the three attributes back from the
pixels, and the score of a scale is the fraction of images whose shape, colour, position, or all three at once,
match the prompt. Image (prompt i, seed k) starts from the same noise x_T at every scale, so the scales are
compared on identical starting points and differ only in eps_hat = eps_uncond + s * (eps_cond - eps_uncond).

    results = evaluate_adherence(pipe, load_heldout_prompts("data/shapes/heldout_prompts.jsonl"))
    print(format_table(results))
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import PIL.Image
from tqdm.auto import tqdm

from ldm.images import image_grid
from ldm.seeding import keyed_generator
from ldm.shapes.detector import detect
from ldm.shapes.synthetic import COLORS, POSITIONS, SHAPES

ATTRIBUTES = ("shape", "color", "position")
SCORES = (*ATTRIBUTES, "all")
_VOCABULARIES = {"shape": SHAPES, "color": tuple(COLORS), "position": POSITIONS}


# ----------------------------------------------------------------------------------------------
# Held-out prompts
# ----------------------------------------------------------------------------------------------


def _prompt_row_problem(row: Any) -> str | None:
    """What is wrong with one held-out prompt row, or None if it is a valid one."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__} {row!r}"
    missing = [key for key in ("prompt", *ATTRIBUTES) if key not in row]
    if missing:
        return f"missing key(s) {missing}; every row needs 'prompt', 'shape', 'color' and 'position'"
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        return f"'prompt' must be a non-empty string, got {row['prompt']!r}"
    for key in ATTRIBUTES:
        if row[key] not in _VOCABULARIES[key]:
            return f"{key} {row[key]!r} is not one of {list(_VOCABULARIES[key])}"
    return None


def load_heldout_prompts(path: str | Path) -> list[dict]:
    """Read the held-out prompts that :func:`ldm.shapes.synthetic.generate_dataset` writes.

    Args:
        path: A ``heldout_prompts.jsonl``: one JSON object per line with ``prompt``, ``shape``, ``color`` and
            ``position`` (the attributes the prompt asks for). Blank lines are skipped.

    Returns:
        The rows in file order, as dicts.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: Naming the file and line, on a line that is not JSON, a row that lacks a key or holds an
            attribute outside the dataset's vocabulary, or a file with no prompts at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No held-out prompt file at {path}; generate one with `python -m ldm.shapes.synthetic --out_dir ...`, "
            "which writes heldout_prompts.jsonl."
        )
    rows = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}, line {line_number}: not valid JSON ({err.msg}): {line[:80]!r}"
            ) from err
        problem = _prompt_row_problem(row)
        if problem:
            raise ValueError(f"{path}, line {line_number}: {problem}.")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no prompts; regenerate it with num_heldout >= 1.")
    return rows


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


def _generate(
    pipe,
    prompts: Sequence[dict],
    samples: Sequence[tuple[int, int]],
    guidance_scale: float,
    num_inference_steps: int,
    batch_size: int,
    progress: tqdm | None = None,
) -> list[PIL.Image.Image]:
    """One image per (prompt_index, seed) in `samples`, generated `batch_size` at a time."""
    images: list[PIL.Image.Image] = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        out = pipe(
            [prompts[i]["prompt"] for i, _ in batch],
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            # CPU generators keyed by (seed, prompt) alone: the same x_T at every guidance scale, on any device.
            generator=[keyed_generator(seed, i) for i, seed in batch],
            output_type="pil",
        ).images
        if len(out) != len(batch):
            raise RuntimeError(
                f"The pipeline returned {len(out)} images for a batch of {len(batch)} prompts."
            )
        images.extend(out)
        if progress is not None:
            progress.update(len(batch))
    return images


def _check_evaluation_args(
    prompts: Sequence[dict], guidance_scales: Sequence[float], seeds: Sequence[int], batch_size: int
) -> None:
    """Raise a ValueError naming the first bad argument of evaluate_adherence."""
    if not prompts:
        raise ValueError("prompts is empty; pass at least one held-out prompt (see load_heldout_prompts).")
    for index, row in enumerate(prompts):
        problem = _prompt_row_problem(row)
        if problem:
            raise ValueError(f"prompts[{index}]: {problem}.")
    if not guidance_scales:
        raise ValueError("guidance_scales is empty; pass at least one, e.g. (1.0, 3.0, 7.5).")
    if len(set(map(float, guidance_scales))) != len(guidance_scales):
        raise ValueError(f"guidance_scales {list(guidance_scales)} repeats a value; list each scale once.")
    if not seeds:
        raise ValueError("seeds is empty; pass at least one, e.g. (0, 1, 2).")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seeds must be non-negative ints, got {seed!r} in {list(seeds)}.")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {list(seeds)} repeats a value; a repeated seed only duplicates images.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def _score(prompt_index: int, prompt: dict, seed: int, image: PIL.Image.Image) -> dict:
    """The per-sample record: what was asked, what the detector read, and which attributes match."""
    detected = detect(image)
    correct = {key: detected[key] == prompt[key] for key in ATTRIBUTES}
    correct["all"] = all(correct.values())
    return {
        "prompt_index": prompt_index,
        "prompt": prompt["prompt"],
        "seed": seed,
        "expected": {key: prompt[key] for key in ATTRIBUTES},
        "detected": detected,
        "correct": correct,
    }


def evaluate_adherence(
    pipe,
    prompts: list[dict],
    guidance_scales: Sequence[float] = (1.0, 3.0, 7.5),
    seeds: Sequence[int] = (0, 1, 2),
    num_inference_steps: int = 25,
    batch_size: int = 32,
) -> dict:
    """Score how often the pipeline draws what each held-out prompt asks for, at each guidance scale.

    Image (prompt i, seed k) is drawn from a generator seeded with (k, i) (:func:`ldm.seeding.keyed_generator`), so it starts
    from the same noise at every scale and in every call: with a deterministic sampler (DDIM, eta = 0) the same
    call twice gives the same numbers. Images have the pipeline's default height and width. The pipeline's own
    per-call progress bar is switched off (``pipe.set_progress_bar_config(disable=True)``, which stays set) and
    one bar counts the images of the whole evaluation.

    Args:
        pipe: A `LatentPipeline`, or anything called as ``pipe(prompts, guidance_scale=, num_inference_steps=,
            generator=[one per image], output_type="pil")`` that returns an object with ``.images`` and has
            ``set_progress_bar_config``.
        prompts: Held-out rows with ``prompt``, ``shape``, ``color`` and ``position`` (:func:`load_heldout_prompts`).
        guidance_scales: Classifier-free guidance scales s to compare; s <= 1 runs the conditional branch only.
        seeds: Non-negative seeds; every prompt is drawn once per seed.
        num_inference_steps: Denoising steps per image.
        batch_size: Images per pipeline call; it changes speed and memory, not which noise an image starts from.

    Returns:
        ``{"num_prompts", "seeds", "num_inference_steps", "scales"}`` where ``scales`` maps each guidance scale
        (a float, in the order given) to ``{"num_images", "correct", "accuracy", "samples"}``: ``correct`` counts
        and ``accuracy`` gives the fraction of images right in ``"shape"``, ``"color"``, ``"position"`` and
        ``"all"`` three; ``samples`` holds one record per image (``prompt_index``, ``prompt``, ``seed``,
        ``expected``, ``detected`` (values None where no shape was found) and ``correct``), seed-major.

    Raises:
        ValueError: On empty or repeated guidance scales or seeds, a negative seed, a bad prompt row or
            batch size; the pipeline's own checks reject a bad scale or step count before any model runs.
    """
    _check_evaluation_args(prompts, guidance_scales, seeds, batch_size)
    samples = [(i, seed) for seed in seeds for i in range(len(prompts))]
    pipe.set_progress_bar_config(disable=True)
    scales: dict[float, dict] = {}
    with tqdm(total=len(guidance_scales) * len(samples), desc="Prompt adherence", unit="img") as progress:
        for guidance_scale in guidance_scales:
            progress.set_postfix(guidance=guidance_scale)
            images = _generate(
                pipe, prompts, samples, guidance_scale, num_inference_steps, batch_size, progress
            )
            records = [
                _score(i, prompts[i], seed, image) for (i, seed), image in zip(samples, images, strict=True)
            ]
            correct = {key: sum(r["correct"][key] for r in records) for key in SCORES}
            scales[float(guidance_scale)] = {
                "num_images": len(records),
                "correct": correct,
                "accuracy": {key: count / len(records) for key, count in correct.items()},
                "samples": records,
            }
    return {
        "num_prompts": len(prompts),
        "seeds": list(seeds),
        "num_inference_steps": num_inference_steps,
        "scales": scales,
    }


def best_guidance(results: dict) -> float:
    """The guidance scale with the highest all-three accuracy.

    Ties go to the higher mean of the shape, colour and position accuracies, then to the smaller scale (which
    strays less from the model's conditional distribution and, at s <= 1, costs one UNet pass instead of two).
    """

    def rank(item: tuple[float, dict]) -> tuple[float, float, float]:
        scale, entry = item
        accuracy = entry["accuracy"]
        return accuracy["all"], sum(accuracy[key] for key in ATTRIBUTES) / len(ATTRIBUTES), -scale

    return max(results["scales"].items(), key=rank)[0]


def format_table(results: dict) -> str:
    """A plain-text table: one row per guidance scale, accuracy in percent for shape, color, position and all.

    The last line gives the number of images behind every row.
    """
    header = f"{'guidance':>8}" + "".join(f"{key:>10}" for key in SCORES)
    lines = [header, "-" * len(header)]
    for scale, entry in results["scales"].items():
        lines.append(f"{scale:>8g}" + "".join(f"{100 * entry['accuracy'][key]:>9.1f}%" for key in SCORES))
    num_images = next(iter(results["scales"].values()))["num_images"]
    lines.append(
        f"{num_images} images per guidance scale ({results['num_prompts']} prompts x "
        f"{len(results['seeds'])} seeds, {results['num_inference_steps']} steps)"
    )
    return "\n".join(lines)


def accuracy_by_color(results: dict) -> dict[float, dict[str, dict[str, float]]]:
    """Per guidance scale and asked-for colour: the fraction of its images whose colour, and all three
    attributes, the detector reads as asked. {scale: {color: {"color": .., "all": .., "num_images": n}}}."""
    table: dict[float, dict[str, dict[str, float]]] = {}
    for scale, entry in results["scales"].items():
        groups: dict[str, list[dict]] = {}
        for record in entry["samples"]:
            groups.setdefault(record["expected"]["color"], []).append(record)
        table[scale] = {
            color: {
                "color": sum(r["correct"]["color"] for r in records) / len(records),
                "all": sum(r["correct"]["all"] for r in records) / len(records),
                "num_images": len(records),
            }
            for color, records in groups.items()
        }
    return table


def format_color_table(results: dict) -> str:
    """A plain-text table: one row per asked-for colour, colour and all-three accuracy at each guidance scale."""
    by_color = accuracy_by_color(results)
    scales = list(by_color)
    header = f"{'color':>8}" + "".join(
        f"{'color@' + format(s, 'g'):>11}{'all@' + format(s, 'g'):>10}" for s in scales
    )
    lines = [header, "-" * len(header)]
    for color in next(iter(by_color.values())):
        cells = "".join(
            f"{100 * by_color[s][color]['color']:>10.1f}%{100 * by_color[s][color]['all']:>9.1f}%"
            for s in scales
        )
        lines.append(f"{color:>8}" + cells)
    return "\n".join(lines)


def results_to_json(results: dict) -> dict:
    """The results as plain JSON types: ``scales`` becomes a list of entries, each with its ``guidance_scale``.

    JSON object keys are strings, so the float-keyed ``scales`` mapping turns into a list (in evaluation order);
    ``best_guidance_scale`` is added. ``json.dumps`` accepts the result as it is.
    """
    return {
        "num_prompts": results["num_prompts"],
        "seeds": list(results["seeds"]),
        "num_inference_steps": results["num_inference_steps"],
        "best_guidance_scale": best_guidance(results),
        "scales": [{"guidance_scale": scale, **entry} for scale, entry in results["scales"].items()],
    }


def adherence_grid(
    pipe,
    prompts: list[dict],
    guidance_scale: float,
    seed: int = 0,
    num_inference_steps: int = 25,
    cols: int | None = None,
    batch_size: int = 32,
) -> PIL.Image.Image:
    """A grid of one image per held-out prompt at one guidance scale, in prompt order (row-major).

    Image i starts from the same noise as the evaluation's image (prompt i, `seed`), so grids at two scales
    compare like for like.

    Args:
        pipe, prompts, num_inference_steps, batch_size: As for :func:`evaluate_adherence`.
        guidance_scale: The scale s to draw at.
        seed: A non-negative seed, as in :func:`evaluate_adherence`'s ``seeds``.
        cols: Images per grid row; by default ceil(sqrt(number of prompts)).

    Returns:
        An RGB image (see :func:`ldm.images.image_grid`).

    Raises:
        ValueError: As for :func:`evaluate_adherence`.
    """
    _check_evaluation_args(prompts, [guidance_scale], [seed], batch_size)
    pipe.set_progress_bar_config(disable=True)
    samples = [(i, seed) for i in range(len(prompts))]
    return image_grid(
        _generate(pipe, prompts, samples, guidance_scale, num_inference_steps, batch_size), cols
    )
