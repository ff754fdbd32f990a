"""Prompt-adherence evaluation: scores from fake pipelines with known answers, and train/evaluate.py end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

from ldm.presets import build_pipeline
from ldm.shapes.adherence import (
    accuracy_by_color,
    adherence_grid,
    best_guidance,
    evaluate_adherence,
    format_color_table,
    format_table,
    load_heldout_prompts,
    plot_adherence,
    results_to_json,
)
from ldm.shapes.detector import detect
from ldm.shapes.synthetic import CAPTION_WORDS, COLORS, all_combinations, caption, generate_dataset, render
from ldm.tokenizer import write_clip_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 32
ATTRIBUTES_OF_CAPTION = {caption(*combo): combo for combo in all_combinations()}
# Every third combination: 10 of each shape, so exactly a third of the prompts ask for a circle.
PROMPTS = [
    {"prompt": caption(*combo), "shape": combo[0], "color": combo[1], "position": combo[2]}
    for combo in all_combinations()[::3]
]


def load_script():
    """train/evaluate.py as a module, so its main() runs in this process."""
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "train" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakePipe:
    """Stands in for LatentPipeline: draws `draw(shape, color, position, rng)` per prompt and records each call."""

    def __init__(self, draw):
        self.draw = draw
        self.calls: list[dict] = []
        self.progress_bar_config: dict | None = None

    def set_progress_bar_config(self, **kwargs):
        self.progress_bar_config = kwargs

    def __call__(self, prompt, guidance_scale, num_inference_steps, generator, output_type):
        self.calls.append(
            {
                "prompt": list(prompt),
                "guidance_scale": guidance_scale,
                "num_inference_steps": num_inference_steps,
                "output_type": output_type,
                "seeds": [g.initial_seed() for g in generator],
                "states": [g.get_state() for g in generator],
            }
        )
        images = [
            self.draw(*ATTRIBUTES_OF_CAPTION[p], np.random.default_rng(g.initial_seed()))
            for p, g in zip(prompt, generator, strict=True)
        ]
        return SimpleNamespace(images=images)


def draw_truth(shape, color, position, rng):
    return render(shape, color, position, RESOLUTION, rng)


def draw_blank(shape, color, position, rng):
    return PIL.Image.new("RGB", (RESOLUTION, RESOLUTION), "white")


def draw_circle(shape, color, position, rng):
    return render("circle", color, position, RESOLUTION, rng)


class FakeControlPipe(FakePipe):
    """Stands in for LatentControlNetPipeline: fills each control outline in the prompt's colour (red for "")."""

    def __init__(self):
        super().__init__(draw=None)

    def __call__(self, prompt, guidance_scale, num_inference_steps, generator, output_type, **control):
        self.calls.append({"prompt": list(prompt), "guidance_scale": guidance_scale, **control})
        images = []
        for text, outline in zip(prompt, control["image"], strict=True):
            line = np.asarray(outline)[..., 0] > 127
            # Our shapes are convex: a pixel is inside when outline pixels lie at or left and at or right of it.
            inside = (
                np.maximum.accumulate(line, axis=1) & np.maximum.accumulate(line[:, ::-1], axis=1)[:, ::-1]
            )
            color = COLORS[ATTRIBUTES_OF_CAPTION[text][1]] if text else COLORS["red"]
            images.append(PIL.Image.fromarray(np.where(inside[..., None], color, 255).astype(np.uint8)))
        return SimpleNamespace(images=images)


@pytest.fixture(scope="module")
def edges_prompts(tmp_path_factory):
    """Six held-out prompts of --conditioning edges data, each with a fresh outline and its mask."""
    root = tmp_path_factory.mktemp("edges")
    generate_dataset(root, num_images=1, resolution=RESOLUTION, num_heldout=6, seed=1, conditioning="edges")
    return load_heldout_prompts(root / "heldout_prompts.jsonl")


# ----------------------------------------------------------------------------------------------
# Scores from fakes with known answers
# ----------------------------------------------------------------------------------------------


def test_ground_truth_images_score_100_percent_at_every_scale():
    results = evaluate_adherence(FakePipe(draw_truth), PROMPTS)
    assert list(results["scales"]) == [1.0, 3.0, 7.5]
    for entry in results["scales"].values():
        assert entry["num_images"] == len(PROMPTS) * 3
        assert entry["accuracy"] == {"shape": 1.0, "color": 1.0, "position": 1.0, "all": 1.0}
        assert entry["correct"] == dict.fromkeys(("shape", "color", "position", "all"), len(PROMPTS) * 3)


