"""TrainConfig: YAML + command-line loading, type checks, cross-field rules, save/load round trip."""

import dataclasses
import typing

import pytest
import yaml
from diffusers.optimization import SchedulerType

from ldm.training.config import LrScheduler, TrainConfig, load_config, save_config
from ldm.training.vae import VaeTrainConfig

REQUIRED = ["--pretrained_model_name_or_path", "some/model", "--dataset_name", "some/data"]


def valid_config(**overrides) -> TrainConfig:
    """A config that passes validation, with some fields replaced."""
    fields = {"pretrained_model_name_or_path": "some/model", "dataset_name": "some/data", **overrides}
    return TrainConfig(**fields)


def write_yaml(tmp_path, data: dict) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_yaml_then_command_line_overrides(tmp_path):
    path = write_yaml(
        tmp_path,
        {
            "pretrained_model_name_or_path": "some/model",
            "train_data_dir": "data",
            "learning_rate": 3e-4,
            "train_batch_size": 4,
            "adam_weight_decay": 0,  # an int is fine for a float field
            "validation_prompts": ["a cat", "a dog"],
        },
    )
    config = load_config(["--config", path, "--learning_rate", "1e-5", "--train_batch_size=8"])
    assert config.learning_rate == 1e-5
    assert config.train_batch_size == 8
    assert config.train_data_dir == "data"
    assert config.validation_prompts == ["a cat", "a dog"]
    assert config.adam_weight_decay == 0.0 and isinstance(config.adam_weight_decay, float)
    assert config.resolution == 512  # untouched default


def test_yaml_float_without_dot(tmp_path):
    # PyYAML reads `1e-4` as a string; float fields still accept it.
    path = tmp_path / "run.yaml"
    path.write_text("pretrained_model_name_or_path: m\ndataset_name: d\nlearning_rate: 1e-4\n")
    assert load_config(["--config", str(path)]).learning_rate == 1e-4


def test_bare_and_explicit_booleans():
    assert load_config([*REQUIRED, "--use_ema"]).use_ema is True
    assert load_config([*REQUIRED, "--use_ema", "false"]).use_ema is False
    assert load_config([*REQUIRED, "--cache_latents", "0"]).cache_latents is False
    assert load_config([*REQUIRED, "--random_flip=TRUE"]).random_flip is True
    # A bare flag followed by another flag must not swallow it.
    config = load_config([*REQUIRED, "--center_crop", "--random_flip"])
    assert config.center_crop and config.random_flip


def test_list_flag_takes_several_values():
    config = load_config([*REQUIRED, "--validation_prompts", "a cat", "a dog", "--seed", "3"])
    assert config.validation_prompts == ["a cat", "a dog"]
    assert config.seed == 3


def test_none_for_optional_fields(tmp_path):
    path = write_yaml(tmp_path, {"pretrained_model_name_or_path": "m", "dataset_name": "d", "seed": 7})
    config = load_config(["--config", path, "--seed", "none", "--mixed_precision", "null"])
    assert config.seed is None and config.mixed_precision is None
    # report_to is not optional: "none" is one of its choices, not None.
    assert load_config([*REQUIRED, "--report_to", "none"]).report_to == "none"


def test_literal_choices_are_checked():
    assert load_config([*REQUIRED, "--lr_scheduler", "cosine"]).lr_scheduler == "cosine"
    with pytest.raises(ValueError, match="'lr_scheduler'.*'warmup'.*'cosine_with_restarts'"):
        load_config([*REQUIRED, "--lr_scheduler", "warmup"])
    with pytest.raises(ValueError, match="mixed_precision"):
        load_config([*REQUIRED, "--mixed_precision", "fp8"])


def test_lr_scheduler_names_are_accepted_by_diffusers():
    assert set(typing.get_args(LrScheduler)) <= {member.value for member in SchedulerType}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--resolution", "1.5"], "'resolution'.*invalid int value: '1.5'"),
        (["--learning_rate", "fast"], "'learning_rate'.*invalid float value: 'fast'"),
        (["--use_ema", "maybe"], "'use_ema'.*got maybe.*true/false"),
        (["--seed", "x"], "'seed'.*invalid int or none value: 'x'"),
    ],
)
def test_wrong_type_on_command_line(argv, expected):
    with pytest.raises(ValueError, match=expected):
        load_config([*REQUIRED, *argv])


