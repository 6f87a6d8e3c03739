"""sdlite's samplers against diffusers' schedulers, as tests/fixtures/make_schedulers.py recorded them: the same
configs, the same fake model, the same seeded generator."""
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdlite import schedulers

FIXTURES = Path(__file__).parent / "fixtures"
META = json.loads((FIXTURES / "schedulers_configs.json").read_text())
CONFIGS = META["configs"]
X0 = torch.tensor(META["x0"], dtype=torch.float32).view(META["shape"])
W = torch.tensor(META["w"], dtype=torch.float32).view(META["shape"])
# Largest relative error of a sample (max |ours - reference| / max |reference|). LMS: the reference integrates its
# coefficients numerically, over an integrand evaluated in fp32 (~1.5e-7 relative error); sdlite exactly.
TOLERANCE = {"lms": 5e-6}


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """The stand-in for the UNet that make_schedulers.py used."""
    return 0.7 * x + W * math.cos(float(t) / 150.0)


def recorded(name: str) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """config -> job ("n7", "n10_strength0.3") -> what the reference gave."""
    runs = {}
    for key, value in load_file(FIXTURES / f"schedulers_{name}.safetensors").items():
        config, job, what = key.split("/")
        runs.setdefault(config, {}).setdefault(job, {})[what] = value
    return runs


RECORDED = {name: recorded(name) for name in schedulers.NAMES}


def run(sampler, n: int, strength: float) -> dict:
    """Drive the sampler as make_schedulers.py drove the reference (and as the pipelines do)."""
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


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("name,config", [(name, config) for name in schedulers.NAMES for config in RECORDED[name]])
def test_matches_reference(name, config):
    for job, reference in RECORDED[name][config].items():
        n, strength = re.fullmatch(r"n(\d+)(?:_strength(.+))?", job).groups()
        ours = run(schedulers.make(name, CONFIGS[config]), int(n), float(strength or 1.0))
        assert ours["timesteps"].dtype == reference["timesteps"].dtype, job
        assert torch.equal(ours["timesteps"], reference["timesteps"]), job
        assert ours["init_sigma"] == reference["init_sigma"].item(), job
        for what in reference.keys() - {"timesteps", "init_sigma"}:
            error = relative_error(ours[what], reference[what])
            assert error <= TOLERANCE.get(name, 1e-6), f"{job} {what}: relative error {error:.2e}"


def test_every_sampler_and_config_is_recorded():
    assert set(RECORDED) == set(schedulers.NAMES)
    for name in schedulers.NAMES:
        refused = set(META["refused"].get(name, []))
        assert set(RECORDED[name]) | refused == set(CONFIGS), name


@pytest.mark.parametrize("name,config", [(n, c) for n, configs in META["refused"].items() for c in configs])
def test_refuses_what_the_reference_refuses(name, config):
    with pytest.raises(NotImplementedError):
        run(schedulers.make(name, CONFIGS[config]), 7, 1.0)


@pytest.mark.parametrize("name,option", [
    ("unipc", {"solver_order": 3}), ("unipc", {"solver_type": "bh1"}), ("dpmpp_2m", {"solver_order": 3}),
    ("dpmpp_2m", {"algorithm_type": "sde-dpmsolver++"}), ("euler", {"use_exponential_sigmas": True}),
    ("ddim", {"thresholding": True}), ("ddpm", {"variance_type": "learned_range"}),
])
def test_refuses_unimplemented_options(name, option):
    with pytest.raises(NotImplementedError):
        schedulers.make(name, {**CONFIGS["sd1"], **option})


def test_options_of_other_samplers_are_ignored():
    """As in diffusers' from_config: a key the target sampler does not have changes nothing."""
    plain = run(schedulers.make("pndm", CONFIGS["sd1"]), 7, 1.0)
    other = run(schedulers.make("pndm", {**CONFIGS["sd1"], "solver_order": 3, "use_karras_sigmas": True}), 7, 1.0)
    assert torch.equal(plain["x6"], other["x6"])


def test_unknown_name():
    with pytest.raises(ValueError):
        schedulers.make("heun", CONFIGS["sd1"])


def test_class_names():
    assert set(schedulers.CLASS_NAMES.values()) <= set(schedulers.NAMES)
    assert schedulers.CLASS_NAMES[CONFIGS["sd1"]["_class_name"]] == "pndm"
    assert schedulers.CLASS_NAMES[CONFIGS["sd2v"]["_class_name"]] == "ddim"