def test_blank_images_score_zero_and_detect_nothing():
    results = evaluate_adherence(FakePipe(draw_blank), PROMPTS, seeds=(0,))
    for entry in results["scales"].values():
        assert entry["accuracy"] == {"shape": 0.0, "color": 0.0, "position": 0.0, "all": 0.0}
        assert all(
            s["detected"] == {"shape": None, "color": None, "position": None} for s in entry["samples"]
        )


def test_always_a_circle_scores_the_fraction_of_circle_prompts_on_shape():
    circle_fraction = sum(p["shape"] == "circle" for p in PROMPTS) / len(PROMPTS)
    assert circle_fraction == pytest.approx(1 / 3)
    results = evaluate_adherence(FakePipe(draw_circle), PROMPTS, guidance_scales=(1.0, 7.5), seeds=(0, 1))
    for entry in results["scales"].values():
        accuracy = entry["accuracy"]
        assert accuracy["shape"] == circle_fraction
        assert accuracy["all"] == circle_fraction
        assert accuracy["color"] == accuracy["position"] == 1.0
        for sample in entry["samples"]:
            assert sample["correct"]["shape"] == (sample["expected"]["shape"] == "circle")
            assert sample["detected"]["shape"] == "circle"


def test_accuracy_by_color_counts_each_asked_for_colour():
    def red_always(shape, color, position, rng):
        return render(shape, "red", position, RESOLUTION, rng)

    results = evaluate_adherence(FakePipe(red_always), PROMPTS, guidance_scales=(7.5,), seeds=(0,))
    by_color = accuracy_by_color(results)[7.5]
    assert by_color["red"] == {
        "color": 1.0,
        "all": 1.0,
        "num_images": sum(p["color"] == "red" for p in PROMPTS),
        "rgb": list(COLORS["red"]),  # the generator's solid interior, exactly
    }
    assert all(entry["color"] == 0.0 for color, entry in by_color.items() if color != "red")
    # Every prompt got red: the colour drawn is red's, whatever colour was asked for.
    assert all(entry["rgb"] == list(COLORS["red"]) for entry in by_color.values())
    lines = format_color_table(results).splitlines()
    assert "     red     100.0%    100.0%       220,30,30       220,30,30" in lines
    assert "   green       0.0%      0.0%       30,170,40       220,30,30" in lines


def test_the_plot_draws_each_attributes_accuracy_against_guidance(tmp_path):
    def red_circles(shape, color, position, rng):
        return render("circle", "red", position, RESOLUTION, rng)

    results = evaluate_adherence(FakePipe(red_circles), PROMPTS, guidance_scales=(7.5, 1.0), seeds=(0,))
    lines = plot_adherence(results, tmp_path / "adherence.png")
    share = {
        key: 100 * sum(p[key] == v for p in PROMPTS) / len(PROMPTS)
        for key, v in (("shape", "circle"), ("color", "red"))
    }
    for key in ("shape", "color"):
        assert [g for g, _ in lines[key]] == [1.0, 7.5]  # sorted by guidance
        assert [a for _, a in lines[key]] == pytest.approx([share[key]] * 2)
    assert lines["position"] == [(1.0, 100.0), (7.5, 100.0)]
    assert set(lines) == {"shape", "color", "position", "all"}
    assert PIL.Image.open(tmp_path / "adherence.png").size == (600, 400)


def test_best_guidance_table_and_json():
    scales = (1.0, 3.0)
    prompts = PROMPTS[::5]  # two of each shape
    results = evaluate_adherence(FakePipe(draw_circle), prompts, guidance_scales=scales, seeds=(0,))
    assert results["scales"][1.0]["accuracy"]["all"] == pytest.approx(1 / 3)
    results["scales"][3.0]["accuracy"]["all"] = 0.9  # make 3 the clear winner
    assert best_guidance(results) == 3.0
    results["scales"][3.0]["accuracy"]["all"] = results["scales"][1.0]["accuracy"]["all"]
    assert best_guidance(results) == 1.0  # a full tie goes to the smaller scale

    table = format_table(results)
    lines = table.splitlines()
    assert lines[0].split() == ["guidance", "shape", "color", "position", "all"]
    assert lines[2].split()[0] == "1" and lines[3].split()[0] == "3"
    assert lines[2].split()[1:] == ["33.3%", "100.0%", "100.0%", "33.3%"]
    assert "6 images per guidance scale (6 prompts x 1 seeds, 25 steps)" in table

    report = json.loads(json.dumps(results_to_json(results)))
    assert [entry["guidance_scale"] for entry in report["scales"]] == list(scales)
    assert report["best_guidance_scale"] == 1.0
    assert len(report["scales"][0]["samples"]) == 6


