"""sdlite's samplers against diffusers' schedulers, as tests/fixtures/make_samplers.py recorded them: the same
configs, the same fake model, the same seeded generator."""
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdlite import samplers
from sdlite.pipeline import rescale_guidance
from sdlite.errors import UserError
from sdlite.samplers import conversions

FIXTURES = Path(__file__).parent / "fixtures"
META = json.loads((FIXTURES / "schedulers_configs.json").read_text())
CONFIGS = META["configs"]
X0 = torch.tensor(META["x0"], dtype=torch.float32).view(META["shape"])
W = torch.tensor(META["w"], dtype=torch.float32).view(META["shape"])
EPS = torch.finfo(torch.float32).eps
# A sample's error relative to its size (max |ours - reference| / max |reference|) grows by float32 rounding in each
# step: a step is a chain of at most ~64 fp32 operations per element (the coefficients' pow/sqrt/log/exp and the
# update); sdlite and the reference order them differently and their vectorised kernels round differently per CPU,
# so each may be OPS_PER_STEP * EPS off per step, and the start (scale, add_noise) counts as one more step.
OPS_PER_STEP = 64
# LMS: the reference integrates its coefficients numerically, over an integrand evaluated in fp32 (~1.5e-7 relative
# error each, and up to 4 coefficients a step), sdlite exactly: one more such error per coefficient and step.
LMS_QUADRATURE = 4 * 1.5e-7


def sample_tolerance(name: str, steps: int) -> float:
    per_step = OPS_PER_STEP * EPS + (LMS_QUADRATURE if name == "lms" else 0.0)
    return per_step * (steps + 1)


def timestep_tolerance(sampler) -> float:
    """Fractional (k-diffusion) timesteps come from sigma_to_t: t = i + (log s_i - log s) / (log s_i - log s_{i+1})
    with fp32 training sigmas whose sqrt/pow may round 1 ulp differently per CPU (and the log another ulp): an
    absolute error of about 2 EPS over the smallest gap between neighbouring log sigmas, plus the fp32 rounding
    of t itself (t < T)."""
    train = conversions.train_sigmas(sampler.alphas_cumprod).astype(np.float64)
    gap = np.diff(np.log(train)).min()
    return 2 * EPS / gap + EPS * len(train)


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """The stand-in for the UNet that make_samplers.py used."""
    return 0.7 * x + W * math.cos(float(t) / 150.0)


def recorded(name: str) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """config -> job ("n7", "n10_strength0.3") -> what the reference gave."""
    runs = {}
    for key, value in load_file(FIXTURES / f"schedulers_{name}.safetensors").items():
        config, job, what = key.split("/")
        runs.setdefault(config, {}).setdefault(job, {})[what] = value
    return runs


RECORDED = {name: recorded(name) for name in samplers.NAMES}


def run(sampler, n: int, strength: float) -> dict:
    """Drive the sampler as make_samplers.py drove the reference (and as the pipelines do)."""
    timesteps = sampler.set_timesteps(n, strength)
    out = {"timesteps": timesteps, "init_sigma": sampler.init_sigma}
    if strength < 1:
        x = out["start"] = sampler.add_noise(X0, W, timesteps[:1].repeat(len(X0)))
    else:
        x = X0 * sampler.init_sigma
    generator = torch.Generator().manual_seed(META["generator_seed"])
    for i, t in enumerate(timesteps):
        scaled = sampler.scale_input(x, t)
        out.setdefault("scaled", scaled)
        x = out[f"x{i}"] = sampler.step(fake_model(scaled, t), t, x, generator)
    return out


def config_of(name: str, config: str) -> dict:
    """The config a run was made from: "pipeline_<c>[_inpaint]" runs take PIPELINE_CONFIGS[c] as diffusers' SD
    pipelines (txt2img or inpainting) rewrite it."""
    if config.startswith("pipeline_"):
        base = config.removeprefix("pipeline_").removesuffix("_inpaint")
        inpainting = config.endswith("_inpaint")
        return samplers.as_pipelines_see_it(name, META["pipeline_configs"][base], inpainting)
    return CONFIGS[config]


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("name,config", [(name, config) for name in samplers.NAMES for config in RECORDED[name]])
def test_matches_reference(name, config):
    for job, reference in RECORDED[name][config].items():
        n, strength = re.fullmatch(r"n(\d+)(?:_strength(.+))?", job).groups()
        sampler = samplers.make(name, config_of(name, config))
        ours = run(sampler, int(n), float(strength or 1.0))
        assert ours["timesteps"].dtype == reference["timesteps"].dtype, job
        if reference["timesteps"].dtype == torch.int64:  # integers, rounded as the reference rounds: exact
            assert torch.equal(ours["timesteps"], reference["timesteps"]), job
        else:
            error = (ours["timesteps"] - reference["timesteps"]).abs().max().item()
            assert error <= timestep_tolerance(sampler), f"{job} timesteps: error {error:.2e}"
        # init_sigma is sigma_max (or sqrt(sigma_max^2 + 1)): a few fp32 roundings (sqrt, division, interpolation)
        assert ours["init_sigma"] == pytest.approx(reference["init_sigma"].item(), rel=4 * EPS, abs=0), job
        steps = len(ours["timesteps"])
        for what in reference.keys() - {"timesteps", "init_sigma"}:
            error = relative_error(ours[what], reference[what])
            assert error <= sample_tolerance(name, steps), f"{job} {what}: relative error {error:.2e}"


