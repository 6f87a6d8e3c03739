"""ControlNet and depth-to-image at full size: parity of sdlite with diffusers / transformers, and the speed of a
guided ControlNet step. Run: nice -n 5 python benchmarks/control.py [--keep]   (needs `pip install -e .[reference]`;
7.5 minutes of CPU time: 17 minutes on a busy 2-core machine)

All weights are random (benchmarks/checkpoints.py's randomise: variance 1/fan_in, so activations keep their scale
through the depth of the networks, and the ControlNet's zero convolutions are not zero). Written under /tmp/sdbench
and deleted at the end (kept with --keep, and reused by the next run):

  control-sd1/, control-sd1.safetensors   an SD 1.5 ControlNet (diffusers' ControlNetModel.from_unet of the
                                          /tmp/sdbench/sd1 UNet: the official ControlNets' shape), as a diffusers
                                          folder and as a single file of control_model.* keys, fp32
  control-depth-unet/                     SD 2 depth's UNet: the SD 2.1 UNet config with 5 input channels
  control-dpt/                            DPT-Hybrid at its real size (the Intel/dpt-hybrid-midas config, as SD 2
                                          depth's depth_estimator/), a transformers folder

Parity, fp32: the ControlNet on a guided batch of 2 (64x64 latents, a 512x512 control image, one timestep), each
down residual and the mid residual; then the UNet with those residuals added (each system's UNet with its own
ControlNet's residuals), also as sdlite's loop runs it (runtime.running: packed convolutions). The depth UNet one
step on 64x64 latents and a depth channel; DPT's predicted depth of a 384x384 input. Beside each, for scale, how far
the reference is from itself: the same modules and inputs in channels-last memory (the same arithmetic summed in
another order: float rounding).

Speed: one guided ControlNet step (ControlNet, then the UNet with its residuals; batch 2, 512x512, fp32), sdlite
within runtime.running (as its pipeline runs a stage) and diffusers, alternating call by call, best of REPEATS.
"""
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import DPTConfig, DPTForDepthEstimation

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
import sdlite  # noqa: E402
from sdlite import runtime  # noqa: E402
from sdlite.checkpoint import build, read_state_dict  # noqa: E402
from sdlite.dpt import load_depth_estimator  # noqa: E402
from sdlite.formats.diffusers import read_config, read_json, weights_file  # noqa: E402
from sdlite.unet import UNet, UNetConfig  # noqa: E402
from checkpoints import FAMILIES, WHERE, folder, randomise  # noqa: E402
from make_controlnet import ldm_key as controlnet_ldm_key  # noqa: E402
from make_dpt import HYBRID_BACKBONE, SD2_PREPROCESSOR, write_folder  # noqa: E402
from parity import difference, fmt  # noqa: E402
from report import machine, table, write_section  # noqa: E402
from speed import seconds  # noqa: E402

CONTROLNET, CONTROLNET_FILE = WHERE / "control-sd1", WHERE / "control-sd1.safetensors"
DEPTH_UNET, DPT = WHERE / "control-depth-unet", WHERE / "control-dpt"
SIDE, TIMESTEP, REPEATS = 512, 500, 3
DPT_SIDE = 384
# Intel/dpt-hybrid-midas's config.json (SD 2 depth's depth_estimator/): a BiT ResNet of 3 + 4 + 9 bottleneck blocks
# (stem 64 wide, stages 256 .. 1024), a ViT-B/16 on its stride-16 features read at layers 2, 5, 8, 11, neck widths
# ResNet stage 1 and 2, ViT, ViT
DPT_HYBRID = dict(is_hybrid=True, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=3072, image_size=DPT_SIDE, patch_size=16, qkv_bias=True, readout_type="project",
                  backbone_config={**HYBRID_BACKBONE, "hidden_sizes": [256, 512, 1024, 2048], "embedding_size": 64,
                                   "num_groups": 32},
                  backbone_featmap_shape=[1, 1024, 24, 24], backbone_out_indices=[2, 5, 8, 11],
                  neck_hidden_sizes=[256, 512, 768, 768], reassemble_factors=[1, 1, 1, 0.5], fusion_hidden_size=256,
                  neck_ignore_stages=[0, 1])


# ---- the random checkpoints ----

