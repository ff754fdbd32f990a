"""`ldm-ui`: a local gradio app on the project's pipelines: sample, edit, upscale, and watch a run train.

    ldm-ui --model outputs/demo/ldm [--models_dir outputs] [--runs_dir outputs] [--host 127.0.0.1] [--port 7860]

One tab per pipeline (text to image, image to image, inpainting with a mask painted in the browser, ControlNet,
the x4 upscaler, few-step LCM sampling), a PNG-info tab that restores the settings of a dropped PNG, and a Training
tab that follows a run folder while it trains. Every control maps onto ldm/ui/engine.py, which does the work and
raises the pipeline's own message for anything it refuses; the page shows that message and the app keeps running.

Safe by default: it listens on 127.0.0.1, makes no public link unless `--share`, sends no analytics, and reads or
serves files only under the folders it was given (models, runs, and the outputs folder it writes).
"""

from __future__ import annotations

import argparse
import inspect
import os

import numpy as np
import PIL.Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home

import gradio as gr  # noqa: E402

from ldm.schedulers import SCHEDULERS  # noqa: E402
from ldm.ui.engine import MAX_IMAGES, MAX_SEED, Engine, UIError, inside  # noqa: E402
from ldm.ui.infotext import Settings, format_parameters, parse_parameters, read_png_parameters  # noqa: E402
from ldm.ui.runs import run_choices, run_status  # noqa: E402

TAB_TITLES = {
    "txt2img": "Text to image",
    "img2img": "Image to image",
    "inpaint": "Inpaint",
    "controlnet": "ControlNet",
    "upscale": "Upscale x4",
    "lcm": "Few-step (LCM)",
}
# Per tab: (steps, guidance) defaults; diffusers' pipelines' own where they have one.
DEFAULTS = {
    "txt2img": (25, 7.5),
    "img2img": (25, 7.5),
    "inpaint": (25, 7.5),
    "controlnet": (25, 7.5),
    "upscale": (25, 9.0),
    "lcm": (4, 7.5),
}


def mask_from_editor(value: dict | None) -> tuple[PIL.Image.Image | None, PIL.Image.Image | None]:
    """(image, mask) from an ImageEditor value: the background, and white wherever any layer was painted."""
    if not value or value.get("background") is None:
        return None, None
    image = value["background"]
    mask = np.zeros((image.height, image.width), dtype=bool)
    for layer in value.get("layers") or []:
        if layer is not None:
            alpha = np.asarray(layer.convert("RGBA"))[..., 3]
            if alpha.shape != mask.shape:
                raise UIError(
                    f"The painted mask is {alpha.shape[1]}x{alpha.shape[0]}, the image {image.width}x{image.height}."
                )
            mask |= alpha > 0
    return image.convert("RGB"), PIL.Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")


