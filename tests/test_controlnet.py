"""sdlite's ControlNet against diffusers' ControlNetModel (and the UNet it steers, and one step of
StableDiffusionControlNetPipeline's loop), on the reference outputs of fixtures/make_controlnet.py."""
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from sdlite import UserError
from sdlite.controlnet import (CONTROLNET_IMPLEMENTED, CONTROLNET_REFUSED, Control, ControlNet, ControlNetConfig,
                               control_residuals, controlnet_from_ldm, keep, load_controlnet, prepare_control_image)
from sdlite.unet import UNet, UNetConfig

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
import make_controlnet  # noqa: E402  (weights and inputs are redrawn from seeds, not stored)
from make_unet import random_weights  # noqa: E402
from tolerances import float_rounding_tolerance  # noqa: E402

LDM_CASES = ["sd1", "sd2"]          # also in the single-file layout, with a UNet
CASES = LDM_CASES + ["options"]     # make_controlnet.OPTIONS: every config key at a non-default value


class Case:
    """One fixture: the config.json, the weights in the single-file layout (diffusers' names for "options"), the
    reference's key mapping, the runs [(inputs, settings, reference down residuals, mid residual, UNet output)]."""

    def __init__(self, name: str):
        self.name = name
        with safe_open(FIXTURES / f"controlnet_{name}.safetensors", "pt") as f:
            metadata, self.tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
        manifest = json.loads(metadata["weights"])
        self.seed = int(metadata["seed"])
        self.ldm = random_weights({ldm_key: shape for ldm_key, shape, _ in manifest}, self.seed)
        self.diffusers_key = {ldm_key: key for ldm_key, _, key in manifest}
        self.config_json = json.loads((FIXTURES / f"controlnet_{name}.json").read_text())
        c = self.config_json
        hint_factor = 2 ** (len(c["conditioning_embedding_out_channels"]) - 1)
        self.runs = []
        for i, (batch, t, scale, guess_mode) in enumerate(json.loads(metadata["runs"])):
            inputs = make_controlnet.inputs(self.seed + i, batch, c["in_channels"], c["cross_attention_dim"],
                                            c["conditioning_channels"], hint_factor)
            t = t if isinstance(t, float) else torch.tensor(t)
            down = [self.tensors[f"{i}.down.{j}"] for j in range(sum(k.startswith(f"{i}.down.") for k in self.tensors))]
            self.runs.append((inputs, t, scale, guess_mode, down, self.tensors[f"{i}.mid"],
                              self.tensors.get(f"{i}.unet")))

    def diffusers_weights(self) -> dict[str, torch.Tensor]:
        return {self.diffusers_key[ldm_key]: value for ldm_key, value in self.ldm.items()}

    def folder(self, where: Path) -> Path:
        """A diffusers ControlNetModel folder, as save_pretrained writes it."""
        (where / "config.json").write_text(json.dumps(self.config_json))
        save_file(self.diffusers_weights(), where / "diffusion_pytorch_model.safetensors")
        return where

    def unet(self) -> UNet:
        unet_case = make_controlnet.CASES[self.name][2]
        unet = UNet(UNetConfig.from_json(json.loads((FIXTURES / f"unet_{unet_case}.json").read_text()))).eval()
        unet.load_state_dict(make_controlnet.unet_weights(unet_case), strict=True)
        return unet


@pytest.fixture(scope="module", params=CASES)
def case(request) -> Case:
    return Case(request.param)


@pytest.fixture(scope="module", params=LDM_CASES)
def ldm_case(request) -> Case:
    return Case(request.param)


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def assert_matches_reference(net: ControlNet, case: Case):
    tolerance = float_rounding_tolerance(net)   # what float32 rounding explains: see there
    for (x, context, hint), t, scale, guess_mode, down_ref, mid_ref, _ in case.runs:
        with torch.no_grad():
            down, mid = net(x, t, context, hint, scale, guess_mode)
        assert len(down) == len(down_ref)
        for j, (ours, theirs) in enumerate(zip(down + [mid], down_ref + [mid_ref])):
            error = relative_error(ours, theirs)
            assert error < tolerance, f"run t={t!r} scale {scale} guess {guess_mode}: residual {j} error {error:.2e}"


