"""Time to quality: what a training recipe has learned after so many wall seconds, on the shapes demo and on a real
image set, each recipe run in turn on the same machine.

    python benchmarks/time_to_quality.py [--datasets shapes emoji] [--budget_s 1200] [--eval_every 250]
        [--demo_dir outputs/demo] [--emoji_dir outputs/emoji] [--baseline_commit b14f73c]
        [--diffusers_script PATH/TO/diffusers/examples/text_to_image/train_text_to_image.py]
        [--variant NAME="FLAGS"] ... [--variants_only] [--out_dir outputs/time_to_quality]

Every recipe trains from one saved base per dataset: the dataset's VAE and text stack (`make demo`'s
`outputs/demo/base`; `outputs/emoji/base` as README's real-image-set section builds it) plus one randomly
initialised `small` UNet (seed 0), so all recipes start from the same weights (a recipe whose config or flags name
another `--unet_preset`, as the demo's config now does, builds its own, seeded by its `--seed`). A recipe is one
training launch, stopped when `--budget_s` wall seconds have passed since it started (start-up, model loading and
the latent cache count: a user waits for them too). The benchmark watches the output folder and notes the wall
second at which each `checkpoint-N` appeared (one every `--eval_every` steps); after the launch ends it samples each
checkpoint's UNet (the EMA weights when EMA is on) with the base's VAE, text stack and DDIM scheduler, so recipes
differ only in the weights they trained, and evaluation never shares the CPU with training. A recipe that trains
another prediction type or zero terminal SNR (`--prediction_type v_prediction --rescale_betas_zero_snr`) is sampled
with the schedule its own pipeline would save, and with guidance rescaled by 0.7 as its validation grids are.

- shapes (`make demo`'s data): all-attribute adherence of the 30 held-out prompts x seeds 0, 1 at guidance 7.5 and
  25 DDIM steps (`ldm.shapes.adherence`), for `train_ldm.py --config configs/demo.yaml` as it is now ("HEAD") and
  as it was at `--baseline_commit` (a git worktree of that commit, its own code and config); the table gives the
  wall time at which each recipe first reached 95 %.
- emoji (`python -m ldm.emoji.data`'s Twemoji set): top-1 / top-10 retrieval of one sample per caption
  (`ldm.emoji.retrieval`, beside the VAE's ceiling), for `train_ldm.py` with the issue's recipe (the demo's config
  with the base's `small` UNet, 2,000 steps of batch 64, lr 1e-3, no min-SNR), and for diffusers'
  `train_text_to_image.py` with the same base, data, steps, batch, learning rate, schedule, warm-up and EMA (it runs
  through `benchmarks/run_with_torchvision_stub.py`); the table gives each recipe's score at the budget.

`--variant NAME="FLAGS"` adds a `train_ldm.py` recipe with extra flags on every dataset run (one lever at a time:
`--variant lr2e-3="--learning_rate 2e-3"`); `--variants_only` leaves out the demo config as it is now, so that
only the variants run, beside whichever reference the command names (`--baseline_commit`, `--diffusers_script`).
Each recipe's
folder keeps its log, its timeline and its scores, and a finished recipe is not run again: delete its folder to
re-measure it. One PNG per dataset plots quality against wall minutes, one line per recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from train_throughput import BASE_PRESET, STUB_RUNNER, launcher, make_base  # noqa: E402

from ldm.training.checkpoint import CHECKPOINT_RE  # noqa: E402

TARGET_ADHERENCE = 0.95
HEAD = "train_ldm.py (HEAD)"
# The real image set's recipe is the (the demo's before the shapes search: the base's `small` UNet, batch 64,
# lr 1e-3, no min-SNR), the one diffusers' script is measured against with the same settings.
EMOJI_RECIPE = "--unet_preset none --train_batch_size 64 --learning_rate 1e-3 --snr_gamma none".split()
DIFFUSERS = "diffusers train_text_to_image.py"


@dataclass
class Recipe:
    """One training launch: its argv for an output folder, the environment it needs, and where a checkpoint keeps
    the UNet to sample."""

    name: str
    command: Callable[[Path], list[str]]
    unet_folder: Callable[[Path], Path]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Dataset:
    """A dataset's data folder, its saved base, and how a pipeline is scored on it ({metric: fraction})."""

    name: str
    data_dir: Path
    base: Path
    score: Callable[[object], dict[str, float]]
    metric: str  # the score plotted and compared
    recipes: list[Recipe] = field(default_factory=list)