def make_controlnet() -> None:
    """The SD 1.5 ControlNet in both layouts (the single file's keys are make_controlnet.py's mapping)."""
    if (WHERE / "control-sd1.done").exists():
        return
    net = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(folder("sd1") / "unet"),
                                    load_weights_from_unet=False).eval()
    randomise(net, seed=10)
    net.save_pretrained(CONTROLNET)
    hint_blocks = len(net.controlnet_cond_embedding.blocks)
    save_file({"control_model." + controlnet_ldm_key(k, net.config.layers_per_block, hint_blocks): v.contiguous()
               for k, v in net.state_dict().items()}, CONTROLNET_FILE)
    (WHERE / "control-sd1.done").touch()


def make_depth_unet() -> None:
    if (WHERE / "control-depth-unet.done").exists():
        return
    unet = UNet2DConditionModel(**FAMILIES["sd2"]["unet"], in_channels=5).eval()
    randomise(unet, seed=11)
    unet.save_pretrained(DEPTH_UNET)
    (WHERE / "control-depth-unet.done").touch()


def make_dpt() -> None:
    if (WHERE / "control-dpt.done").exists():
        return
    model = DPTForDepthEstimation(DPTConfig(**DPT_HYBRID)).eval()
    randomise(model, seed=12)
    write_folder(DPT, "transformers", json.loads(model.config.to_json_string()),
                 {k: v.contiguous() for k, v in model.state_dict().items()}, SD2_PREPROCESSOR | {"size": DPT_SIDE})
    (WHERE / "control-dpt.done").touch()


# ---- the inputs ----