def test_from_diffusers_folder(case, tmp_path):
    assert_matches_reference(load_controlnet(case.folder(tmp_path)), case)


def test_from_single_file(ldm_case, tmp_path):
    save_file({"control_model." + k: v for k, v in ldm_case.ldm.items()}, tmp_path / "control.safetensors")
    assert_matches_reference(load_controlnet(tmp_path / "control.safetensors"), ldm_case)


@pytest.mark.parametrize("suffix, dtype", [(".safetensors", torch.float16), (".pth", torch.float32)])
def test_fp16_and_pickled_single_files_hold_the_folders_weights(ldm_case, tmp_path, suffix, dtype):
    """An fp16 file gives the folder's weights rounded to fp16; a pickle (read weights-only) the weights as they are;
    a file without the control_model. prefix (as some are distributed) as well as one with it."""
    weights = {k: v.to(dtype) for k, v in ldm_case.ldm.items()}
    if suffix == ".pth":
        torch.save({"state_dict": weights}, tmp_path / "control.pth")
    else:
        save_file({"control_model." + k: v for k, v in weights.items()}, tmp_path / f"control{suffix}")
    net = load_controlnet(tmp_path / f"control{suffix}")
    expected = {key: v.to(dtype).float() for key, v in ldm_case.diffusers_weights().items()}
    state = net.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], value) for key, value in expected.items())   # the stored values themselves