def folder_name(recipe_name: str) -> str:
    """A recipe's folder: its name with every character outside [A-Za-z0-9._-] as '_'."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in recipe_name)


# ----------------------------------------------------------------------------------------------- training


def run_with_budget(
    command: list[str], out_dir: Path, budget_s: float, env: dict[str, str], poll_s: float = 1.0
):
    """Launch `command`, note when each `checkpoint-N` folder appears in `out_dir`, stop it at `budget_s`.

    Returns ``{"checkpoints": {N: wall seconds since launch}, "stopped_at_budget": bool, "returncode": int,
    "wall_s": float}``. The launch runs in its own process group (accelerate's workers stop with it); its output
    goes to `out_dir`/train.log. A launch that fails on its own before its first checkpoint raises with the end of
    that log; one that fails later (diffusers' script saving its final pipeline, say) keeps its checkpoints.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    seen: dict[int, float] = {}
    log_path = out_dir / "train.log"
    start = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **env},
            start_new_session=True,
        )
        stopped = False
        while True:
            now = time.monotonic() - start
            for path in out_dir.iterdir():
                match = CHECKPOINT_RE.match(path.name)
                if match and path.is_dir():
                    seen.setdefault(int(match.group(1)), round(now, 1))
            if process.poll() is not None:
                break
            if now >= budget_s:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                stopped = True
                break
            time.sleep(poll_s)
    if not stopped and process.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        if not seen:
            raise RuntimeError(f"{shlex.join(command)} failed (exit {process.returncode}):\n{tail}")
        print(
            f"  warning: exit {process.returncode} after checkpoints {sorted(seen)}; the end of {log_path}:\n{tail}"
        )
    return {
        "checkpoints": dict(sorted(seen.items())),
        "stopped_at_budget": stopped,
        "returncode": process.returncode,
        "wall_s": round(time.monotonic() - start, 1),
    }


def ldm_recipe(name: str, config: Path, flags: list[str], checkout: Path = ROOT) -> Recipe:
    """`train_ldm.py` of `checkout` with `config` and `flags`; a checkpoint's EMA UNet is in pipeline/unet. Each
    run builds its own latent cache (in its folder): the time that takes is part of its wall time."""
    script = checkout / "train" / "train_ldm.py"
    return Recipe(
        name,
        lambda out: [
            *launcher(),
            str(script),
            "--config",
            str(config),
            *base_unet_flags(config),
            *flags,
            "--output_dir",
            str(out),
            "--cache_dir",
            str(out / "cache"),
        ],  # fmt: skip
        lambda checkpoint: checkpoint / "pipeline" / "unet",
        # The checkout's own package first (the editable install points at this one).
        {} if checkout == ROOT else {"PYTHONPATH": str(checkout)},
    )


def base_unet_flags(config: Path) -> list[str]:
    """`--unet_preset none` (train the base's random UNet) for a config that builds the base's preset; none for
    another preset, which then builds its own random UNet, seeded by the run's seed."""
    preset = yaml.safe_load(config.read_text()).get("unet_preset")
    return ["--unet_preset", "none"] if preset == BASE_PRESET else []


def common_flags(dataset: Dataset, eval_every: int, max_train_steps: int | None) -> list[str]:
    """What every train_ldm.py recipe of a dataset shares: the base, data, checkpoint cadence; on emoji the recipe."""
    steps = [] if max_train_steps is None else [*EMOJI_RECIPE, "--max_train_steps", str(max_train_steps)]
    return [
        "--pretrained_model_name_or_path", str(dataset.base),
        "--train_data_dir", str(dataset.data_dir), "--checkpointing_steps", str(eval_every),
        "--checkpoints_total_limit", "none", "--validation_prompts", "none", "--report_to", "none", *steps,
    ]  # fmt: skip


def diffusers_recipe(script: Path, dataset: Dataset, eval_every: int, max_train_steps: int) -> Recipe:
    """diffusers' train_text_to_image.py with the demo config's batch, learning rate, schedule, warm-up and EMA."""
    return Recipe(
        DIFFUSERS,
        lambda out: [
            *launcher(),
            str(STUB_RUNNER),
            str(script),
            "--pretrained_model_name_or_path",
            str(dataset.base),
            "--train_data_dir",
            str(dataset.data_dir / "train"),
            "--resolution",
            "64",
            "--center_crop",
            "--train_batch_size",
            "64",
            "--max_train_steps",
            str(max_train_steps),
            "--learning_rate",
            "1e-3",
            "--lr_scheduler",
            "cosine",
            "--lr_warmup_steps",
            "100",
            "--use_ema",
            "--checkpointing_steps",
            str(eval_every),
            "--output_dir",
            str(out),
            "--report_to",
            "tensorboard",
            "--seed",
            "0",
            "--dataloader_num_workers",
            "0",
        ],  # fmt: skip
        lambda checkpoint: checkpoint / "unet_ema",
    )


