"""Hugging Face Hub uploads and model cards.

The token is never handled here: `huggingface_hub` reads it from `HF_TOKEN` or the saved `hf auth login` when
`token=None`, so no code path of ours can write it to disk or to a log.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCardData, constants, get_token


def model_card_text(
    repo_id: str | None = None,
    base_model: str | None = None,
    dataset: str | None = None,
    hyperparameters: dict[str, Any] | None = None,
    grid_image: str | None = None,
    validation_prompts: list[str] | None = None,
    base_description: str | None = None,
) -> str:
    """README.md text for a trained pipeline; every argument is optional, so it never fails for lack of one.

    Args:
        repo_id: The Hub repository or folder name, for the title and usage snippet.
        base_model: What the UNet was fine-tuned from, or the preset it was trained from.
        dataset: The training data (Hub name or local folder).
        hyperparameters: Key training settings, shown as a table.
        grid_image: Relative path of a sample grid inside the folder.
        validation_prompts: The prompts shown in the grid.
        base_description: Text shown for the base instead of `base_model` (which becomes card metadata when it
            is a Hub id, so it must be one).
    """
    is_hub_id = base_model is not None and base_model.count("/") == 1 and not Path(base_model).exists()
    card_data = ModelCardData(
        library_name="diffusers",
        license="creativeml-openrail-m" if is_hub_id and "stable-diffusion" in base_model else None,
        base_model=base_model if is_hub_id else None,
        tags=["text-to-image", "latent-diffusion", "diffusers", "ldm"],
        pipeline_tag="text-to-image",
    )
    name = repo_id or "this model"
    lines = [
        "---",
        card_data.to_yaml(),
        "---",
        "",
        f"# {name}",
        "",
        "A latent text-to-image diffusion model trained with `ldm` (`train/train_ldm.py`).",
        "",
        f"- **Base model:** {base_description or base_model or 'not recorded'}",
        f"- **Training data:** {dataset or 'not recorded'}",
        "",
    ]
    if grid_image:
        prompts = "; ".join(validation_prompts or [])
        lines += [
            "## Samples",
            "",
            f"![samples]({grid_image})",
            "",
            f"Prompts: {prompts}" if prompts else "",
            "",
        ]
    if hyperparameters:
        lines += ["## Training hyperparameters", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in hyperparameters.items()]
        lines.append("")
    lines += [
        "## Usage",
        "",
        "```python",
        "from ldm import LatentPipeline",
        "",
        f'pipe = LatentPipeline.from_pretrained("{repo_id or "path/to/folder"}")',
        'image = pipe("a photo of a cat", guidance_scale=7.5).images[0]',
        "```",
        "",
        "The folder is a standard Stable Diffusion layout, so `diffusers.StableDiffusionPipeline` loads it too.",
        "",
    ]
    return "\n".join(lines)


def check_hub_access(repo_id: str) -> None:
    """Before a run that will push to `repo_id`: not offline, a token, and the repository reachable (created if
    missing, as diffusers' training scripts do at start-up), so that a run never learns it cannot upload at its end.

    Raises:
        ValueError: naming what is missing and the fix (the token itself is never shown).
    """
    if constants.is_offline_mode():
        raise ValueError(
            "--push_to_hub, but HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or drop --push_to_hub "
            "(the output folder is complete without it: upload it later with `hf upload`)."
        )
    if get_token() is None:
        raise ValueError(
            "--push_to_hub needs a Hub token with write access: run `hf auth login` or set HF_TOKEN (never pass it "
            "as a flag or in the config)."
        )
    try:
        HfApi().create_repo(repo_id, exist_ok=True)
    except Exception as err:  # network, auth and permission errors alike: each is "cannot push"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"--push_to_hub: cannot create or reach {repo_id} on the Hub ({reason}); check the network, the "
            "token's write access and --hub_model_id, or drop --push_to_hub."
        ) from None


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    path_in_repo: str | None = None,
    commit_message: str | None = None,
    ignore_patterns: list[str] | None = None,
    private: bool | None = None,
    token: str | None = None,
    run_as_future: bool = False,
) -> Any | Future:
    """Create `repo_id` if needed and upload `folder` to it (in a background thread with `run_as_future`).

    Returns:
        The commit info, or a Future of it when `run_as_future` is true.
    """
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        path_in_repo=path_in_repo,
        commit_message=commit_message or f"Upload {Path(folder).name}",
        ignore_patterns=ignore_patterns,
        run_as_future=run_as_future,
    )


def upload_pipeline(
    pipe,
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    model_card: str | None = None,
) -> Any:
    """Save `pipe` to a temporary folder with a model card and upload it to `repo_id`."""
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp)
        Path(tmp, "README.md").write_text(model_card or model_card_text(repo_id=repo_id))
        return push_folder(
            tmp,
            repo_id,
            commit_message=commit_message or "Upload LatentPipeline",
            private=private,
            token=token,
        )
