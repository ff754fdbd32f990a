"""The floor of a training step: UNet forward + backward + AdamW on random latents, and its FLOPs.

    python benchmarks/unet_step.py [--batch_size 8] [--resolution 512]   # prints the GPU table on CUDA
    python benchmarks/unet_step.py --presets small small-narrow [--batch_size 32] [--rounds 3]   # CPU, preset against preset

`time_unet_step` is the bare step `train_throughput.py` compares the training scripts with. `gpu_report` times the
`sd15` UNet at 512 px (64x64x4 latents, 77 x 768 text) in fp32 and bf16 autocast, with PyTorch SDPA and xformers
attention, torch.compile off and on, and converts each to TFLOP/s (FLOPs of one step counted by
`torch.utils.flop_counter.FlopCounterMode`) and MFU against the GPU's dense bf16 peak. `preset_report` times the
bare step of each named preset's UNet on the CPU (its own latent size, the demo's 16 text tokens of 128 channels), the
presets in turn over several rounds so that a drifting machine slows all of them alike, and prints each one's
samples/s and FLOPs against the first's.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 tensor-core peaks in TFLOP/s (vendor datasheets, without sparsity); --peak_tflops overrides.
BF16_PEAK_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 PCIe": 756.0,
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "A10G": 70.0,
    "RTX 4090": 165.2,
}


def load_unet(preset: str, base: Path | None, cross_attention_dim: int) -> UNet2DConditionModel:
    """The base folder's UNet when it has one, else a random UNet of the preset."""
    from ldm.presets import build_unet

    if base is not None and (Path(base) / "unet").is_dir():
        return UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    torch.manual_seed(0)
    return build_unet(preset, cross_attention_dim=cross_attention_dim)


def step_inputs(unet, batch_size: int, latent_side: int, text_tokens: int, device) -> tuple:
    """Random (latents, timesteps, text) of training's shapes."""
    channels, width = unet.config.in_channels, unet.config.cross_attention_dim
    latents = torch.randn(batch_size, channels, latent_side, latent_side, device=device)
    timesteps = torch.randint(0, 1000, (batch_size,), device=device)
    text = torch.randn(batch_size, text_tokens, width, device=device)
    return latents, timesteps, text


def make_step(unet, optimizer, inputs, dtype: torch.dtype | None):
    """One training step: eps-prediction MSE on `inputs`, under autocast to `dtype` when given."""
    latents, timesteps, text = inputs
    device_type = latents.device.type

    def step() -> None:
        autocast = torch.autocast(device_type, dtype) if dtype is not None else contextlib.nullcontext()
        with autocast:
            pred = unet(latents, timesteps, encoder_hidden_states=text, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), latents)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def seconds_per_step(step, device, warmup: int = 3, steps: int = 10) -> float:
    """Mean wall seconds of `steps` steps after `warmup` (synchronised on CUDA)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def step_flops(step) -> int:
    """FLOPs of one step (forward, backward; the optimizer's elementwise work is not counted)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def time_unet_step(
    preset: str,
    base: Path | None,
    batch_size: int,
    latent_side: int,
    device: str = "cpu",
    text_tokens: int = 16,
    cross_attention_dim: int = 128,
    warmup: int = 5,
    steps: int = 20,
    repeats: int = 3,
) -> float:
    """Samples/s of the bare step on `base`'s UNet (or a random preset UNet), fp32: the best of `repeats` timings
    (a floor; the first steps of a process also pay for oneDNN's kernel selection)."""
    device = torch.device(device)
    unet = load_unet(preset, base, cross_attention_dim).to(device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    step = make_step(unet, optimizer, step_inputs(unet, batch_size, latent_side, text_tokens, device), None)
    return max(batch_size / seconds_per_step(step, device, warmup, steps) for _ in range(repeats))


def peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of the named GPU, when the table knows it."""
    matches = [peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name]
    return max(matches) if matches else None


def gpu_report(batch_size: int = 8, resolution: int = 512, peak: float | None = None) -> None:
    """Time the sd15 UNet on CUDA in every variant and print samples/s, TFLOP/s and MFU."""
    if not torch.cuda.is_available():
        print("no CUDA device: the sd15 GPU table needs one")
        return
    device = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = peak or peak_tflops(name)
    print(f"sd15 UNet, {resolution} px, batch {batch_size}, on {name} (bf16 peak {peak or '?'} TFLOP/s)")
    print(f"  {'dtype':<6}{'attention':<10}{'compile':<9}{'samples/s':>10}{'TFLOP/s':>9}{'MFU':>7}")
    for dtype_name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        for attention in ("sdpa", "xformers"):
            for compiled in (False, True):
                unet = load_unet("sd15", None, 768).to(device).train()
                if attention == "xformers":
                    try:
                        unet.enable_xformers_memory_efficient_attention()
                    except (ImportError, ModuleNotFoundError, ValueError) as err:
                        print(f"  {dtype_name:<6}{attention:<10}{'-':<9} skipped: {err}")
                        break
                optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
                inputs = step_inputs(unet, batch_size, resolution // 8, 77, device)
                flops = step_flops(make_step(unet, optimizer, inputs, dtype))
                if compiled:
                    unet = torch.compile(unet)
                seconds = seconds_per_step(make_step(unet, optimizer, inputs, dtype), device)
                tflops = flops / seconds / 1e12
                mfu = f"{100 * tflops / peak:6.1f}%" if peak else "     ?"
                label = "on" if compiled else "off"
                print(
                    f"  {dtype_name:<6}{attention:<10}{label:<9}{batch_size / seconds:>10.2f}{tflops:>9.1f}{mfu:>7}"
                )
                del unet, optimizer
                torch.cuda.empty_cache()


def preset_report(
    names: list[str], batch_size: int = 32, rounds: int = 3, warmup: int = 3, steps: int = 10
) -> dict[str, list[float]]:
    """Samples/s of each preset's bare fp32 step on the CPU, one timing per preset per round; prints the median of
    the rounds, GFLOP per step and both as ratios to the first preset. Returns the timings by preset."""
    device = torch.device("cpu")
    timed, flops = {}, {}
    for name in names:
        unet = load_unet(name, None, cross_attention_dim=128).train()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
        inputs = step_inputs(unet, batch_size, unet.config.sample_size, text_tokens=16, device=device)
        timed[name] = make_step(unet, optimizer, inputs, None)
        flops[name] = step_flops(timed[name])
    rates = {name: [] for name in names}
    for _ in range(rounds):
        for name, step in timed.items():
            rates[name].append(batch_size / seconds_per_step(step, device, warmup, steps))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    first = names[0]
    print(
        f"bare UNet step on the CPU, batch {batch_size}, median of {rounds} rounds ({torch.get_num_threads()} threads)"
    )
    print(f"  {'preset':<14}{'samples/s':>10}{'range':>16}{'GFLOP/step':>12}{'speed':>8}{'FLOPs':>8}")
    for name in names:
        low, high = min(rates[name]), max(rates[name])
        print(
            f"  {name:<14}{medians[name]:>10.1f}{f'{low:.1f}-{high:.1f}':>16}{flops[name] / 1e9:>12.2f}"
            f"{medians[name] / medians[first]:>7.2f}x{flops[name] / flops[first]:>7.2f}x"
        )
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument(
        "--presets", nargs="+", default=None, help="time these presets' UNets on the CPU instead"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of --presets, each preset once per round"
    )
    args = parser.parse_args(argv)
    if args.presets:
        preset_report(args.presets, args.batch_size, args.rounds)
    else:
        gpu_report(args.batch_size, args.resolution, args.peak_tflops)


if __name__ == "__main__":
    main()