# ----------------------------------------------------------------------------------------------- evaluation


def shapes_score(data_dir: Path) -> Callable[[object], dict[str, float]]:
    """All-attribute (and per-attribute) adherence at guidance 7.5, held-out prompts x seeds 0 and 1."""
    from ldm.shapes.adherence import evaluate_adherence, load_heldout_prompts

    prompts = load_heldout_prompts(data_dir / "heldout_prompts.jsonl")

    def score(pipe) -> dict[str, float]:
        results = evaluate_adherence(pipe, prompts, guidance_scales=(7.5,), seeds=(0, 1))
        return dict(results["scales"][7.5]["accuracy"])

    return score


def emoji_score(data_dir: Path) -> Callable[[object], dict[str, float]]:
    """Top-1 / top-10 retrieval of one sample per caption (seed 0, guidance 7.5, 25 DDIM steps)."""
    from ldm.emoji.retrieval import judge_pipeline

    return lambda pipe: judge_pipeline(pipe, data_dir)


class RescaledGuidance:
    """A pipeline called with guidance rescaled by 0.7, as train_ldm.py's validation samples a zero-terminal-SNR
    model (Lin et al. 2023, sec. 3.4); everything else is the pipeline's."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __call__(self, *args, **kwargs):
        return self.pipe(*args, guidance_rescale=0.7, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.pipe, name)

    def __setattr__(self, name: str, value) -> None:  # `pipe.unet = ...` swaps the pipeline's UNet
        if name == "pipe":
            object.__setattr__(self, name, value)
        else:
            setattr(self.pipe, name, value)


def with_run_schedule(pipe, run_dir: Path):
    """The base pipeline to sample a run's checkpoints with: as it is, or, for a run that trained another prediction
    type or zero terminal SNR (its saved config.yaml says), with the DDIM schedule that run's own pipeline saves."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from ldm.training.config import load_config
    from ldm.training.run import training_schedule

    config_path = run_dir / "config.yaml"
    saved = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    if saved.get("prediction_type") is None and not saved.get("rescale_betas_zero_snr"):
        return pipe
    config = load_config(["--config", str(config_path)])
    # As train_ldm.py builds it: the base's schedule read as DDPM's, the run's changes on top, then DDIM.
    base_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler = DDIMScheduler.from_config(training_schedule(base_schedule, config).config)
    return RescaledGuidance(pipe) if config.rescale_betas_zero_snr else pipe


def evaluate_run(dataset: Dataset, recipe: Recipe, run_dir: Path, timeline: dict) -> list[dict]:
    """One row per checkpoint reached within the budget: step, wall seconds and scores. The sampled pipeline is the
    base with the checkpoint's UNet swapped in; a checkpoint cut off mid-save by the budget is left out."""
    from diffusers import UNet2DConditionModel

    from ldm.pipelines.text_to_image import LatentPipeline

    pipe = with_run_schedule(LatentPipeline.from_pretrained(dataset.base), run_dir)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for step, wall_s in timeline["checkpoints"].items():
        folder = recipe.unet_folder(run_dir / f"checkpoint-{step}")
        try:
            pipe.unet = UNet2DConditionModel.from_pretrained(folder).eval()
        except (OSError, ValueError) as error:  # cut off mid-save when the budget stopped the run
            print(f"  {recipe.name}: checkpoint-{step} not loadable, left out ({error})")
            continue
        rows.append({"step": int(step), "wall_s": wall_s, **dataset.score(pipe)})
        print(
            f"  {recipe.name}: step {step} at {wall_s:.0f} s: {rows[-1][dataset.metric]:.1%} {dataset.metric}"
        )
    return rows