def test_wrong_type_in_yaml(tmp_path):
    path = write_yaml(
        tmp_path, {"pretrained_model_name_or_path": "m", "dataset_name": "d", "resolution": "512"}
    )
    with pytest.raises(ValueError, match="'resolution' expects int.*run.yaml"):
        load_config(["--config", path])
    path = write_yaml(tmp_path, {"pretrained_model_name_or_path": "m", "dataset_name": "d", "use_ema": 1})
    with pytest.raises(ValueError, match="'use_ema' expects bool"):
        load_config(["--config", path])


def test_list_fields_check_each_item_against_the_lists_type(tmp_path):
    from ldm.training.tiny_vae import TinyVaeTrainConfig

    base = {"pretrained_model_name_or_path": "m", "dataset_name": "d"}
    path = write_yaml(tmp_path, {**base, "num_decoder_blocks": [1, 1, 1, 0]})
    assert load_config(["--config", path], TinyVaeTrainConfig).num_decoder_blocks == [1, 1, 1, 0]
    path = write_yaml(tmp_path, {**base, "num_decoder_blocks": [1, "one"]})
    with pytest.raises(ValueError, match="'num_decoder_blocks' expects a non-empty list of int"):
        load_config(["--config", path], TinyVaeTrainConfig)
    path = write_yaml(tmp_path, {**base, "validation_prompts": ["a cat", 3]})
    with pytest.raises(ValueError, match="'validation_prompts' expects a non-empty list of str or none"):
        load_config(["--config", path])


def test_scalar_flag_rejects_several_values_and_bare_non_bool():
    with pytest.raises(ValueError, match="Unexpected value '512'.*exactly one value.*--validation_prompts"):
        load_config([*REQUIRED, "--resolution", "256", "512"])
    with pytest.raises(ValueError, match="'resolution'.*expected one argument"):
        load_config([*REQUIRED, "--resolution"])


def test_unknown_key_lists_valid_keys_and_suggests(tmp_path):
    with pytest.raises(ValueError) as error:
        load_config([*REQUIRED, "--lerning_rate", "1e-4"])
    message = str(error.value)
    assert "'lerning_rate'" in message and "Did you mean 'learning_rate'?" in message
    assert all(field.name in message for field in dataclasses.fields(TrainConfig))

    path = write_yaml(tmp_path, {"pretrained_model_name_or_path": "m", "dataset_name": "d", "use_emma": True})
    with pytest.raises(ValueError, match="'use_emma'.*Did you mean 'use_ema'"):
        load_config(["--config", path])