def test_fp16_variant_folder_loads(tmp_path):
    case = Case("sd1")
    (tmp_path / "config.json").write_text(json.dumps(case.config_json))
    save_file({k: v.half() for k, v in case.diffusers_weights().items()},
              tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    net = load_controlnet(tmp_path, dtype=torch.float16)
    assert next(net.parameters()).dtype == torch.float16
    assert torch.equal(net.conv_in.weight, case.diffusers_weights()["conv_in.weight"].half())


def test_single_file_config_inferred_from_shapes_equals_config_json(ldm_case):
    config, _ = controlnet_from_ldm(ldm_case.ldm)
    assert config == ControlNetConfig.from_json(ldm_case.config_json)


def test_single_file_keys_map_as_in_the_reference(ldm_case):
    _, state_dict = controlnet_from_ldm(ldm_case.ldm)
    assert state_dict.keys() == set(ldm_case.diffusers_key.values())
    moved = [ldm_key for ldm_key, key in ldm_case.diffusers_key.items()
             if state_dict[key] is not ldm_case.ldm[ldm_key]]
    assert not moved, f"mapped elsewhere than by diffusers: {moved[:5]}"


def test_unet_with_the_residuals_added(ldm_case, tmp_path):
    net, unet = load_controlnet(ldm_case.folder(tmp_path)), ldm_case.unet()
    # the errors of both networks add along the path through the ControlNet and then the UNet
    tolerance = float_rounding_tolerance(net) + float_rounding_tolerance(unet)
    for (x, context, hint), t, scale, guess_mode, _, _, expected in ldm_case.runs:
        with torch.no_grad():
            out = unet(x, t, context, *net(x, t, context, hint, scale, guess_mode))
        assert relative_error(out, expected) < tolerance
    with torch.no_grad():   # residuals are a real change, far beyond what float rounding explains
        plain = unet(x, t, context)
    assert relative_error(plain, expected) > 100 * tolerance


def test_a_pipeline_step_with_two_controls_and_guess_mode(ldm_case, tmp_path):
    """control_residuals as StableDiffusionControlNetPipeline's loop uses MultiControlNetModel: two controls with
    their own scale, start and end, guided, with and without guess mode (conditional half only)."""
    net, unet = load_controlnet(ldm_case.folder(tmp_path)), ldm_case.unet()
    config = ldm_case.config_json
    x, context, _ = make_controlnet.inputs(ldm_case.seed + 10, 2, config["in_channels"],
                                           config["cross_attention_dim"], 3, 8)
    images = [make_controlnet.inputs(ldm_case.seed + 20 + k, 1, 1, 1, 3, 8)[2]
              for k in range(len(make_controlnet.CONTROLS))]
    controls = [Control(net, Image.new("RGB", (8, 8)), scale, start, end)
                for scale, start, end in make_controlnet.CONTROLS]
    tolerance = 2 * float_rounding_tolerance(net) + float_rounding_tolerance(unet)   # two ControlNets, one UNet
    for step, guess_mode in make_controlnet.PIPELINE_RUNS:
        hints = [image.repeat(1 if guess_mode else 2, 1, 1, 1) for image in images]   # as prepare_control_image
        x_in = torch.cat([x[:1]] * 2)
        with torch.no_grad():
            residuals = control_residuals(controls, hints, x_in, 321, context, step, make_controlnet.PIPELINE_STEPS,
                                          guided=True, guess_mode=guess_mode)
            out = unet(x_in, 321, context, *residuals)
        assert relative_error(out, ldm_case.tensors[f"step{step}.{guess_mode}"]) < tolerance, (step, guess_mode)


# ---- the control image and the steps a control acts in ----

def test_control_image_as_the_reference_prepares_it():
    with safe_open(FIXTURES / "controlnet_images.safetensors", "pt") as f:
        cases, tensors = json.loads(f.metadata()["cases"]), {key: f.get_tensor(key) for key in f.keys()}
    for i, (name, width, height, batch, guided, guess_mode) in enumerate(cases):
        image = Image.fromarray(tensors[f"{name}.pixels"].numpy())
        hint = prepare_control_image(image, width, height, batch, guided, guess_mode)
        # Pillow's Lanczos on 8-bit images is integer arithmetic, and levels / 255 is one exact division: the levels
        # are compared exactly
        assert hint.dtype == torch.float32 and torch.equal((hint * 255).round().to(torch.uint8), tensors[f"{i}.levels"])
        assert hint.min() >= 0 and hint.max() <= 1


def test_keep_is_the_fraction_of_the_loop_between_start_and_end():
    # 10 steps from 0.2 to 0.8: steps 0 and 1 start before 0.2, steps 8 and 9 end after 0.8
    assert [keep(i, 10, 0.2, 0.8) for i in range(10)] == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]
    assert [keep(i, 4, 0.0, 1.0) for i in range(4)] == [1, 1, 1, 1]
    # 3 steps, end 0.5: step 0 ends at 1/3 (kept), step 1 at 2/3 (not)
    assert [keep(i, 3, 0.0, 0.5) for i in range(3)] == [1, 0, 0]


@pytest.mark.parametrize("settings", [dict(start=0.5, end=0.5), dict(start=-0.1), dict(end=1.2),
                                      dict(scale=float("nan"))])
def test_control_settings_out_of_range_are_one_line(settings):
    with pytest.raises(UserError) as e:
        Control(None, "edges.png", **settings)
    assert "\n" not in str(e.value)


# ---- config.json keys, families, bad files ----

REFERENCE_KEYS = json.loads((FIXTURES / "controlnet_config_keys.json").read_text())["defaults"]


def test_every_reference_config_key_is_implemented_or_refused():
    neither = [key for key in REFERENCE_KEYS if key not in CONTROLNET_IMPLEMENTED and key not in CONTROLNET_REFUSED]
    assert not neither, f"neither implemented nor refused: {neither}"
    assert not CONTROLNET_IMPLEMENTED & CONTROLNET_REFUSED.keys()
    assert all(REFERENCE_KEYS[key] in values for key, values in CONTROLNET_REFUSED.items())


def test_every_implemented_key_is_tested_at_a_value_other_than_the_default():
    configs = [Case(name).config_json for name in CASES]
    untested = [key for key in CONTROLNET_IMPLEMENTED
                if all(c.get(key) == REFERENCE_KEYS[key] for c in configs)]
    assert not untested