def run_recipe(dataset: Dataset, recipe: Recipe, out_dir: Path, budget_s: float) -> list[dict]:
    """Train (unless a finished timeline is on disk) and evaluate (unless scores are) one recipe; its scores."""
    run_dir = out_dir / dataset.name / folder_name(recipe.name)
    timeline_path, scores_path = run_dir / "timeline.json", run_dir / "scores.json"
    if scores_path.is_file():
        return json.loads(scores_path.read_text())["rows"]
    if not timeline_path.is_file():
        if run_dir.exists():
            sys.exit(f"{run_dir} holds an unfinished run: delete it to run {recipe.name!r} again.")
        print(f"[{dataset.name}] training {recipe.name} for at most {budget_s:.0f} s")
        timeline = run_with_budget(recipe.command(run_dir), run_dir, budget_s, recipe.env)
        if not timeline["checkpoints"]:
            sys.exit(f"{recipe.name} saved no checkpoint within {budget_s:.0f} s: lower --eval_every.")
        timeline["command"] = shlex.join(recipe.command(run_dir))
        timeline_path.write_text(json.dumps(timeline, indent=1))
    timeline = json.loads(timeline_path.read_text())
    timeline["checkpoints"] = {int(k): v for k, v in timeline["checkpoints"].items()}
    rows = evaluate_run(dataset, recipe, run_dir, timeline)
    scores_path.write_text(json.dumps({"recipe": recipe.name, "rows": rows}, indent=1))
    return rows


# ----------------------------------------------------------------------------------------------- report


def time_to(rows: list[dict], metric: str, target: float) -> float | None:
    """The wall seconds of the first checkpoint scoring at least `target` on `metric`, or None."""
    return next((row["wall_s"] for row in rows if row[metric] >= target), None)


def format_table(dataset: Dataset, results: dict[str, list[dict]], budget_s: float) -> str:
    """Markdown: every checkpoint of every recipe, then each recipe's score at the budget (and time to 95 % on
    shapes)."""
    shown = ["all", "shape", "color", "position"] if dataset.name == "shapes" else ["top1", "top10"]
    lines = [
        f"## {dataset.name}: {dataset.metric} against wall seconds (budget {budget_s:.0f} s a recipe)",
        "",
    ]
    lines += ["| recipe | step | wall s | " + " | ".join(shown) + " |", "|" + " --- |" * (3 + len(shown))]
    for name, rows in results.items():
        for row in rows:
            scores = " | ".join(f"{100 * row[key]:.1f} %" for key in shown)
            lines.append(f"| {name} | {row['step']} | {row['wall_s']:.0f} | {scores} |")
    lines += ["", f"| recipe | last step within budget | {dataset.metric} then |"]
    if dataset.name == "shapes":
        lines[-1] += f" wall s to {TARGET_ADHERENCE:.0%} |"
    lines.append("|" + " --- |" * (4 if dataset.name == "shapes" else 3))
    for name, rows in results.items():
        last = rows[-1] if rows else None
        line = f"| {name} | {last['step'] if last else '-'} | " + (
            f"{100 * last[dataset.metric]:.1f} % |" if last else "- |"
        )
        if dataset.name == "shapes":
            reached = time_to(rows, dataset.metric, TARGET_ADHERENCE)
            line += f" {reached:.0f} |" if reached is not None else " not reached |"
        lines.append(line)
    return "\n".join(lines)


def plot(dataset: Dataset, results: dict[str, list[dict]], path: Path) -> None:
    """Quality (%) against wall minutes, one line per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    for name, rows in results.items():
        axes.plot(
            [r["wall_s"] / 60 for r in rows], [100 * r[dataset.metric] for r in rows], marker="o", label=name
        )
    axes.set(xlabel="wall minutes since launch (2 CPU cores)", ylabel=f"{dataset.metric} (%)", ylim=(0, 102))
    axes.set_title(f"{dataset.name}: time to quality")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------- set-up


def baseline_checkout(commit: str, out_dir: Path) -> Path:
    """A detached git worktree of `commit` under `out_dir` (made once)."""
    path = out_dir / f"checkout-{commit}"
    if not path.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=ROOT, check=True)
    return path


def parse_variant(text: str) -> tuple[str, list[str]]:
    """NAME=FLAGS -> (NAME, [flags])."""
    name, sep, flags = text.partition("=")
    if not sep or not name or not flags.strip():
        raise argparse.ArgumentTypeError(f'--variant {text!r}: give NAME="--flag value ...".')
    return name, shlex.split(flags)


def reference_recipes(
    args: argparse.Namespace, dataset: Dataset, flags: list[str], out_dir: Path
) -> list[Recipe]:
    """What the variants are measured against: the demo's config now (unless --variants_only), and b14f73c's
    (shapes) or diffusers' train_text_to_image.py (emoji) when asked for."""
    recipes = [] if args.variants_only else [ldm_recipe(HEAD, ROOT / "configs" / "demo.yaml", flags)]
    if dataset.name == "shapes" and args.baseline_commit:
        checkout = baseline_checkout(args.baseline_commit, out_dir)
        recipes.append(
            ldm_recipe(
                f"train_ldm.py ({args.baseline_commit})", checkout / "configs" / "demo.yaml", flags, checkout
            )
        )
    if dataset.name == "emoji" and args.diffusers_script:
        recipes.append(
            diffusers_recipe(Path(args.diffusers_script), dataset, args.eval_every, args.emoji_steps)
        )
    return recipes