def test_masks_add_an_iou_column_to_the_base_table(edges_prompts):
    # Same shape and position as each mask, drawn from other jitter: overlapping, not identical.
    results = evaluate_adherence(
        FakePipe(draw_truth), edges_prompts, guidance_scales=(1.0, 3.0), seeds=(0, 1)
    )
    entry = results["scales"][1.0]
    ious = [sample["iou"] for sample in entry["samples"]]
    assert entry["iou"] == pytest.approx(sum(ious) / len(ious)) and 0.3 < min(ious) <= max(ious) < 1.0
    assert entry["accuracy"]["all"] == 1.0
    lines = format_table(results).splitlines()
    assert lines[0].split() == ["guidance", "shape", "color", "position", "all", "iou"]
    assert lines[2].split()[:5] == ["1", "100.0%", "100.0%", "100.0%", "100.0%"]
    assert float(lines[2].split()[5]) == pytest.approx(entry["iou"], abs=5e-4)
    report = json.loads(json.dumps(results_to_json(results)))
    assert report["scales"][0]["iou"] == entry["iou"] and "control_scales" not in report


def test_controlnet_evaluation_passes_each_prompts_outline_and_scores_iou(edges_prompts):
    pipe = FakeControlPipe()
    results = evaluate_adherence(
        pipe, edges_prompts, guidance_scales=(1.0, 3.0), seeds=(0, 1), control_scales=(0.5, 1.0), batch_size=4
    )
    assert list(results["scales"]) == [(1.0, 0.5), (1.0, 1.0), (3.0, 0.5), (3.0, 1.0)]
    assert results["control_scales"] == [0.5, 1.0] and results["guess_mode"] is False
    for entry in results["scales"].values():
        # The fake fills the outline it was given: exactly the prompt's mask, in the prompt's colour.
        assert entry["accuracy"] == {"shape": 1.0, "color": 1.0, "position": 1.0, "all": 1.0}
        assert entry["iou"] == 1.0 and entry["num_images"] == 12
    outlines = [np.asarray(PIL.Image.open(row["conditioning_image"]).convert("RGB")) for row in edges_prompts]
    texts = [row["prompt"] for row in edges_prompts] * 2  # seed-major
    assert [call["guidance_scale"] for call in pipe.calls] == [1.0] * 6 + [3.0] * 6
    assert [call["controlnet_conditioning_scale"] for call in pipe.calls] == ([0.5] * 3 + [1.0] * 3) * 2
    assert {call["guess_mode"] for call in pipe.calls} == {False}
    for k in range(0, len(pipe.calls), 3):  # the three calls of one setting
        calls = pipe.calls[k : k + 3]
        assert [t for call in calls for t in call["prompt"]] == texts
        sent = [np.asarray(image) for call in calls for image in call["image"]]
        assert all(np.array_equal(a, b) for a, b in zip(sent, outlines * 2, strict=True))

    lines = format_table(results).splitlines()
    assert lines[0].split() == ["guidance", "control", "shape", "color", "position", "all", "iou"]
    assert lines[3].split() == ["1", "1", "100.0%", "100.0%", "100.0%", "100.0%", "1.000"]
    assert "12 images per setting (6 prompts x 2 seeds, 25 steps)" in lines[-1]
    assert best_guidance(results) == (1.0, 0.5)  # all tied: the smaller scales
    report = json.loads(json.dumps(results_to_json(results)))
    assert [(e["guidance_scale"], e["control_scale"]) for e in report["scales"]] == list(results["scales"])
    assert (report["best_guidance_scale"], report["best_control_scale"]) == (1.0, 0.5)
    assert "color@3/0.5" in format_color_table(results).splitlines()[0]