def test_every_sampler_and_config_is_recorded():
    assert set(RECORDED) == set(samplers.NAMES)
    for name in samplers.NAMES:
        refused = set(META["refused"].get(name, []))
        # configs where the reference gives only non-finite values (see make_samplers.py), at most one per sampler
        unrecorded = set(META["unrecorded"][name])
        assert len(unrecorded) <= 1, name
        pipeline = {f"pipeline_{c}{kind}" for c in META["pipeline_configs"] for kind in ("", "_inpaint")}
        assert set(RECORDED[name]) | refused | unrecorded == set(CONFIGS) | pipeline, name


@pytest.mark.parametrize("name,config", [(n, c) for n, configs in META["refused"].items() for c in configs])
def test_refuses_what_the_reference_refuses(name, config):
    with pytest.raises(NotImplementedError):
        run(samplers.make(name, CONFIGS[config]), 7, 1.0)


@pytest.mark.parametrize("name,option", [
    ("unipc", {"predict_x0": False}), ("unipc", {"thresholding": True}), ("dpmpp_2m", {"solver_order": 4}),
    ("dpmpp_2m", {"algorithm_type": "sde-dpmsolver++"}), ("euler", {"use_exponential_sigmas": True}),
    ("ddim", {"thresholding": True}), ("ddpm", {"variance_type": "fixed_small_log"}),
])
def test_refuses_unimplemented_options(name, option):
    """By name, in one line, as a UserError (which the CLI prints as its one line) that is a NotImplementedError."""
    with pytest.raises(NotImplementedError) as refused:
        samplers.make(name, {**CONFIGS["sd1"], **option})
    assert isinstance(refused.value, UserError)
    message = str(refused.value)
    assert "\n" not in message and name in message and next(iter(option)) in message


def test_options_of_other_samplers_are_ignored():
    """As in diffusers' from_config: a key the target sampler does not have changes nothing."""
    plain = run(samplers.make("pndm", CONFIGS["sd1"]), 7, 1.0)
    other = run(samplers.make("pndm", {**CONFIGS["sd1"], "solver_order": 3, "use_karras_sigmas": True}), 7, 1.0)
    assert torch.equal(plain["x6"], other["x6"])


@pytest.mark.parametrize("name", samplers.NAMES)
def test_steps_run_at_the_cursor_in_order(name):
    """The contract (samplers/base.py): set_timesteps puts the cursor on the first step and each step moves it on by
    one; a step whose t is not the current timestep (skipped ahead) is refused and changes nothing, and so is a step
    after the last."""
    sampler = samplers.make(name, CONFIGS["sd1"])
    timesteps = sampler.set_timesteps(4)
    with pytest.raises(ValueError, match="in order"):
        sampler.step(fake_model(X0, timesteps[-1]), timesteps[-1], X0)
    x = X0 * sampler.init_sigma
    generator = torch.Generator().manual_seed(META["generator_seed"])
    for t in timesteps:
        x = sampler.step(fake_model(sampler.scale_input(x, t), t), t, x, generator)
    undisturbed = run(samplers.make(name, CONFIGS["sd1"]), 4, 1.0)[f"x{len(timesteps) - 1}"]
    assert torch.equal(x, undisturbed)  # the same computation on the same machine: bit for bit
    with pytest.raises(ValueError, match="in order"):
        sampler.step(fake_model(x, timesteps[-1]), timesteps[-1], x)


def test_unknown_name():
    with pytest.raises(ValueError):
        samplers.make("heun", CONFIGS["sd1"])


def test_class_names():
    assert set(samplers.CLASS_NAMES.values()) <= set(samplers.NAMES)
    assert samplers.CLASS_NAMES[CONFIGS["sd1"]["_class_name"]] == "pndm"
    assert samplers.CLASS_NAMES[CONFIGS["sd2v"]["_class_name"]] == "ddim"


def test_guidance_rescale_matches_reference():
    """The pipelines' guidance_rescale (Lin et al. 2023, sec. 3.4) against diffusers' rescale_noise_cfg."""
    reference = torch.tensor(META["guidance_rescale"]["rescaled"]).view(META["shape"])
    ours = rescale_guidance(X0 * 7.5 - W * 6.5, X0, META["guidance_rescale"]["phi"])
    # two standard deviations over 60 values (a sum of squares: ~log2(60) roundings each, a sqrt), their ratio and
    # the mix: about 16 fp32 roundings, each up to EPS relative
    assert relative_error(ours, reference) <= 16 * EPS