def build_datasets(args: argparse.Namespace, out_dir: Path) -> list[Dataset]:
    """The datasets asked for, each with its base (saved once) and its recipes."""
    datasets = []
    for name in args.datasets:
        source = Path(args.demo_dir if name == "shapes" else args.emoji_dir)
        base = out_dir / name / "base"
        if not (base / "model_index.json").is_file():
            make_base(source, base)
        data_dir = source / "data"
        dataset = Dataset(
            name,
            data_dir,
            base,
            shapes_score(data_dir) if name == "shapes" else emoji_score(data_dir),
            "all" if name == "shapes" else "top10",
        )
        steps = None if name == "shapes" else args.emoji_steps  # shapes: the demo config's own
        flags = common_flags(dataset, args.eval_every, steps)
        dataset.recipes += reference_recipes(args, dataset, flags, out_dir)
        for variant, extra in args.variant:
            dataset.recipes.append(ldm_recipe(variant, ROOT / "configs" / "demo.yaml", [*flags, *extra]))
        datasets.append(dataset)
    return datasets


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", choices=["shapes", "emoji"], default=["shapes", "emoji"])
    parser.add_argument("--budget_s", type=float, default=1200, help="wall seconds per recipe (default 1200)")
    parser.add_argument("--eval_every", type=int, default=250, help="steps between checkpoints (default 250)")
    parser.add_argument(
        "--emoji_steps", type=int, default=2000, help="max_train_steps on emoji (default 2000)"
    )
    parser.add_argument("--demo_dir", default=str(ROOT / "outputs" / "demo"), help="`make demo`'s folder")
    parser.add_argument("--emoji_dir", default=str(ROOT / "outputs" / "emoji"), help="with data/ and base/")
    parser.add_argument(
        "--baseline_commit", default=None, help="a commit whose demo recipe runs beside HEAD's"
    )
    parser.add_argument("--diffusers_script", default=None, help="diffusers' train_text_to_image.py (emoji)")
    parser.add_argument("--variant", type=parse_variant, action="append", default=[], metavar='NAME="FLAGS"')
    parser.add_argument(
        "--variants_only",
        action="store_true",
        help="leave out the demo config as it is now: the --variant recipes (a lever search), beside the "
        "--baseline_commit or --diffusers_script when given",
    )
    parser.add_argument("--out_dir", default=str(ROOT / "outputs" / "time_to_quality"))
    args = parser.parse_args(argv)
    if args.variants_only and not args.variant:
        parser.error("--variants_only runs the --variant recipes: give at least one --variant.")
    if args.budget_s <= 0 or args.eval_every < 1 or args.emoji_steps < 1:
        parser.error(
            f"--budget_s {args.budget_s}, --eval_every {args.eval_every}, --emoji_steps {args.emoji_steps}: "
            "give a positive budget and at least 1 step."
        )
    if args.diffusers_script and not Path(args.diffusers_script).is_file():
        parser.error(f"--diffusers_script {args.diffusers_script}: no such file.")
    for name in args.datasets:
        source = Path(args.demo_dir if name == "shapes" else args.emoji_dir)
        if not (source / "base").is_dir() or not (source / "data").is_dir():
            fix = (
                "run `make demo`" if name == "shapes" else "build it as README's real-image-set section says"
            )
            parser.error(f"{source} needs data/ and base/ for the {name} dataset: {fix}.")
    out_dir = Path(args.out_dir)
    report = {}
    for dataset in build_datasets(args, out_dir):
        results = {
            recipe.name: run_recipe(dataset, recipe, out_dir, args.budget_s) for recipe in dataset.recipes
        }
        table = format_table(dataset, results, args.budget_s)
        if dataset.name == "emoji":
            from ldm.emoji.retrieval import judge_ceiling
            from ldm.pipelines.text_to_image import LatentPipeline

            ceiling = judge_ceiling(LatentPipeline.from_pretrained(dataset.base).vae, dataset.data_dir)
            table += f"\n\n(judge's ceiling, the VAE's reconstructions: top-1 {ceiling['top1']:.1%}, top-10 {ceiling['top10']:.1%})"
        plot(dataset, results, out_dir / f"{dataset.name}.png")
        (out_dir / f"{dataset.name}.md").write_text(table + "\n")
        print(table + f"\n(plot: {out_dir / f'{dataset.name}.png'})\n")
        report[dataset.name] = results
    return report


if __name__ == "__main__":
    main()