def test_guess_mode_sends_empty_prompts_and_scores_shape_position_and_iou(edges_prompts):
    pipe = FakeControlPipe()
    results = evaluate_adherence(
        pipe, edges_prompts, guidance_scales=(4.0,), seeds=(0,), control_scales=(1.0,), guess_mode=True
    )
    assert {p for call in pipe.calls for p in call["prompt"]} == {""}
    assert {call["guess_mode"] for call in pipe.calls} == {True}
    assert {call["guidance_scale"] for call in pipe.calls} == {4.0}  # as given
    entry = results["scales"][(4.0, 1.0)]
    assert entry["accuracy"]["shape"] == entry["accuracy"]["position"] == entry["iou"] == 1.0
    lines = format_table(results).splitlines()
    assert lines[0].split() == ["guidance", "control", "shape", "position", "iou"]
    assert lines[2].split() == ["4", "1", "100.0%", "100.0%", "1.000"]
    assert "guess mode" in lines[-1]
    assert results_to_json(results)["guess_mode"] is True


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompts": PROMPTS[:2], "control_scales": (1.0,)}, "conditioning_image and a mask"),
        ({"guess_mode": True}, "guess_mode needs a ControlNet"),
        ({"control_scales": ()}, "control_scales is empty"),
        ({"control_scales": (1.0, 1.0)}, "distinct"),
        ({"control_scales": (-1.0,)}, ">= 0"),
        ("mixed", "all or none"),
    ],
)
def test_bad_control_arguments_fail_before_generating(edges_prompts, kwargs, message):
    pipe = FakeControlPipe()
    if kwargs == "mixed":
        kwargs = {"prompts": edges_prompts[:2] + PROMPTS[:2]}
    with pytest.raises(ValueError, match=message):
        evaluate_adherence(pipe, **{"prompts": edges_prompts, **kwargs})
    assert pipe.calls == []


def test_controlnet_grid_shows_outline_beside_sample(edges_prompts):
    grid = adherence_grid(FakeControlPipe(), edges_prompts[:4], guidance_scale=3.0, control_scale=1.0, cols=2)
    assert grid.size == (2 * 2 * RESOLUTION, 2 * RESOLUTION)
    cell = np.asarray(grid)[RESOLUTION:, 2 * RESOLUTION :]  # prompt 3: bottom right
    outline = np.asarray(PIL.Image.open(edges_prompts[3]["conditioning_image"]).convert("RGB"))
    assert np.array_equal(cell[:, :RESOLUTION], outline)
    assert detect(cell[:, RESOLUTION:])["shape"] == edges_prompts[3]["shape"]


def test_load_heldout_prompts_resolves_and_checks_image_paths(edges_prompts, tmp_path):
    folder = Path(edges_prompts[0]["mask"]).parents[2]
    assert edges_prompts[0]["mask"] == str(folder / "heldout" / "mask" / "000.png")
    row = json.loads((folder / "heldout_prompts.jsonl").read_text().splitlines()[0])
    path = tmp_path / "heldout_prompts.jsonl"
    path.write_text(json.dumps(row) + "\n")  # beside no heldout/ folder
    with pytest.raises(
        ValueError, match="line 1: its conditioning_image .* does not exist.*--conditioning edges"
    ):
        load_heldout_prompts(path)


# ----------------------------------------------------------------------------------------------
# What the pipeline is asked for
# ----------------------------------------------------------------------------------------------


