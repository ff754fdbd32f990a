"""ldm-ui: the settings text, the engine's rules, every tab through gradio_client against a launched `ldm-ui`, and a
person's path through the page in a real browser (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image

from ldm.presets import build_pipeline, build_upscale_pipeline
from ldm.training.loop import MetricsFile
from ldm.ui.app import mask_from_editor
from ldm.ui.engine import Engine, UIError, inside
from ldm.ui.infotext import Settings, format_parameters, parse_parameters, read_png_parameters, save_png
from ldm.ui.runs import read_metrics, run_status
from tests.training_helpers import free_port, launch

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# ----------------------------------------------------------------------------------------------
# The PNG settings text (AUTOMATIC1111's layout)
# ----------------------------------------------------------------------------------------------


def test_settings_round_trip_through_the_text():
    settings = Settings(
        prompt="a red circle, on the left",
        negative_prompt="blurry\nnoisy",
        steps=30,
        sampler="dpm++",
        guidance_scale=6.0,
        seed=1234,
        width=32,
        height=48,
        model="demo/ldm",
        mode="img2img",
        lora="cyan",
        lora_scale=0.8,
        strength=0.6,
        noise_level=20,
        back_projection=2,
        extra={"Note": 'says "hi", twice'},
    )
    text = format_parameters(settings)
    assert text.splitlines()[0] == "a red circle, on the left <lora:cyan:0.8>"
    assert "Steps: 30, Sampler: DPM++ 2M, CFG scale: 6, Seed: 1234, Size: 32x48" in text
    assert parse_parameters(text) == settings


def test_reads_automatic1111s_own_text():
    text = (
        "masterpiece, a cat <lora:film:0.7>\nNegative prompt: lowres, bad hands\n"
        "Steps: 20, Sampler: Euler, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x768, "
        'Model hash: 6ce0161689, Model: v1-5, Denoising strength: 0.45, Lora hashes: "film: 0a1b2c", Version: v1.10.1'
    )
    settings = parse_parameters(text)
    assert (settings.prompt, settings.negative_prompt) == ("masterpiece, a cat", "lowres, bad hands")
    assert (settings.lora, settings.lora_scale) == ("film", 0.7)
    assert (settings.steps, settings.sampler, settings.guidance_scale, settings.seed) == (
        20,
        "euler",
        7.0,
        42,
    )
    assert (settings.width, settings.height, settings.model, settings.strength) == (512, 768, "v1-5", 0.45)
    assert settings.extra == {
        "Schedule type": "Karras",
        "Model hash": "6ce0161689",
        "Lora hashes": "film: 0a1b2c",
        "Version": "v1.10.1",
    }
    # A prompt alone (no settings line) is a prompt.
    assert parse_parameters("just a prompt, with commas").prompt == "just a prompt, with commas"
    with pytest.raises(ValueError, match="Steps: 'many'"):
        parse_parameters("a cat\nSteps: many, Sampler: DDIM, Seed: 1")


def test_png_carries_its_parameters(tmp_path):
    settings = Settings(prompt="a blue square", seed=7)
    path = save_png(Image.new("RGB", (8, 8), "blue"), tmp_path / "x.png", settings)
    assert parse_parameters(read_png_parameters(path)) == settings
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    assert read_png_parameters(tmp_path / "plain.png") is None
    assert read_png_parameters(tmp_path / "photo.jpg") is None


def test_mask_from_editor_is_every_painted_pixel():
    image = Image.new("RGB", (16, 16), "red")
    layer = np.zeros((16, 16, 4), dtype=np.uint8)
    layer[4:8, 2:6] = (255, 255, 255, 255)
    picture, mask = mask_from_editor(
        {"background": image, "layers": [Image.fromarray(layer)], "composite": image}
    )
    assert picture.size == (16, 16)
    assert (np.asarray(mask) == 255).sum() == 16 and np.asarray(mask)[5, 3] == 255
    assert mask_from_editor(None) == (None, None)
    with pytest.raises(UIError, match="8x8"):
        mask_from_editor({"background": image, "layers": [Image.new("RGBA", (8, 8))]})


# ----------------------------------------------------------------------------------------------
# The models, LoRA, ControlNet, upscaler and finished run the app is given
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ui_world(tmp_path_factory, tokenizer_dir, lora_dir, world):
    """models/{tiny, upscaler, controlnet, loras/style.safetensors, loras/misfit.safetensors}, runs/tiny-run (a
    finished 6-step train_ldm.py run), an input photo."""
    root = tmp_path_factory.mktemp("ui")
    models = root / "models"
    pipe = build_pipeline("tiny", tokenizer_dir, seed=0)
    pipe.save_pretrained(models / "tiny")
    build_upscale_pipeline("tiny-x4", tokenizer_dir, seed=0).save_pretrained(models / "upscaler")
    torch.manual_seed(0)
    ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 16)).save_pretrained(
        models / "controlnet"
    )
    (models / "loras").mkdir()
    shutil.copy(lora_dir / "pytorch_lora_weights.safetensors", models / "loras" / "style.safetensors")
    # A LoRA for another UNet: rank-4 matrices of the wrong width for this one.
    from safetensors.torch import load_file, save_file

    misfit = {
        k: torch.zeros(v.shape[0] + 3, *v.shape[1:])
        for k, v in load_file(models / "loras" / "style.safetensors").items()
    }
    save_file(misfit, models / "loras" / "misfit.safetensors")
    (root / "runs").mkdir()
    launch(world, root / "runs" / "tiny-run", "--validation_prompts", "a red circle on the left")
    photo = np.full((16, 16, 3), 255, dtype=np.uint8)
    photo[4:12, 4:12] = (30, 170, 40)
    Image.fromarray(photo).save(root / "photo.png")
    return root


@pytest.fixture()
def engine(ui_world, tmp_path):
    return Engine(ui_world / "models" / "tiny", ui_world / "models", ui_world / "runs", tmp_path / "out")


def test_the_engine_offers_only_what_is_under_its_folders(engine, ui_world):
    assert engine.model_choices() == ["tiny", "upscaler"]
    assert engine.controlnet_choices() == ["controlnet"]
    engine.load("tiny")
    assert engine.lora_choices() == [
        "loras/misfit.safetensors",
        "loras/style.safetensors",
    ]  # not the model's weights
    for escape in ("../../etc", "/etc", "tiny/../../.."):
        with pytest.raises(UIError, match="not under"):
            engine._path_of(escape)
    with pytest.raises(UIError, match="not under"):
        engine._lora_path("../../../../etc/passwd")
    with pytest.raises(UIError, match="no .safetensors file"):
        engine._lora_path("loras")
    assert inside(ui_world, "models/tiny") == (ui_world / "models" / "tiny").resolve()
    with pytest.raises(UIError, match="no such folder"):
        Engine(ui_world / "nowhere")
    with pytest.raises(UIError, match="not a pipeline folder"):
        Engine(ui_world / "runs")
    with pytest.raises(UIError, match="--model DIR"):
        Engine()


def test_generate_saves_each_image_with_its_settings(engine):
    with pytest.raises(UIError, match="No model loaded"):
        engine.generate(Settings(prompt="a red circle"))
    engine.load("tiny")
    results = engine.generate(
        Settings(prompt="a red circle", steps=3, seed=10, width=16, height=32), num_images=2
    )
    assert [own.seed for _, own in results] == [10, 11]
    for path, own in results:
        assert Image.open(path).size == (16, 32)
        assert parse_parameters(read_png_parameters(path)) == own
        assert own.model == "tiny" and own.mode == "txt2img"
    # The same settings give the same image; seed -1 draws one and records it.
    again = engine.generate(Settings(prompt="a red circle", steps=3, seed=11, width=16, height=32))
    assert np.array_equal(np.asarray(Image.open(again[0][0])), np.asarray(Image.open(results[1][0])))
    ((path, drawn),) = engine.generate(Settings(prompt="a red circle", steps=2, seed=-1, width=16, height=16))
    assert drawn.seed >= 0 and f"Seed: {drawn.seed}" in read_png_parameters(path)


def test_stop_interrupts_the_pipeline_after_the_current_step(engine):
    engine.load("tiny")
    seen = []

    def on_step(i, total):
        seen.append((i, total))
        if i == 2:
            engine.stop()

    engine.generate(Settings(prompt="a red circle", steps=20, width=16, height=16), on_step=on_step)
    assert seen == [(1, 20), (2, 20)]  # the pipeline skipped steps 3-20
    seen.clear()
    engine.generate(Settings(prompt="a red circle", steps=4, width=16, height=16), on_step=on_step)
    assert len(seen) == 2  # a new run starts unstopped


def test_refusals_carry_the_pipelines_message(engine, ui_world):
    engine.load("tiny")
    photo = Image.open(ui_world / "photo.png")
    cases = [
        (Settings(prompt=" "), {}, "Enter a prompt"),
        (
            Settings(prompt="a cat", width=17, height=16),
            {},
            "multiple of the VAE scale factor",
        ),  # the tiny VAE halves the side
        (Settings(prompt="a cat", lora="loras/misfit.safetensors", width=16, height=16), {}, "misfit"),
        (Settings(prompt="a cat", mode="img2img", strength=0.5), {}, "needs an input image"),
        (
            Settings(prompt="a cat", mode="inpaint", strength=1.0),
            {"image": photo, "mask": Image.new("L", (16, 16))},
            "mask is empty",
        ),
        (
            Settings(prompt="a cat", mode="inpaint", strength=1.0),
            {"image": photo, "mask": Image.new("L", (8, 8), 255)},
            "mask",
        ),
        (Settings(prompt="a cat", mode="upscale", noise_level=20), {"image": photo}, "needs an x4 upscaler"),
        (
            Settings(prompt="a cat", mode="controlnet", controlnet="tiny", control_scale=1.0),
            {"control_image": photo},
            "not a ControlNetModel",
        ),
        (Settings(prompt="a cat", sampler="plms"), {}, "Unknown sampler"),
    ]
    for settings, kwargs, message in cases:
        with pytest.raises(UIError, match=message):
            engine.generate(settings, **kwargs)
    # After every refusal the engine still works, without the misfit LoRA.
    assert engine.lora is None
    assert len(engine.generate(Settings(prompt="a cat", steps=2, width=16, height=16))) == 1


# ----------------------------------------------------------------------------------------------
# The Training tab's reading of a run folder
# ----------------------------------------------------------------------------------------------


def test_metrics_keep_the_last_line_of_each_step_and_skip_torn_lines(tmp_path):
    path = tmp_path / MetricsFile.NAME
    rows = [
        {"step": 1, "time": 0.0, "loss": 0.9, "lr": 1e-3, "max_train_steps": 10},
        {"step": 2, "time": 1.0, "loss": 0.8, "lr": 1e-3, "max_train_steps": 10},
        {
            "step": 2,
            "time": 5.0,
            "loss": 0.7,
            "lr": 1e-3,
            "max_train_steps": 10,
        },  # resumed run repeats step 2
        {"step": 4, "time": 7.0, "loss": 0.6, "lr": 5e-4, "max_train_steps": 10, "samples_per_second": 12.5},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 0.9), (2, 0.7), (4, 0.6)]
    status = run_status(tmp_path)
    assert status.steps == [1, 2, 4] and status.lr == [1e-3, 1e-3, 5e-4]
    assert status.seconds_left == pytest.approx(7.0 / 3 * 6)  # 7 s from step 1 to 4, 6 steps to go
    assert "step 4 of 10" in status.summary() and "12.5 samples/s" in status.summary()


def test_a_finished_run_reads_complete(ui_world):
    status = run_status(ui_world / "runs" / "tiny-run")
    assert status.steps == list(range(1, 7)) and status.finished
    assert all(np.isfinite(status.loss)) and status.lr[0] > 0
    assert status.grid is not None and status.grid.name == "step-000006.png"
    assert [step for _, step in status.checkpoints] == [3, 6]
    assert "finished" in status.summary()


# ----------------------------------------------------------------------------------------------
# The app, launched as a user launches it
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(ui_world):
    """`ldm-ui` on 127.0.0.1 with the tiny world; yields its URL."""
    port = free_port()
    out = ui_world / "outputs"
    log = (ui_world / "server.log").open("w")
    cmd = [
        sys.executable, "-m", "ldm.ui.app", "--model", str(ui_world / "models" / "tiny"),
        "--models_dir", str(ui_world / "models"), "--runs_dir", str(ui_world / "runs"),
        "--outputs_dir", str(out), "--port", str(port),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ui_world)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(
                    "ldm-ui did not start:\n" + (ui_world / "server.log").read_text()[-3000:]
                ) from None
            time.sleep(0.5)
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False, download_files=False)


def _images(gallery) -> list[Path]:
    return [
        Path(item["image"]["path"] if isinstance(item["image"], dict) else item["image"]) for item in gallery
    ]


def _fetch(server, gallery_item) -> Image.Image:
    """An image the app serves, fetched over HTTP as the browser does."""
    image = gallery_item["image"]
    url = image.get("url") or f"{server}gradio_api/file={image['path']}"
    with urllib.request.urlopen(url, timeout=10) as response:
        import io

        return Image.open(io.BytesIO(response.read()))


def test_every_tab_through_the_api(server, client, ui_world):
    from gradio_client import handle_file

    photo = handle_file(str(ui_world / "photo.png"))
    common = {"negative": "", "steps": 3, "guidance": 7.5, "seed": 5, "num_images": 1}

    gallery, info = client.predict(prompt="a red circle", sampler="ddim", width=16, height=16, lora="", lora_scale=1.0,
                                   api_name="/txt2img", **{**common, "num_images": 2})  # fmt: skip
    assert len(gallery) == 2 and "Seed: 5" in info and "Mode: txt2img" in info
    first = _fetch(server, gallery[0])
    assert (
        first.size == (16, 16) and "Seed: 5" in first.info["parameters"]
    )  # the PNG served keeps its settings

    gallery, info = client.predict(image=photo, strength=0.5, prompt="a red circle", sampler="euler", lora="loras/style.safetensors",
                                   lora_scale=0.5, api_name="/img2img", **common)  # fmt: skip
    assert _fetch(server, gallery[0]).size == (16, 16)
    assert "<lora:style:0.5>" in info and "Denoising strength: 0.5" in info and "Sampler: Euler" in info

    layer = np.zeros((16, 16, 4), dtype=np.uint8)
    layer[2:8, 2:8] = 255
    Image.fromarray(layer).save(ui_world / "layer.png")
    editor = {"background": photo, "layers": [handle_file(str(ui_world / "layer.png"))], "composite": photo}
    gallery, info = client.predict(editor=editor, strength=1.0, prompt="a blue square", sampler="ddim", lora="",
                                   lora_scale=1.0, api_name="/inpaint", **common)  # fmt: skip
    assert _fetch(server, gallery[0]).size == (16, 16) and "Mode: inpaint" in info

    for canny in (False, True):
        gallery, info = client.predict(controlnet="controlnet", control_scale=0.7, control_image=photo, canny=canny,
                                       prompt="a red circle", sampler="ddim", width=16, height=16, lora="",
                                       lora_scale=1.0, api_name="/controlnet", **common)  # fmt: skip
        assert _fetch(server, gallery[0]).size == (16, 16) and "Control scale: 0.7" in info

    gallery, info = client.predict(prompt="a red circle", sampler="lcm", width=16, height=16, lora="", lora_scale=1.0,
                                   api_name="/lcm", **{**common, "steps": 2})  # fmt: skip
    assert "Sampler: LCM" in info and "Steps: 2" in info

    # The PNG-info tab restores a generated image's settings into the text-to-image tab.
    restored = client.predict(handle_file(str(_images(gallery)[0])), api_name="/png_info")
    assert restored[0] == info and list(restored[1:]) == [
        "a red circle",
        "",
        2,
        7.5,
        "lcm",
        5,
        16,
        16,
        "",
        1.0,
    ]

    status = client.predict("upscaler", api_name="/load_model")
    assert "x4 upscaler" in status[0]
    gallery, info = client.predict(
        image=photo, noise_level=30, back_projection=1, prompt="a red circle", api_name="/upscale", **common
    )
    assert _fetch(server, gallery[0]).size == (64, 64) and "Noise level: 30, Back projection: 1" in info
    assert "Loaded tiny" in client.predict("tiny", api_name="/load_model")[0]

    summary, loss, lr, grid, checkpoints = client.predict("tiny-run", api_name="/training")
    assert "step 6 of 6" in summary and "finished" in summary
    assert [row[0] for row in loss["data"]] == [1, 2, 3, 4, 5, 6]
    assert checkpoints["data"] == [["checkpoint-3", 3], ["checkpoint-6", 6]] and grid is not None


def test_bad_input_shows_the_message_and_the_app_keeps_running(server, client):
    from gradio_client.exceptions import AppError

    base = {"negative": "", "steps": 2, "guidance": 7.5, "seed": 1, "num_images": 1, "sampler": "ddim",
            "lora_scale": 1.0}  # fmt: skip
    bad = [
        ({"prompt": "", "width": 16, "height": 16, "lora": ""}, "Enter a prompt"),
        ({"prompt": "a cat", "width": 17, "height": 16, "lora": ""}, "multiple of the VAE scale factor"),
        ({"prompt": "a cat", "width": 16, "height": 16, "lora": "loras/misfit.safetensors"}, "misfit"),
        ({"prompt": "a cat", "width": 16, "height": 16, "lora": "../../../etc/passwd"}, "not under"),
    ]
    for values, message in bad:
        with pytest.raises(AppError, match=message):
            client.predict(api_name="/txt2img", **base, **values)
    with pytest.raises(AppError, match="not under"):
        client.predict("../..", api_name="/training")
    gallery, _ = client.predict(prompt="a cat", width=16, height=16, lora="", api_name="/txt2img", **base)
    assert len(gallery) == 1
    # Nothing outside the outputs folder is served: not the models, not the repository.
    for path in (Path(__file__), ROOT / "pyproject.toml"):
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{server}gradio_api/file={path}", timeout=5)


def test_stop_button_ends_a_long_run_early(server, client):
    job = client.submit(prompt="a cat", negative="", steps=150, guidance=7.5, sampler="ddim", seed=1, num_images=16,
                        width=16, height=16, lora="", lora_scale=1.0, api_name="/txt2img")  # fmt: skip
    time.sleep(1.0)
    client.predict(api_name="/txt2img_stop")
    gallery, info = job.result(timeout=120)
    assert len(gallery) == 16 and "Steps: 150" in info  # stopped images still come back


def test_the_app_listens_on_localhost_only(server):
    assert server.startswith("http://127.0.0.1:")
    from ldm.ui.app import build_parser

    args = build_parser().parse_args([])
    assert (args.host, args.share) == ("127.0.0.1", False)


# ----------------------------------------------------------------------------------------------
# A person in a real browser
# ----------------------------------------------------------------------------------------------


def paint_and_inpaint(page, canvas, shots: Path, attempts: int = 3) -> None:
    """Paint a stroke across the editor's image and press Inpaint until the result shows.

    On a loaded machine the editor may still be drawing the sent image when the stroke lands, and the stroke is
    lost with it: the app then refuses the empty mask (its error toast), and the stroke is painted again. Any other
    error fails at once.
    """
    result = page.locator("#inpaint-gallery img").first
    for attempt in range(attempts):
        time.sleep(1.0 + 2.0 * attempt)  # the editor draws the sent image
        box = canvas.bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(x - 40, y - 10)
        page.mouse.down()
        for k in range(20):
            page.mouse.move(x - 40 + 4 * k, y - 10 + k, steps=2)
        page.mouse.up()
        page.locator("#inpaint-generate").click()
        error = page.locator(".toast-body.error").last
        page.locator("#inpaint-gallery img, .toast-body.error").first.wait_for(timeout=90_000)
        if result.is_visible():
            return
        message = error.inner_text()
        page.screenshot(path=shots / f"inpaint-refused-{attempt}.png")
        assert "mask is empty" in message, f"inpainting failed: {message}"
        close = page.locator(".toast-body.error .toast-close").first
        if close.is_visible():
            close.click()
    raise AssertionError(f"the stroke never reached the mask in {attempts} attempts (screenshots in {shots})")


def test_browser_generate_inpaint_and_training(server, ui_world):
    assert CHROMIUM, "Debian's chromium is not installed: `make test` installs it (apt-get install chromium)."
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("LDM_UI_SCREENSHOTS", ui_world / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(server)

        # Type a prompt, press Generate, see a 16 px image and its settings.
        page.locator("#txt2img-prompt textarea").fill("a red circle on the left")
        page.locator("#txt2img-generate").click()
        image = page.locator("#txt2img-gallery img").first
        image.wait_for(timeout=60_000)
        size = page.evaluate("(el) => [el.naturalWidth, el.naturalHeight]", image.element_handle())
        assert size == [16, 16]
        info = page.locator("#txt2img-info textarea").input_value()
        assert info.startswith("a red circle on the left\n") and "Mode: txt2img" in info
        page.screenshot(path=shots / "txt2img.png")

        # Send it to inpainting, paint a stroke across it, inpaint (an unpainted mask is refused, so the stroke counts).
        page.get_by_role("button", name="Send to inpaint").first.click()
        canvas = page.locator("#inpaint-editor canvas").first
        canvas.wait_for(timeout=30_000)
        paint_and_inpaint(page, canvas, shots)
        assert "Mode: inpaint" in page.locator("#inpaint-info textarea").input_value()
        page.screenshot(path=shots / "inpaint.png")

        # The Training tab of the finished tiny run.
        page.get_by_role("tab", name="Training").click()
        page.get_by_text("step 6 of 6").wait_for(timeout=30_000)
        assert "finished" in page.locator("#run-summary").inner_text()
        page.screenshot(path=shots / "training.png")
        browser.close()
    assert {p.name for p in shots.glob("*.png")} >= {"txt2img.png", "inpaint.png", "training.png"}
