"""Prompt adherence of a text-to-image pipeline on the held-out prompts of the shapes dataset, per guidance scale.

Every held-out prompt names a shape, a colour and a position (:mod:`ldm.shapes.synthetic`). The pipeline draws one image
per (prompt, seed) at each guidance scale s, :func:`ldm.shapes.detector.detect` reads the three attributes back from the
pixels, and the score of a scale is the fraction of images whose shape, colour, position, or all three at once,
match the prompt. Image (prompt i, seed k) starts from the same noise x_T at every scale, so the scales are
compared on identical starting points and differ only in eps_hat = eps_uncond + s * (eps_cond - eps_uncond).

    results = evaluate_adherence(pipe, load_heldout_prompts("data/shapes/heldout_prompts.jsonl"))
    print(format_table(results))

Data written with ``--conditioning edges`` gives every prompt a fresh outline and its filled mask. Then every image
is also scored by IoU: :func:`ldm.shapes.detector.mask_iou` of the shape it shows against the prompt's mask (for a
plain text-to-image pipeline, the baseline: how often the model alone lands on that exact shape). With
``control_scales``, a ControlNet pipeline (:class:`ldm.pipelines.controlnet.LatentControlNetPipeline`) draws every
prompt with its outline as the control image, at every guidance scale x control scale; in guess mode the prompt is
empty and only shape, position and IoU can follow the outline. One outline per prompt serves every seed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
from tqdm.auto import tqdm

from ldm.images import image_grid
from ldm.seeding import keyed_generator
from ldm.shapes.detector import detect, drawn_color, mask_iou
from ldm.shapes.synthetic import COLORS, POSITIONS, SHAPES

ATTRIBUTES = ("shape", "color", "position")
SCORES = (*ATTRIBUTES, "all")
# What an outline alone can ask for: in guess mode the prompt is empty, so colour is left to chance.
GUESS_MODE_SCORES = ("shape", "position")
# Optional keys of a held-out row (``--conditioning edges`` data): image paths, relative to the file's folder.
CONDITIONING_KEYS = ("conditioning_image", "mask")
_VOCABULARIES = {"shape": SHAPES, "color": tuple(COLORS), "position": POSITIONS}

# A setting is a guidance scale, or a (guidance scale, control scale) pair in a ControlNet evaluation.
Setting = float | tuple[float, float]


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
    for key in CONDITIONING_KEYS:
        if key in row and (not isinstance(row[key], str) or not row[key]):
            return f"{key!r} must be an image path, got {row[key]!r}"
    return None


def load_heldout_prompts(path: str | Path) -> list[dict]:
    """Read the held-out prompts that :func:`ldm.shapes.synthetic.generate_dataset` writes.

    Args:
        path: A ``heldout_prompts.jsonl``: one JSON object per line with ``prompt``, ``shape``, ``color`` and
            ``position`` (the attributes the prompt asks for), and, in ``--conditioning edges`` data,
            ``conditioning_image`` and ``mask`` (image paths relative to the file's folder). Blank lines are
            skipped.

    Returns:
        The rows in file order, as dicts; ``conditioning_image`` and ``mask`` become paths joined to the file's
        folder, so rows from several files can be evaluated together.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: Naming the file and line, on a line that is not JSON, a row that lacks a key, holds an
            attribute outside the dataset's vocabulary or names an image file that does not exist, or a file with
            no prompts at all.
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
        for key in CONDITIONING_KEYS:
            if key in row:
                row[key] = str(path.parent / row[key])
                if not Path(row[key]).is_file():
                    raise ValueError(
                        f"{path}, line {line_number}: its {key} {row[key]} does not exist; regenerate the data "
                        "with `python -m ldm.shapes.synthetic ... --conditioning edges`."
                    )
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no prompts; regenerate it with num_heldout >= 1.")
    return rows


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Control:
    """What a ControlNet call adds to a text-to-image one: each prompt's outline, the control scale, guess mode."""

    images: list[PIL.Image.Image]
    scale: float
    guess_mode: bool

    def call_kwargs(self, prompt_indices: Sequence[int]) -> dict:
        """The ControlNet arguments of one pipeline call, in diffusers' names."""
        return {
            "image": [self.images[i] for i in prompt_indices],
            "controlnet_conditioning_scale": self.scale,
            "guess_mode": self.guess_mode,
        }


def generate_images(
    pipe,
    prompts: Sequence[dict],
    samples: Sequence[tuple[int, int]],
    guidance_scale: float,
    num_inference_steps: int,
    batch_size: int,
    progress: tqdm | None = None,
    control: _Control | None = None,
) -> list[PIL.Image.Image]:
    """One image per (prompt_index, seed) in `samples`, generated `batch_size` at a time."""
    images: list[PIL.Image.Image] = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        indices = [i for i, _ in batch]
        # Guess mode: the outline alone, as diffusers defines it (an empty prompt; guidance still applies).
        texts = ["" if control is not None and control.guess_mode else prompts[i]["prompt"] for i in indices]
        out = pipe(
            texts,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            # CPU generators keyed by (seed, prompt) alone: the same x_T at every guidance scale, on any device.
            generator=[keyed_generator(seed, i) for i, seed in batch],
            output_type="pil",
            **({} if control is None else control.call_kwargs(indices)),
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
    prompts: Sequence[dict],
    guidance_scales: Sequence[float],
    seeds: Sequence[int],
    batch_size: int,
    control_scales: Sequence[float] | None = None,
    guess_mode: bool = False,
) -> None:
    """Raise a ValueError naming the first bad argument of evaluate_adherence."""
    if not prompts:
        raise ValueError("prompts is empty; pass at least one held-out prompt (see load_heldout_prompts).")
    for index, row in enumerate(prompts):
        problem = _prompt_row_problem(row)
        if problem:
            raise ValueError(f"prompts[{index}]: {problem}.")
    with_mask = [index for index, row in enumerate(prompts) if "mask" in row]
    if with_mask and len(with_mask) != len(prompts):
        raise ValueError(
            f"{len(with_mask)} of {len(prompts)} prompts have a mask; IoU needs all or none, so evaluate prompt "
            "files written with the same --conditioning together."
        )
    if control_scales is not None:
        without = [index for index, row in enumerate(prompts) if not set(CONDITIONING_KEYS) <= set(row)]
        if without:
            raise ValueError(
                f"A ControlNet evaluation needs a conditioning_image and a mask for every prompt; prompts{without[:5]} "
                "lack them. Regenerate the data with `python -m ldm.shapes.synthetic ... --conditioning edges`."
            )
        if not control_scales:
            raise ValueError(
                "control_scales is empty; pass at least one, e.g. (1.0,), or None without a ControlNet."
            )
        if len(set(map(float, control_scales))) != len(control_scales) or min(control_scales) < 0:
            raise ValueError(f"control_scales {list(control_scales)} must be distinct and >= 0.")
    elif guess_mode:
        raise ValueError("guess_mode needs a ControlNet: pass control_scales (and a ControlNet pipeline).")
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


def _score(
    prompt_index: int, prompt: dict, seed: int, image: PIL.Image.Image, mask: PIL.Image.Image | None = None
) -> dict:
    """The per-sample record: what was asked, what the detector read, which attributes match, and the IoU."""
    detected = detect(image)
    correct = {key: detected[key] == prompt[key] for key in ATTRIBUTES}
    correct["all"] = all(correct.values())
    record = {
        "prompt_index": prompt_index,
        "prompt": prompt["prompt"],
        "seed": seed,
        "expected": {key: prompt[key] for key in ATTRIBUTES},
        "detected": detected,
        "correct": correct,
    }
    drawn = drawn_color(image)
    if drawn is not None:
        record["rgb"] = [round(float(v), 1) for v in drawn]
    if mask is not None:
        record["iou"] = mask_iou(image, mask)
    return record


def _load_images(prompts: Sequence[dict], key: str, mode: str) -> list[PIL.Image.Image] | None:
    """Every prompt's `key` image, read once in `mode`; None when the prompts have none."""
    if key not in prompts[0]:
        return None
    return [PIL.Image.open(row[key]).convert(mode) for row in prompts]


def _settings(guidance_scales: Sequence[float], control_scales: Sequence[float] | None) -> list[Setting]:
    """The evaluated settings in order: the guidance scales, or every (guidance, control) pair, guidance-major."""
    if control_scales is None:
        return [float(g) for g in guidance_scales]
    return [(float(g), float(c)) for g in guidance_scales for c in control_scales]


def _label(setting: Setting) -> str:
    """A setting as text: "3" for guidance 3, "3/0.5" for guidance 3 at control scale 0.5."""
    return format(setting, "g") if isinstance(setting, float) else "/".join(format(v, "g") for v in setting)


def evaluate_adherence(
    pipe,
    prompts: list[dict],
    guidance_scales: Sequence[float] = (1.0, 3.0, 7.5),
    seeds: Sequence[int] = (0, 1, 2),
    num_inference_steps: int = 25,
    batch_size: int = 32,
    control_scales: Sequence[float] | None = None,
    guess_mode: bool = False,
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
            ``set_progress_bar_config``. With ``control_scales``, a `LatentControlNetPipeline` (or anything that
            also takes diffusers' ``image=``, ``controlnet_conditioning_scale=`` and ``guess_mode=``).
        prompts: Held-out rows with ``prompt``, ``shape``, ``color`` and ``position`` (:func:`load_heldout_prompts`);
            when they have a ``mask`` (all or none of them), every image is also scored by IoU against it.
        guidance_scales: Classifier-free guidance scales s to compare; s <= 1 runs the conditional branch only.
        seeds: Non-negative seeds; every prompt is drawn once per seed.
        num_inference_steps: Denoising steps per image.
        batch_size: Images per pipeline call; it changes speed and memory, not which noise an image starts from.
        control_scales: ControlNet conditioning scales; None (default) for a text-to-image pipeline. When given,
            every prompt needs a ``conditioning_image`` (its outline, the control image for every seed) and a
            ``mask``, and every guidance scale is evaluated at every control scale.
        guess_mode: ControlNet guess mode: the prompt is empty, so the outline alone must carry the shape and
            position (colour is left to chance); the guidance scale is used as given (diffusers suggests 3-5).

    Returns:
        ``{"num_prompts", "seeds", "num_inference_steps", "scales"}`` where ``scales`` maps each guidance scale
        (a float, in the order given) to ``{"num_images", "correct", "accuracy", "samples"}``: ``correct`` counts
        and ``accuracy`` gives the fraction of images right in ``"shape"``, ``"color"``, ``"position"`` and
        ``"all"`` three; ``samples`` holds one record per image (``prompt_index``, ``prompt``, ``seed``,
        ``expected``, ``detected`` (values None where no shape was found) and ``correct``), seed-major. With
        masks, each entry also has ``"iou"``, the mean of its samples' ``"iou"``. With ``control_scales``,
        ``scales`` is keyed by ``(guidance_scale, control_scale)`` pairs, guidance-major, and the results also
        hold ``"control_scales"`` and ``"guess_mode"``.

    Raises:
        ValueError: On empty or repeated guidance scales, control scales or seeds, a negative seed, a bad prompt
            row or batch size, masks on only some prompts, ControlNet settings without outlines, or guess mode
            without control scales; the pipeline's own checks reject a bad scale or step count before any model
            runs. :func:`ldm.shapes.detector.mask_iou` rejects images of another size than the masks.
    """
    _check_evaluation_args(prompts, guidance_scales, seeds, batch_size, control_scales, guess_mode)
    samples = [(i, seed) for seed in seeds for i in range(len(prompts))]
    masks = _load_images(prompts, "mask", "L")
    outlines = _load_images(prompts, "conditioning_image", "RGB") if control_scales is not None else None
    settings = _settings(guidance_scales, control_scales)
    pipe.set_progress_bar_config(disable=True)
    scales: dict[Setting, dict] = {}
    with tqdm(total=len(settings) * len(samples), desc="Prompt adherence", unit="img") as progress:
        for setting in settings:
            progress.set_postfix(setting=_label(setting))
            guidance_scale, control = setting, None
            if outlines is not None:
                guidance_scale, control_scale = setting
                control = _Control(outlines, control_scale, guess_mode)
            images = generate_images(
                pipe, prompts, samples, guidance_scale, num_inference_steps, batch_size, progress, control
            )
            records = [
                _score(i, prompts[i], seed, image, None if masks is None else masks[i])
                for (i, seed), image in zip(samples, images, strict=True)
            ]
            correct = {key: sum(r["correct"][key] for r in records) for key in SCORES}
            entry = {
                "num_images": len(records),
                "correct": correct,
                "accuracy": {key: count / len(records) for key, count in correct.items()},
            }
            if masks is not None:
                entry["iou"] = sum(r["iou"] for r in records) / len(records)
            scales[setting] = {**entry, "samples": records}
    results = {
        "num_prompts": len(prompts),
        "seeds": list(seeds),
        "num_inference_steps": num_inference_steps,
        "scales": scales,
    }
    if control_scales is not None:
        results.update(control_scales=[float(c) for c in control_scales], guess_mode=guess_mode)
    return results


def _shown_scores(results: dict) -> tuple[str, ...]:
    """The accuracy columns of a table: shape and position in guess mode (no colour is asked), else all four."""
    return GUESS_MODE_SCORES if results.get("guess_mode") else SCORES


def best_guidance(results: dict) -> Setting:
    """The guidance scale (the (guidance, control) pair in a ControlNet evaluation) with the highest accuracy.

    Accuracy is all-three accuracy, or in guess mode the mean of shape and position accuracy. Ties go to the higher
    mean of the attributes asked for, then to the higher mean IoU (when scored), then to the smaller scales (which
    stray less from the model's conditional distribution and, at s <= 1, cost one UNet pass instead of two).
    """
    asked = GUESS_MODE_SCORES if results.get("guess_mode") else ATTRIBUTES

    def rank(item: tuple[Setting, dict]) -> tuple[float, ...]:
        setting, entry = item
        accuracy = entry["accuracy"]
        mean = sum(accuracy[key] for key in asked) / len(asked)
        first = mean if results.get("guess_mode") else accuracy["all"]
        smaller = (-setting,) if isinstance(setting, float) else tuple(-v for v in setting)
        return first, mean, entry.get("iou", 0.0), *smaller

    return max(results["scales"].items(), key=rank)[0]


def format_table(results: dict) -> str:
    """A plain-text table: one row per guidance scale, accuracy in percent for shape, color, position and all.

    With masks an ``iou`` column (mean IoU, 0-1) follows; a ControlNet evaluation adds a ``control`` column after
    ``guidance`` and, in guess mode, shows only shape and position accuracy. The last line gives the number of
    images behind every row.
    """
    scores = _shown_scores(results)
    control = "control_scales" in results
    with_iou = "iou" in next(iter(results["scales"].values()))
    header = (
        f"{'guidance':>8}"
        + (f"{'control':>9}" if control else "")
        + "".join(f"{key:>10}" for key in scores)
        + (f"{'iou':>8}" if with_iou else "")
    )
    lines = [header, "-" * len(header)]
    for setting, entry in results["scales"].items():
        guidance, *control_scale = setting if control else (setting,)
        lines.append(
            f"{guidance:>8g}"
            + "".join(f"{c:>9g}" for c in control_scale)
            + "".join(f"{100 * entry['accuracy'][key]:>9.1f}%" for key in scores)
            + (f"{entry['iou']:>8.3f}" if with_iou else "")
        )
    num_images = next(iter(results["scales"].values()))["num_images"]
    lines.append(
        f"{num_images} images per {'setting' if control else 'guidance scale'} ({results['num_prompts']} prompts x "
        f"{len(results['seeds'])} seeds, {results['num_inference_steps']} steps)"
        + (", guess mode (empty prompts)" if results.get("guess_mode") else "")
    )
    return "\n".join(lines)


def plot_adherence(results: dict, path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Accuracy (%) against guidance scale, one line per attribute asked for (and per control scale in a ControlNet
    evaluation), written as a PNG: the table of :func:`format_table` as a picture. Returns the lines drawn,
    {label: [(guidance, accuracy %), ...]}.

    Raises:
        ImportError: matplotlib is missing (``pip install matplotlib``, or ``ldm[plots]``).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    control = "control_scales" in results
    lines: dict[tuple[str, float | None], list[tuple[float, float]]] = {}
    for setting, entry in results["scales"].items():
        guidance, control_scale = setting if control else (setting, None)
        for key in _shown_scores(results):
            lines.setdefault((key, control_scale), []).append((guidance, 100 * entry["accuracy"][key]))
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    drawn = {}
    for (key, control_scale), points in lines.items():
        label = key if control_scale is None else f"{key}, control {control_scale:g}"
        drawn[label] = sorted(points)
        axes.plot([g for g, _ in drawn[label]], [a for _, a in drawn[label]], marker="o", label=label)
    axes.set(xlabel="guidance scale", ylabel="accuracy (%)", ylim=(0, 102), title="Prompt adherence")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return drawn


def accuracy_by_color(results: dict) -> dict[Setting, dict[str, dict[str, float]]]:
    """Per guidance scale (or setting) and asked-for colour: the fraction of its images whose colour, and all three
    attributes, the detector reads as asked, and the median colour drawn (the per-channel median of each image's
    interior RGB; None when no image showed a shape). {scale: {color: {"color", "all", "num_images", "rgb"}}}."""
    table: dict[Setting, dict[str, dict[str, float]]] = {}
    for scale, entry in results["scales"].items():
        groups: dict[str, list[dict]] = {}
        for record in entry["samples"]:
            groups.setdefault(record["expected"]["color"], []).append(record)
        table[scale] = {
            color: {
                "color": sum(r["correct"]["color"] for r in records) / len(records),
                "all": sum(r["correct"]["all"] for r in records) / len(records),
                "num_images": len(records),
                "rgb": _median_rgb(records),
            }
            for color, records in groups.items()
        }
    return table


def _median_rgb(records: Sequence[dict]) -> list[int] | None:
    """The per-channel median of the records' drawn colours, rounded; None when no record has one."""
    colors = [record["rgb"] for record in records if "rgb" in record]
    return [round(float(v)) for v in np.median(colors, axis=0)] if colors else None


def format_color_table(results: dict) -> str:
    """A plain-text table: one row per asked-for colour; colour and all-three accuracy at each guidance scale, then the
    median colour drawn at each scale beside the palette's."""
    by_color = accuracy_by_color(results)
    scales = list(by_color)
    header = (
        f"{'color':>8}"
        + "".join(f"{'color@' + _label(s):>11}{'all@' + _label(s):>10}" for s in scales)
        + f"{'palette':>16}"
        + "".join(f"{'drawn@' + _label(s):>16}" for s in scales)
    )
    lines = [header, "-" * len(header)]
    for color in next(iter(by_color.values())):
        cells = "".join(
            f"{100 * by_color[s][color]['color']:>10.1f}%{100 * by_color[s][color]['all']:>9.1f}%"
            for s in scales
        )
        rgbs = [COLORS.get(color)] + [by_color[s][color]["rgb"] for s in scales]
        cells += "".join(f"{'-' if rgb is None else ','.join(str(v) for v in rgb):>16}" for rgb in rgbs)
        lines.append(f"{color:>8}" + cells)
    return "\n".join(lines)


def results_to_json(results: dict) -> dict:
    """The results as plain JSON types: ``scales`` becomes a list of entries, each with its ``guidance_scale``.

    JSON object keys are strings, so the float-keyed ``scales`` mapping turns into a list (in evaluation order);
    ``best_guidance_scale`` is added. In a ControlNet evaluation every entry also has its ``control_scale``, and
    ``best_control_scale``, ``control_scales`` and ``guess_mode`` are added. ``json.dumps`` accepts the result as
    it is.
    """
    if "control_scales" not in results:
        return {
            "num_prompts": results["num_prompts"],
            "seeds": list(results["seeds"]),
            "num_inference_steps": results["num_inference_steps"],
            "best_guidance_scale": best_guidance(results),
            "scales": [{"guidance_scale": scale, **entry} for scale, entry in results["scales"].items()],
        }
    best_guidance_scale, best_control_scale = best_guidance(results)
    return {
        "num_prompts": results["num_prompts"],
        "seeds": list(results["seeds"]),
        "num_inference_steps": results["num_inference_steps"],
        "best_guidance_scale": best_guidance_scale,
        "best_control_scale": best_control_scale,
        "control_scales": list(results["control_scales"]),
        "guess_mode": results["guess_mode"],
        "scales": [
            {"guidance_scale": guidance, "control_scale": control, **entry}
            for (guidance, control), entry in results["scales"].items()
        ],
    }


def adherence_grid(
    pipe,
    prompts: list[dict],
    guidance_scale: float,
    seed: int = 0,
    num_inference_steps: int = 25,
    cols: int | None = None,
    batch_size: int = 32,
    control_scale: float | None = None,
    guess_mode: bool = False,
) -> PIL.Image.Image:
    """A grid of one image per held-out prompt at one guidance scale, in prompt order (row-major).

    Image i starts from the same noise as the evaluation's image (prompt i, `seed`), so grids at two scales
    compare like for like. With a ControlNet, every cell is the prompt's outline and the sample side by side.

    Args:
        pipe, prompts, num_inference_steps, batch_size, guess_mode: As for :func:`evaluate_adherence`.
        guidance_scale: The scale s to draw at.
        seed: A non-negative seed, as in :func:`evaluate_adherence`'s ``seeds``.
        cols: Cells per grid row; by default ceil(sqrt(number of prompts)).
        control_scale: The ControlNet conditioning scale to draw at; None (default) for a text-to-image pipeline.

    Returns:
        An RGB image (see :func:`ldm.images.image_grid`).

    Raises:
        ValueError: As for :func:`evaluate_adherence`.
    """
    control_scales = None if control_scale is None else [control_scale]
    _check_evaluation_args(prompts, [guidance_scale], [seed], batch_size, control_scales, guess_mode)
    pipe.set_progress_bar_config(disable=True)
    samples = [(i, seed) for i in range(len(prompts))]
    outlines = None if control_scale is None else _load_images(prompts, "conditioning_image", "RGB")
    control = None if outlines is None else _Control(outlines, control_scale, guess_mode)
    images = generate_images(
        pipe, prompts, samples, guidance_scale, num_inference_steps, batch_size, control=control
    )
    if outlines is not None:
        images = [
            image_grid([outline, image], cols=2) for outline, image in zip(outlines, images, strict=True)
        ]
    return image_grid(images, cols)