def test_hub_token_refused(tmp_path):
    with pytest.raises(ValueError, match="HF_TOKEN"):
        load_config([*REQUIRED, "--hub_token", "hf_secret"])
    path = write_yaml(tmp_path, {"hub_token": "hf_secret"})
    with pytest.raises(ValueError, match="login"):
        load_config(["--config", path])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pretrained_model_name_or_path": None}, "pretrained_model_name_or_path is required"),
        ({"train_data_dir": "data"}, "exactly one of dataset_name"),
        ({"dataset_name": None}, "exactly one of dataset_name"),
        ({"resolution": 0}, "positive multiple of 8"),
        ({"resolution": 100}, "positive multiple of 8"),
        ({"caption_dropout": 1.0}, r"caption_dropout.*\[0, 1\)"),
        ({"caption_dropout": -0.1}, r"caption_dropout.*\[0, 1\)"),
        ({"train_batch_size": 0}, "train_batch_size must be >= 1"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be >= 1"),
        ({"seed": -1}, "seed must be in"),
        ({"push_to_hub": True}, "push_to_hub needs hub_model_id"),
        ({"hub_push_checkpoints": True}, "hub_push_checkpoints needs push_to_hub"),
        ({"unet_preset": "huge"}, "unet_preset 'huge'"),
        ({"streaming": True}, "streaming=true.*set max_train_steps"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr needs --prediction_type v_prediction"),
        (
            {"rescale_betas_zero_snr": True, "prediction_type": "epsilon"},
            "needs --prediction_type v_prediction.*Got prediction_type='epsilon'",
        ),
        ({"max_train_steps": 0}, "max_train_steps must be >= 1; got 0"),
        ({"max_train_steps": -3}, "max_train_steps must be >= 1; got -3"),
        ({"checkpointing_steps": 0}, "checkpointing_steps must be >= 1; got 0"),
        ({"validation_steps": 0}, "validation_steps must be >= 1"),
        ({"validation_inference_steps": 0}, "validation_inference_steps must be >= 1"),
        ({"max_grad_norm": -1.0}, "max_grad_norm must be a finite number > 0; got -1.0"),
        ({"learning_rate": float("nan")}, "learning_rate must be a finite number > 0; got nan"),
        ({"learning_rate": float("inf")}, "learning_rate must be a finite number > 0; got inf"),
        ({"learning_rate": 0.0}, "learning_rate must be a finite number > 0"),
        ({"adam_beta2": 1.0}, r"adam_beta2 must be a finite number in \[0, 1\)"),
        ({"ema_decay": 1.5}, r"ema_decay must be a finite number in \(0, 1\)"),
        ({"snr_gamma": 0.0}, "snr_gamma must be a finite number > 0"),
        ({"noise_offset": float("nan")}, "noise_offset must be a finite number >= 0"),
        ({"checkpoints_total_limit": 0}, "checkpoints_total_limit must be >= 1"),
        (
            {"validation_guidance_scale": 1e30},
            r"validation_guidance_scale must be a finite number in \[0, 100\]",
        ),
        ({"lr_warmup_steps": -1}, "lr_warmup_steps must be >= 0"),
        ({"resolution": "512"}, "'resolution' expects int"),
    ],
)
def test_validation_rules(overrides, message):
    with pytest.raises(ValueError, match=message):
        valid_config(**overrides).validate()


def test_valid_config_passes():
    valid_config(
        push_to_hub=True, hub_model_id="me/model", hub_push_checkpoints=True, unet_preset="tiny"
    ).validate()


def test_rules_apply_to_command_line():
    with pytest.raises(ValueError, match="positive multiple of 8"):
        load_config([*REQUIRED, "--resolution", "100"])


def test_save_load_round_trip(tmp_path):
    config = valid_config(
        validation_prompts=["a cat", "ünïcode dog"],
        learning_rate=1e-8,
        mixed_precision="bf16",
        seed=1234,
        use_ema=True,
        max_train_steps=10,
    )
    path = tmp_path / "nested" / "config.yaml"
    save_config(config, path)
    assert load_config(["--config", str(path)]) == config


def test_vae_config_reads_yaml_and_flags_the_same_way(tmp_path):
    path = tmp_path / "vae.yaml"
    path.write_text("train_data_dir: data\nvae_preset: tiny\nresolution: 16\nlearning_rate: 2e-4\n")
    config = load_config(
        ["--config", str(path), "--use_discriminator", "--max_train_steps", "2000"], VaeTrainConfig
    )
    assert (config.train_data_dir, config.resolution, config.learning_rate) == ("data", 16, 2e-4)
    # The discriminator's defaults are filled in once it is switched on.
    assert config.use_discriminator and (config.disc_start_step, config.disc_weight_mode) == (
        1000,
        "adaptive",
    )
    with pytest.raises(ValueError, match="'vae_presett'.*Did you mean 'vae_preset'"):
        load_config(["--config", str(path), "--vae_presett", "tiny"], VaeTrainConfig)
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 2"):
        load_config(["--config", str(path), "--resolution", "15"], VaeTrainConfig)


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_config(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--{field.name}" in text for field in dataclasses.fields(TrainConfig))