def test_scales_generators_and_noise_passed_to_the_pipeline():
    pipe = FakePipe(draw_truth)
    prompts, seeds, scales = PROMPTS[:5], (0, 1), (1.0, 3.0, 7.5)
    results = evaluate_adherence(
        pipe, prompts, guidance_scales=scales, seeds=seeds, num_inference_steps=7, batch_size=4
    )
    assert pipe.progress_bar_config == {"disable": True}
    # 10 images per scale in batches of 4, 4 and 2.
    assert [call["guidance_scale"] for call in pipe.calls] == [s for s in scales for _ in range(3)]
    assert [len(call["prompt"]) for call in pipe.calls] == [4, 4, 2] * 3
    assert all(len(call["seeds"]) == len(call["prompt"]) for call in pipe.calls)
    assert {call["num_inference_steps"] for call in pipe.calls} == {7}
    assert {call["output_type"] for call in pipe.calls} == {"pil"}

    per_scale = [pipe.calls[3 * k : 3 * k + 3] for k in range(len(scales))]
    prompt_order = [[p for call in calls for p in call["prompt"]] for calls in per_scale]
    noise_seeds = [[s for call in calls for s in call["seeds"]] for calls in per_scale]
    # Seed-major order, the same prompts and the same noise at every scale, a different noise for every image.
    assert prompt_order[0] == [p["prompt"] for p in prompts] * len(seeds)
    assert prompt_order[0] == prompt_order[1] == prompt_order[2]
    assert noise_seeds[0] == noise_seeds[1] == noise_seeds[2]
    assert len(set(noise_seeds[0])) == len(prompts) * len(seeds)
    # Every generator arrives fresh, not advanced by an earlier draw.
    for call in pipe.calls:
        for seed, state in zip(call["seeds"], call["states"], strict=True):
            assert torch.equal(state, torch.Generator().manual_seed(seed).get_state())
    assert [(s["prompt_index"], s["seed"]) for s in results["scales"][3.0]["samples"]] == [
        (i, seed) for seed in seeds for i in range(len(prompts))
    ]

    # The grid draws prompt i at one scale from the evaluation's noise for (prompt i, seed).
    pipe.calls.clear()
    grid = adherence_grid(pipe, prompts, guidance_scale=3.0, seed=1, num_inference_steps=7, cols=5)
    assert grid.size == (5 * RESOLUTION, RESOLUTION)
    assert [s for call in pipe.calls for s in call["seeds"]] == noise_seeds[0][len(prompts) :]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"guidance_scales": (1.0, 1.0)}, "repeats"),
        ({"guidance_scales": ()}, "guidance_scales is empty"),
        ({"seeds": (-1,)}, "non-negative"),
        ({"batch_size": 0}, "batch_size"),
        (
            {"prompts": [{"prompt": "a red circle", "shape": "circle", "color": "pink", "position": "top"}]},
            "pink",
        ),
    ],
)
def test_bad_arguments_fail_before_generating(kwargs, message):
    pipe = FakePipe(draw_truth)
    with pytest.raises(ValueError, match=message):
        evaluate_adherence(pipe, **{"prompts": PROMPTS[:2], **kwargs})
    assert pipe.calls == []


# ----------------------------------------------------------------------------------------------
# Held-out prompt files
# ----------------------------------------------------------------------------------------------


def test_load_heldout_prompts_reads_the_generated_file(tmp_path):
    summary = generate_dataset(tmp_path, num_images=1, resolution=16, num_heldout=5)
    rows = load_heldout_prompts(summary["heldout_path"])
    assert len(rows) == 5
    assert all(row["prompt"] == caption(row["shape"], row["color"], row["position"]) for row in rows)


@pytest.mark.parametrize(
    "second_line, message",
    [
        ("{not json", "line 2: not valid JSON"),
        ('{"prompt": "a red circle", "shape": "circle", "color": "red"}', "line 2: missing key.*position"),
        ('{"prompt": "x", "shape": "hexagon", "color": "red", "position": "top"}', "line 2: shape 'hexagon'"),
        ('["a", "list"]', "line 2: expected a JSON object"),
    ],
)
def test_load_heldout_prompts_names_the_bad_line(tmp_path, second_line, message):
    path = tmp_path / "heldout_prompts.jsonl"
    path.write_text(json.dumps(PROMPTS[0]) + "\n" + second_line + "\n")
    with pytest.raises(ValueError, match=message) as info:
        load_heldout_prompts(path)
    assert str(path) in str(info.value)


def test_load_heldout_prompts_rejects_an_empty_file(tmp_path):
    path = tmp_path / "heldout_prompts.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_heldout_prompts(path)