def controlnet_inputs() -> dict[str, torch.Tensor]:
    """A guided batch: latents, text context, the control image in [0, 1] (the same for both halves, as the
    pipelines double it)."""
    g = torch.Generator().manual_seed(0)
    hint = torch.rand(1, 3, SIDE, SIDE, generator=g)
    return {"x": torch.randn(2, 4, SIDE // 8, SIDE // 8, generator=g),
            "context": torch.randn(2, 77, 768, generator=g), "hint": torch.cat([hint, hint])}


def depth_inputs() -> dict[str, torch.Tensor]:
    """Latents with a smooth depth channel in [-1, 1], SD 2's text context; DPT's 384x384 pixels (a smooth image
    normalised to [-1, 1], as the feature extractor's mean = std = 0.5 makes them)."""
    g = torch.Generator().manual_seed(1)
    smooth = lambda c, side: torch.nn.functional.interpolate(   # noqa: E731
        torch.rand(1, c, 12, 12, generator=g), size=(side, side), mode="bicubic").clamp(0, 1) * 2 - 1
    depth = smooth(1, SIDE // 8)
    return {"x": torch.cat([torch.randn(2, 4, SIDE // 8, SIDE // 8, generator=g), torch.cat([depth, depth])], 1),
            "context": torch.randn(2, 77, 1024, generator=g), "pixels": smooth(3, DPT_SIDE)}


def channels_last(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in x.items()}


def sdlite_unet(path: Path) -> UNet:
    """sdlite's UNet from a diffusers unet/ folder, its weights views of the file (as sdlite.load makes them)."""
    config = read_config(UNetConfig, read_json(path / "config.json"), path / "config.json")
    return build(UNet, config, read_state_dict(weights_file(path, "diffusion_pytorch_model"), torch.float32), path)


# ---- the outputs ----

def named(down, mid, unet_out) -> dict[str, torch.Tensor]:
    out = {f"down residual {i} ({r.shape[1]}x{r.shape[2]}x{r.shape[3]})": r for i, r in enumerate(down)}
    return out | {f"mid residual ({mid.shape[1]}x{mid.shape[2]}x{mid.shape[3]})": mid, "UNet with residuals": unet_out}


@torch.no_grad()
def reference_controlnet(memory_format=torch.contiguous_format) -> dict[str, torch.Tensor]:
    unet = UNet2DConditionModel.from_pretrained(folder("sd1") / "unet").eval().to(memory_format=memory_format)
    net = ControlNetModel.from_pretrained(CONTROLNET).eval().to(memory_format=memory_format)
    x = controlnet_inputs()
    x = channels_last(x) if memory_format == torch.channels_last else x
    down, mid = net(x["x"], TIMESTEP, x["context"], x["hint"], return_dict=False)
    out = unet(x["x"], TIMESTEP, x["context"], down_block_additional_residuals=down,
               mid_block_additional_residual=mid).sample
    return named(down, mid, out)


@torch.no_grad()
def sdlite_controlnet(unet: UNet, path: Path, as_in_the_loop: bool) -> dict[str, torch.Tensor]:
    net = sdlite.load_controlnet(path)
    x = controlnet_inputs()
    down, mid = net(x["x"], TIMESTEP, x["context"], x["hint"])
    out = named(down, mid, unet(x["x"], TIMESTEP, x["context"], down, mid))
    if as_in_the_loop:
        with runtime.running(unet), runtime.running(net):
            down, mid = net(x["x"], TIMESTEP, x["context"], x["hint"])
            out["UNet with residuals, as in the loop"] = unet(x["x"], TIMESTEP, x["context"], down, mid)
    return out


@torch.no_grad()
def reference_depth(memory_format=torch.contiguous_format) -> dict[str, torch.Tensor]:
    x = depth_inputs()
    x = channels_last(x) if memory_format == torch.channels_last else x
    unet = UNet2DConditionModel.from_pretrained(DEPTH_UNET).eval().to(memory_format=memory_format)
    out = {"depth UNet (5 channels)": unet(x["x"], TIMESTEP, x["context"]).sample}
    del unet
    gc.collect()
    dpt = DPTForDepthEstimation.from_pretrained(DPT).eval().to(memory_format=memory_format)
    out["DPT-Hybrid predicted_depth"] = dpt(pixel_values=x["pixels"]).predicted_depth
    return out


@torch.no_grad()
def sdlite_depth() -> dict[str, torch.Tensor]:
    x = depth_inputs()
    unet = sdlite_unet(DEPTH_UNET)
    out = {"depth UNet (5 channels)": unet(x["x"], TIMESTEP, x["context"])}
    with runtime.running(unet):
        out["depth UNet (5 channels), as in the loop"] = unet(x["x"], TIMESTEP, x["context"])
    del unet
    gc.collect()
    out["DPT-Hybrid predicted_depth"] = load_depth_estimator(DPT).model(x["pixels"])
    return out


def rows_of(model: str, layout: str, ours: dict, ref: dict, ref_cl: dict) -> list[list[str]]:
    rows = []
    for name, value in ours.items():
        base = name.replace(", as in the loop", "")
        scale = ref[base].abs().max().item()
        rounding = difference(ref[base], ref_cl[base])
        rows.append([model, name, layout, *map(fmt, difference(value, ref[base])), fmt(scale),
                     "%s / %s" % tuple(map(fmt, rounding))])
        print(" | ".join(rows[-1]), flush=True)
    return rows


# ---- the speed of a ControlNet step ----

def step_calls():
    """The guided ControlNet step of each system, on the same inputs."""
    x = controlnet_inputs()
    ref_unet = UNet2DConditionModel.from_pretrained(folder("sd1") / "unet").eval()
    ref_net = ControlNetModel.from_pretrained(CONTROLNET).eval()
    unet, net = sdlite_unet(folder("sd1") / "unet"), sdlite.load_controlnet(CONTROLNET)

    def diffusers_step():
        down, mid = ref_net(x["x"], TIMESTEP, x["context"], x["hint"], return_dict=False)
        return ref_unet(x["x"], TIMESTEP, x["context"], down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample

    def sdlite_step():
        with runtime.running(unet), runtime.running(net):
            return unet(x["x"], TIMESTEP, x["context"], *net(x["x"], TIMESTEP, x["context"], x["hint"]))
    return {"sdlite": sdlite_step, "diffusers": diffusers_step}


@torch.no_grad()
def speed() -> dict[str, float]:
    calls, best = step_calls(), {}
    for _ in range(REPEATS):
        for system, call in calls.items():
            t = seconds(call)
            best[system] = min(best.get(system, t), t)
            print(f"ControlNet step {system}: {t:.2f} s", flush=True)
    return best


def main() -> None:
    torch.manual_seed(0)
    start, about = time.perf_counter(), machine()
    for make in (make_controlnet, make_depth_unet, make_dpt):
        make()
        gc.collect()
    print(f"checkpoints ready after {time.perf_counter() - start:.0f} s", flush=True)

    ref, ref_cl = reference_controlnet(), reference_controlnet(torch.channels_last)
    gc.collect()
    unet = sdlite_unet(folder("sd1") / "unet")
    single_file = sdlite_controlnet(unet, CONTROLNET_FILE, False)   # first: running() leaves the UNet packed
    rows = rows_of("SD 1.5 ControlNet", "folder", sdlite_controlnet(unet, CONTROLNET, True), ref, ref_cl)
    rows += rows_of("SD 1.5 ControlNet", "single file", single_file, ref, ref_cl)
    del unet, ref, ref_cl
    gc.collect()
    print(f"ControlNet parity done after {time.perf_counter() - start:.0f} s", flush=True)

    ref, ref_cl = reference_depth(), reference_depth(torch.channels_last)
    gc.collect()
    positive = (ref["DPT-Hybrid predicted_depth"] > 0).float().mean().item()
    rows += rows_of("SD 2 depth", "folder", sdlite_depth(), ref, ref_cl)
    del ref, ref_cl
    gc.collect()
    print(f"depth parity done after {time.perf_counter() - start:.0f} s", flush=True)

    load_average = os.getloadavg()[0]   # the machine is shared: how busy it was when the timing started
    best = speed()
    gc.collect()
    minutes = (time.perf_counter() - start) / 60
    header = ["model", "output", "sdlite loads", "max abs error", "mean abs error", "max abs ref",
              "ref vs itself, channels-last (max / mean)"]
    s, d = best["sdlite"], best["diffusers"]
    text = (f"## ControlNet and depth-to-image at full size\n\n{about}\n\n"
            f"`nice -n 5 python benchmarks/control.py`: random weights (benchmarks/checkpoints.py's randomise, so the "
            f"zero convolutions are not zero), fp32. SD 1.5 ControlNet: diffusers' `ControlNetModel.from_unet` of the "
            f"random SD 1.5 UNet, saved as a diffusers folder and as a single file of `control_model.*` keys; "
            f"diffusers' ControlNetModel vs `sdlite.load_controlnet` of each, on a guided batch of 2 ({SIDE // 8}x"
            f"{SIDE // 8} latents, a {SIDE}x{SIDE} control image, t={TIMESTEP}); \"UNet with residuals\": each "
            f"system's SD 1.5 UNet with its own ControlNet's residuals added (diffusers' "
            f"`down_block_additional_residuals`, sdlite's `down_residuals`); \"as in the loop\": sdlite within "
            f"`runtime.running` (packed convolutions). SD 2 depth: the SD 2.1 UNet config with 5 input channels, "
            f"one step on a batch of 2 (64x64 latents and a depth channel); DPT-Hybrid at its real size (the "
            f"Intel/dpt-hybrid-midas config; transformers' DPTForDepthEstimation vs "
            f"`sdlite.dpt.load_depth_estimator` of its transformers folder) on one {DPT_SIDE}x{DPT_SIDE} input "
            f"({positive:.0%} of the reference's depth above the head's final ReLU). Last column, for scale: how far "
            f"the reference is from itself with its modules and inputs in channels-last memory (float rounding). "
            f"Took {minutes:.0f} minutes, the speed rows included.\n\n" + table(header, rows) + "\n\n"
            f"Speed: one guided ControlNet step (the ControlNet, then the UNet with its residuals; batch 2, "
            f"{SIDE}x{SIDE}, fp32), sdlite within `runtime.running` as its pipeline runs a stage, best of {REPEATS} "
            f"calls, the systems alternating call by call in one process (load average {load_average:.1f} when it "
            f"started).\n\n"
            + table(["stage", "sdlite s", "diffusers s", "sdlite / diffusers"],
                    [["ControlNet step", f"{s:.2f}", f"{d:.2f}", f"{s / d:.2f}"]]))
    print(text)
    write_section("control", text)
    if "--keep" not in sys.argv:
        for path in (CONTROLNET, DEPTH_UNET, DPT):
            shutil.rmtree(path, ignore_errors=True)
        for path in (CONTROLNET_FILE, *WHERE.glob("control-*.done")):
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