class App:
    """The Blocks page over one Engine."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.tabs: dict[str, dict] = {}

    # ------------------------------------------------------------------ handlers (plain functions, testable)

    def load_model(self, label: str):
        try:
            message = self.engine.load(label)
        except UIError as err:
            raise gr.Error(str(err)) from err
        size = self.engine.default_size()
        updates = [message]
        for mode in TAB_TITLES:
            tab = self.tabs[mode]
            updates.append(gr.update(choices=[""] + self.engine.lora_choices(), value=""))
            if "width" in tab:
                updates += [gr.update(value=size), gr.update(value=size)]
        return updates

    def run_mode(self, mode: str, values: dict, progress: gr.Progress | None = None):
        """Generate for tab `mode` from its controls' values; returns (gallery items, parameters of the first)."""
        size = self.engine.default_size() if self.engine.pipe is not None else 64
        settings = Settings(
            prompt=values.get("prompt") or "",
            negative_prompt=values.get("negative") or "",
            steps=int(values["steps"]),
            sampler=values.get("sampler") or "ddim",
            guidance_scale=float(values["guidance"]),
            seed=int(values["seed"]),
            width=int(values.get("width") or size),
            height=int(values.get("height") or size),
            mode=mode,
            lora=values.get("lora") or "",
            lora_scale=float(values.get("lora_scale", 1.0)),
            strength=None if values.get("strength") is None else float(values["strength"]),
            control_scale=None if values.get("control_scale") is None else float(values["control_scale"]),
            controlnet=values.get("controlnet") or "",
            noise_level=None if values.get("noise_level") is None else int(values["noise_level"]),
            back_projection=(
                None if values.get("back_projection") is None else int(values["back_projection"])
            ),
        )
        image, mask = values.get("image"), None
        if mode == "inpaint":
            image, mask = mask_from_editor(values.get("editor"))

        def on_step(i: int, total: int) -> None:
            if progress is not None:
                progress((i, total), desc="denoising", unit="steps")

        try:
            results = self.engine.generate(
                settings,
                num_images=int(values.get("num_images", 1)),
                image=image,
                mask=mask,
                control_image=values.get("control_image"),
                canny=bool(values.get("canny")),
                on_step=on_step,
            )
        except UIError as err:
            raise gr.Error(str(err)) from err
        items = [(str(path), f"seed {own.seed}") for path, own in results]
        return items, format_parameters(results[0][1]), [str(path) for path, _ in results]

    def restore(self, file) -> list:
        """A dropped PNG's `parameters` -> the text, the tab to show, and the values for that tab's controls."""
        if file is None:
            return [gr.update()] * (2 + len(self.tabs["txt2img"]["restore"]))
        text = read_png_parameters(file)
        if not text:
            raise gr.Error("That image carries no generation settings (no 'parameters' text in the PNG).")
        try:
            settings = parse_parameters(text)
        except ValueError as err:
            raise gr.Error(str(err)) from err
        mode = settings.mode if settings.mode in ("txt2img", "lcm") else "txt2img"
        values = {
            "prompt": settings.prompt,
            "negative": settings.negative_prompt,
            "steps": settings.steps,
            "guidance": settings.guidance_scale,
            "sampler": settings.sampler if settings.sampler in SCHEDULERS else "ddim",
            "seed": settings.seed,
            "width": settings.width,
            "height": settings.height,
            "lora": settings.lora,
            "lora_scale": settings.lora_scale,
        }
        names = self.tabs["txt2img"]["restore"]
        return [text, gr.update(selected=mode)] + [values[name] for name in names]

    def training(self, run: str | None):
        """The Training tab's outputs for run folder `run` (relative to --runs_dir)."""
        import pandas as pd

        empty = pd.DataFrame({"step": [], "value": []})
        if not run or self.engine.runs_dir is None:
            return "Choose a run.", empty, empty, None, []
        try:
            folder = inside(self.engine.runs_dir, run)
        except UIError as err:
            raise gr.Error(str(err)) from err
        status = run_status(folder)
        loss = pd.DataFrame({"step": status.steps, "value": status.loss})
        lr = pd.DataFrame({"step": status.steps, "value": status.lr})
        grid = None if status.grid is None else PIL.Image.open(status.grid).convert("RGB")
        return status.summary(), loss, lr, grid, [[name, step] for name, step in status.checkpoints]

    # ------------------------------------------------------------------ layout

    def _controls(self, mode: str) -> dict:
        steps, guidance = DEFAULTS[mode]
        size = self.engine.default_size() if self.engine.pipe is not None else 64
        factor = self.engine.pipe.vae_scale_factor if self.engine.pipe is not None else 8
        c: dict = {}
        if mode == "img2img":
            c["image"] = gr.Image(type="pil", label="Input image", elem_id="img2img-image")
            c["strength"] = gr.Slider(0.01, 1, value=0.75, step=0.01, label="Denoising strength")
        if mode == "inpaint":
            c["editor"] = gr.ImageEditor(
                type="pil",
                label="Image: paint over what to repaint",
                brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                elem_id="inpaint-editor",
            )
            c["strength"] = gr.Slider(0.01, 1, value=1.0, step=0.01, label="Denoising strength")
        if mode == "controlnet":
            with gr.Row():
                c["controlnet"] = gr.Dropdown(
                    self.engine.controlnet_choices(), label="ControlNet", allow_custom_value=True
                )
                c["control_scale"] = gr.Slider(0, 2, value=1.0, step=0.05, label="Control scale")
            c["control_image"] = gr.Image(type="pil", label="Control image (or a photo, with Canny edges)")
            c["canny"] = gr.Checkbox(label="Canny edges: make the control from this photo's edges")
        if mode == "upscale":
            c["image"] = gr.Image(type="pil", label="Low-resolution image", elem_id="upscale-image")
            c["noise_level"] = gr.Slider(0, 350, value=20, step=1, label="Noise level")
            c["back_projection"] = gr.Slider(
                0,
                5,
                value=2,
                step=1,
                label="Back-projection rounds (0: as diffusers; 2: agrees with the input)",
            )
        if mode != "upscale":
            c["prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id=f"{mode}-prompt")
        else:
            c["prompt"] = gr.Textbox(label="Prompt (describes the image)", lines=1, elem_id=f"{mode}-prompt")
        c["negative"] = gr.Textbox(label="Negative prompt", lines=1)
        with gr.Row():
            c["steps"] = gr.Slider(1, 150, value=steps, step=1, label="Steps")
            c["guidance"] = gr.Slider(1, 20, value=guidance, step=0.5, label="Guidance (CFG scale)")
            sampler = "lcm" if mode == "lcm" else "ddim"
            c["sampler"] = gr.Dropdown(
                sorted(SCHEDULERS), value=sampler, label="Sampler", interactive=mode != "lcm"
            )
        with gr.Row():
            c["seed"] = gr.Number(-1, precision=0, minimum=-1, maximum=MAX_SEED, label="Seed (-1: random)")
            dice = gr.Button("Random seed", size="sm")
            dice.click(lambda: -1, None, c["seed"], queue=False, api_visibility="private")
            c["num_images"] = gr.Slider(
                1, MAX_IMAGES, value=1, step=1, label="Images", elem_id=f"{mode}-images"
            )
        if mode in ("txt2img", "controlnet", "lcm"):
            with gr.Row():
                c["width"] = gr.Slider(factor, 2048, value=size, step=factor, label="Width")
                c["height"] = gr.Slider(factor, 2048, value=size, step=factor, label="Height")
        if mode != "upscale":
            with gr.Row():
                c["lora"] = gr.Dropdown(
                    [""] + self.engine.lora_choices(),
                    value="",
                    allow_custom_value=True,
                    label="LoRA (a file in the model's folder or --models_dir, or a path under them)",
                )
                c["lora_scale"] = gr.Slider(0, 2, value=1.0, step=0.05, label="LoRA scale")
        return c

    def _tab(self, mode: str) -> dict:
        with gr.Row():
            with gr.Column(scale=1):
                controls = self._controls(mode)
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id=f"{mode}-generate")
                    stop = gr.Button("Stop", variant="stop", elem_id=f"{mode}-stop")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Results", format="png", columns=4, elem_id=f"{mode}-gallery")
                info = gr.Textbox(label="Parameters (saved in each PNG)", lines=3, elem_id=f"{mode}-info")
                with gr.Row():
                    to_img2img = gr.Button("Send to image to image", size="sm")
                    to_inpaint = gr.Button("Send to inpaint", size="sm")
        paths = gr.State([])
        names = list(controls)

        def handler(*values, progress=gr.Progress()):  # noqa: B008 - gradio's way to ask for a progress bar
            return self.run_mode(mode, dict(zip(names, values, strict=True)), progress)

        # Named parameters for the API page and gradio_client (prompt, negative, steps, ...), not param_0, param_1.
        handler.__signature__ = inspect.Signature(
            [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in names]
            + [inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=gr.Progress())]
        )

        event = go.click(
            handler, list(controls.values()), [gallery, info, paths], api_name=mode, concurrency_limit=1
        )
        stop.click(self.engine.stop, None, None, queue=False, api_name=f"{mode}_stop")
        selected = gr.State(0)

        def on_select(evt: gr.SelectData, paths):
            path = paths[evt.index] if paths and evt.index < len(paths) else None
            return evt.index, (read_png_parameters(path) if path else "")

        gallery.select(on_select, [paths], [selected, info], api_visibility="private")
        return {
            "controls": controls,
            "event": event,
            "paths": paths,
            "selected": selected,
            "send": (to_img2img, to_inpaint),
            **controls,
            "restore": [
                n
                for n in (
                    "prompt",
                    "negative",
                    "steps",
                    "guidance",
                    "sampler",
                    "seed",
                    "width",
                    "height",
                    "lora",
                    "lora_scale",
                )
                if n in controls
            ],
        }

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="ldm", analytics_enabled=False) as page:
            gr.Markdown("## ldm: latent diffusion, on your own models")
            with gr.Row():
                model = gr.Dropdown(
                    self.engine.model_choices(),
                    value=self.engine.model_name,
                    label="Model (pipeline folder)",
                    elem_id="model",
                )
                load = gr.Button("Load", elem_id="load")
            status = gr.Markdown(self.engine.describe(), elem_id="status")
            with gr.Tabs() as tabs:
                for mode, title in TAB_TITLES.items():
                    with gr.Tab(title, id=mode):
                        self.tabs[mode] = self._tab(mode)
                with gr.Tab("PNG info", id="pnginfo"):
                    dropped = gr.File(
                        label="Drop a PNG made here (or by AUTOMATIC1111)",
                        file_types=[".png"],
                        elem_id="pnginfo-file",
                    )
                    parameters = gr.Textbox(label="Parameters", lines=4, elem_id="pnginfo-text")
                with gr.Tab("Training", id="training"):
                    runs = run_choices(self.engine.runs_dir) if self.engine.runs_dir is not None else []
                    with gr.Row():
                        run = gr.Dropdown(
                            runs,
                            value=runs[0] if runs else None,
                            label="Run folder (under --runs_dir)",
                            allow_custom_value=True,
                            elem_id="run",
                        )
                        refresh = gr.Button("Refresh")
                    summary = gr.Markdown(elem_id="run-summary")
                    with gr.Row():
                        loss = gr.LinePlot(x="step", y="value", title="Loss", elem_id="loss-plot")
                        lr = gr.LinePlot(x="step", y="value", title="Learning rate", elem_id="lr-plot")
                    with gr.Row():
                        grid = gr.Image(
                            label="Latest validation grid", type="pil", height=320, elem_id="run-grid"
                        )
                        checkpoints = gr.Dataframe(headers=["checkpoint", "step"], label="Checkpoints")
                    timer = gr.Timer(2.0)

            outputs = [status]
            for mode in TAB_TITLES:
                outputs.append(self.tabs[mode]["lora"] if "lora" in self.tabs[mode] else gr.State())
                if "width" in self.tabs[mode]:
                    outputs += [self.tabs[mode]["width"], self.tabs[mode]["height"]]
            load.click(self.load_model, model, outputs, api_name="load_model")

            for mode in TAB_TITLES:
                tab = self.tabs[mode]
                to_img2img, to_inpaint = tab["send"]
                picked = [tab["paths"], tab["selected"], tab["prompt"], tab["negative"]]
                for button, target in ((to_img2img, "img2img"), (to_inpaint, "inpaint")):
                    dest = self.tabs[target]
                    image = dest["image"] if target == "img2img" else dest["editor"]
                    button.click(
                        self._sender(target),
                        picked,
                        [image, dest["prompt"], dest["negative"], tabs],
                        api_visibility="private",
                    )

            restore_to = [self.tabs["txt2img"][name] for name in self.tabs["txt2img"]["restore"]]
            dropped.upload(self.restore, dropped, [parameters, tabs, *restore_to], api_name="png_info")
            watch = [run]
            shown = [summary, loss, lr, grid, checkpoints]
            refresh.click(self.training, watch, shown, api_name="training")
            run.change(self.training, watch, shown, api_visibility="private")
            timer.tick(self.training, watch, shown, api_visibility="private", show_progress="hidden")
        return page

    def _picked(self, paths: list[str], index: int) -> PIL.Image.Image:
        if not paths:
            raise gr.Error("Generate an image first.")
        return PIL.Image.open(paths[min(index, len(paths) - 1)]).convert("RGB")

    def _sender(self, target: str):
        """The handler of a "Send to" button: the picked image (as an editor value for inpainting) and its prompts."""

        def send(paths, index, prompt, negative):
            image = self._picked(paths, index)
            value = image if target == "img2img" else {"background": image, "layers": [], "composite": image}
            return value, prompt, negative, gr.update(selected=target)

        return send


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm-ui", description="A local web app on ldm's pipelines.")
    parser.add_argument("--model", default=None, help="A pipeline folder to load first.")
    parser.add_argument(
        "--models_dir", default=None, help="A folder of pipeline, ControlNet and LoRA folders."
    )
    parser.add_argument("--runs_dir", default=None, help="A folder of training runs for the Training tab.")
    parser.add_argument(
        "--outputs_dir", default="outputs/ui", help="Where generated PNGs go (default outputs/ui)."
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1: this machine)."
    )
    parser.add_argument("--port", type=int, default=7860, help="Port (default 7860).")
    parser.add_argument(
        "--share", action="store_true", help="Also make a public gradio.live link (off by default)."
    )
    parser.add_argument(
        "--device", default=None, help="Torch device (default cuda when there is one, else cpu)."
    )
    return parser


def create(args: argparse.Namespace) -> tuple[Engine, gr.Blocks]:
    """The engine (with --model loaded) and the page."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine = Engine(args.model, args.models_dir, args.runs_dir, args.outputs_dir, device)
    if args.model is not None:
        engine.load(engine.model_choices()[0])
    return engine, App(engine).build()


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port}: must be 1-65535.")
    try:
        engine, page = create(args)
    except UIError as err:
        parser.error(str(err))
    print(f"ldm-ui: {engine.describe()}", flush=True)
    allowed = [str(engine.outputs_dir)]
    page.queue(default_concurrency_limit=1).launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        show_error=True,
        allowed_paths=allowed,
        footer_links=["api"],
    )


if __name__ == "__main__":
    main()