# ----------------------------------------------------------------------------------------------
# A real tiny pipeline
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved random tiny pipeline whose tokenizer knows every caption word, a random ControlNet copied from its
    UNet, and 4 held-out prompts without (data/) and with (edges/) outlines and masks."""
    from diffusers import ControlNetModel

    root = tmp_path_factory.mktemp("evaluate")
    tokenizer = write_clip_tokenizer(CAPTION_WORDS, root / "tokenizer")
    pipe = build_pipeline("tiny", tokenizer, seed=0)
    pipe.save_pretrained(root / "pipe")
    # The tiny VAE downsamples 2x, so the control image embedding downsamples once.
    ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 16)).save_pretrained(
        root / "controlnet"
    )
    generate_dataset(root / "data", num_images=1, resolution=16, num_heldout=4)
    generate_dataset(root / "edges", num_images=1, resolution=16, num_heldout=4, conditioning="edges")
    return root


def test_real_pipeline_evaluation_is_deterministic(world):
    from ldm.pipelines.text_to_image import LatentPipeline

    pipe = LatentPipeline.from_pretrained(world / "pipe")
    prompts = load_heldout_prompts(world / "data" / "heldout_prompts.jsonl")[:3]
    run = lambda: evaluate_adherence(pipe, prompts, (1.0, 3.0), seeds=(0,), num_inference_steps=2)  # noqa: E731
    assert run() == run()


def test_script_writes_report_table_and_grids(world, tmp_path, capsys):
    out_dir = tmp_path / "eval"
    report = load_script().main(
        [
            "--model", str(world / "pipe"), "--prompts", str(world / "data" / "heldout_prompts.jsonl"),
            "--guidance_scales", "1", "3", "7.5", "--seeds", "0", "1", "--steps", "2",
            "--out_dir", str(out_dir), "--device", "cpu",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert {p.name for p in out_dir.iterdir()} == {
        "adherence.json",
        "adherence.txt",
        "adherence.png",
        "adherence_by_color.txt",
        "grid.png",
        "grid_g1.png",
    }

    written = json.loads((out_dir / "adherence.json").read_text())
    assert written == report
    assert [entry["guidance_scale"] for entry in written["scales"]] == [1.0, 3.0, 7.5]
    assert all(entry["num_images"] == 8 and len(entry["samples"]) == 8 for entry in written["scales"])
    assert written["best_guidance_scale"] in (1.0, 3.0, 7.5)

    table = (out_dir / "adherence.txt").read_text()
    assert table.strip() in printed
    assert "best guidance scale" in printed
    assert len(table.splitlines()) == 2 + 3 + 1
    # 4 prompts of 16 px in a 2 x 2 grid.
    for name in ("grid.png", "grid_g1.png"):
        assert PIL.Image.open(out_dir / name).size == (32, 32)


def test_script_reports_the_base_models_iou_when_prompts_have_masks(world, tmp_path):
    out_dir = tmp_path / "eval"
    report = load_script().main(
        [
            "--model", str(world / "pipe"), "--prompts", str(world / "edges" / "heldout_prompts.jsonl"),
            "--guidance_scales", "1", "--seeds", "0", "--steps", "2", "--out_dir", str(out_dir), "--device", "cpu",
        ]
    )  # fmt: skip
    assert (out_dir / "adherence.txt").read_text().splitlines()[0].split()[-1] == "iou"
    assert 0.0 <= report["scales"][0]["iou"] <= 1.0


@pytest.mark.parametrize("guess_mode", [False, True])
def test_script_evaluates_a_controlnet(world, tmp_path, capsys, guess_mode):
    out_dir = tmp_path / "eval"
    report = load_script().main(
        [
            "--model", str(world / "pipe"), "--controlnet", str(world / "controlnet"),
            "--prompts", str(world / "edges" / "heldout_prompts.jsonl"),
            "--guidance_scales", "1", "3", "--control_scales", "0.5", "1", "--seeds", "0", "--steps", "2",
            "--out_dir", str(out_dir), "--device", "cpu", *(["--guess_mode"] if guess_mode else []),
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert {p.name for p in out_dir.iterdir()} == {
        "adherence.json",
        "adherence.txt",
        "adherence.png",
        "grid.png",
        "grid_g1.png",
    } | (set() if guess_mode else {"adherence_by_color.txt"})
    assert report == json.loads((out_dir / "adherence.json").read_text())
    assert report["guess_mode"] is guess_mode and report["control_scales"] == [0.5, 1.0]
    assert [(e["guidance_scale"], e["control_scale"]) for e in report["scales"]] == [
        (1.0, 0.5), (1.0, 1.0), (3.0, 0.5), (3.0, 1.0)
    ]  # fmt: skip
    assert all(e["num_images"] == 4 and 0.0 <= e["iou"] <= 1.0 for e in report["scales"])
    header = (out_dir / "adherence.txt").read_text().splitlines()[0].split()
    scores = ["shape", "position"] if guess_mode else ["shape", "color", "position", "all"]
    assert header == ["guidance", "control", *scores, "iou"]
    assert f"control scale {report['best_control_scale']:g}" in printed
    # 4 prompts of 16 px, each cell outline | sample, in a 2 x 2 grid.
    for name in ("grid.png", "grid_g1.png"):
        assert PIL.Image.open(out_dir / name).size == (64, 32)


def test_script_control_flags_need_a_controlnet(world, tmp_path):
    with pytest.raises(SystemExit):
        load_script().parse_args(["--model", "m", "--prompts", "p", "--out_dir", "o", "--guess_mode"])