@pytest.mark.parametrize("key, value", [("class_embed_type", "timestep"), ("mid_block_type", "UNetMidBlock2D"),
                                        ("resnet_time_scale_shift", "scale_shift"), ("some_new_key", 1)])
def test_refused_keys_are_one_line_naming_file_key_and_value(key, value):
    with pytest.raises(UserError) as e:
        ControlNetConfig.from_json({**Case("sd1").config_json, key: value}, "cn/config.json")
    message = str(e.value)
    assert "\n" not in message and "cn/config.json" in message and key in message and json.dumps(value) in message


@pytest.mark.parametrize("change", [{"addition_embed_type": "text_time", "cross_attention_dim": 2048},
                                    {"addition_embed_type": "text_time"}, {"cross_attention_dim": 2048}])
def test_an_sdxl_controlnet_folder_is_refused_by_name(change):
    with pytest.raises(UserError, match="SDXL") as e:
        ControlNetConfig.from_json({**Case("sd1").config_json, **change}, "cn/config.json")
    assert "\n" not in str(e.value)


def test_an_sdxl_single_file_is_refused_by_name(tmp_path):
    weights = {"control_model." + k: v for k, v in Case("sd1").ldm.items()}
    weights["control_model.label_emb.0.0.weight"] = torch.zeros(4, 8)
    save_file(weights, tmp_path / "sdxl.safetensors")
    with pytest.raises(UserError, match="SDXL"):
        load_controlnet(tmp_path / "sdxl.safetensors")


def test_files_that_are_no_controlnet_are_one_line(tmp_path):
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    (tmp_path / "empty").mkdir()
    for path, says in [(tmp_path / "model.safetensors", "not a ControlNet"), (tmp_path / "missing", "not found"),
                       (tmp_path / "empty", "config.json")]:
        with pytest.raises(UserError, match=says) as e:
            load_controlnet(path)
        assert "\n" not in str(e.value)


def test_a_controlnet_for_another_unet_is_refused():
    sd1 = ControlNet(ControlNetConfig.from_json(Case("sd1").config_json))
    sd2_unet = UNetConfig.from_json(json.loads((FIXTURES / "unet_sd2.json").read_text()))
    with pytest.raises(UserError, match="text context 48 wide"):
        sd1.check_fits(sd2_unet)
    with pytest.raises(UserError, match="levels"):
        sd1.check_fits(UNetConfig(block_out_channels=(32, 64), attention_levels=(True, False), cross_attention_dim=48))
    sd1.check_fits(UNetConfig.from_json(json.loads((FIXTURES / "unet_sd1.json").read_text())))


@pytest.mark.parametrize("change, named", [
    ({"layers_per_block": [2, 2, 2]}, "layers_per_block"),          # the reference takes one value for all levels
    ({"cross_attention_dim": [48, 48, 48]}, "cross_attention_dim"),
    ({"down_block_types": ["AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]}, "AttnDownBlock2D"),
    ({"down_block_types": ["DownBlock2D"]}, "down_block_types"),
    ({"norm_num_groups": None}, "norm_num_groups"),
    ({"attention_head_dim": 5}, "attention_head_dim"),
    ({"num_attention_heads": 5}, "attention_head_dim"),
    ({"controlnet_conditioning_channel_order": "bgra"}, "controlnet_conditioning_channel_order"),
    ({"conditioning_embedding_out_channels": [16, 0]}, "conditioning_embedding_out_channels"),
    ({"global_pool_conditions": "no"}, "global_pool_conditions"),
])
def test_wrong_types_and_values_are_one_line(change, named):
    with pytest.raises(UserError) as e:
        ControlNetConfig.from_json({**Case("sd1").config_json, **change}, "cn/config.json")
    assert "\n" not in str(e.value) and named in str(e.value) and "cn/config.json" in str(e.value)
