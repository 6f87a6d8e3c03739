"""sdlite's DPT depth estimator against transformers' DPTForDepthEstimation and DPTImageProcessor, and its depth
condition against diffusers' StableDiffusionDepth2ImgPipeline.prepare_depth_map, on fixtures/make_dpt.py's outputs."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from sdlite import UserError
from sdlite.dpt import (BIT_IMPLEMENTED, BIT_REFUSED, DPT_IMPLEMENTED, DPT_REFUSED, PREPROCESSOR_KEYS, BiTConfig,
                        DPTConfig, Preprocessor, depth_to_condition, load_depth_estimator)

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_dpt import write_folder  # noqa: E402
from make_unet import random_weights  # noqa: E402  (the weights are redrawn from a seed, not stored)
from tolerances import EPS32, float_rounding_tolerance  # noqa: E402

CASES = ["sd2", "custom", "large"]   # SD 2 depth's folder layout, then two transformers folders
REFERENCE_KEYS = json.loads((FIXTURES / "dpt_config_keys.json").read_text())


class Case:
    """One fixture: the folder written from its config, preprocessor config and redrawn weights, and the reference
    tensors (image, pixel_values, predicted_depth, condition)."""

    def __init__(self, name: str, root: Path):
        with safe_open(FIXTURES / f"dpt_{name}.safetensors", "pt") as f:
            metadata, self.tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
        self.config = json.loads(metadata["config"])
        self.preprocessor = json.loads(metadata["preprocessor"])
        self.weights = random_weights(json.loads(metadata["weights"]), int(metadata["seed"]))
        self.layout = metadata["layout"]
        self.folder = write_folder(root, self.layout, self.config, self.weights, self.preprocessor)
        self.image = Image.fromarray(self.tensors["image"].numpy())
        self.latent_hw = (self.image.height // 8, self.image.width // 8)   # as the pipeline sizes the latents


@pytest.fixture(scope="module", params=CASES)
def case(request, tmp_path_factory) -> Case:
    return Case(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def estimator(case):
    return load_depth_estimator(case.folder)


def test_preprocessing_matches_the_image_processor(case, estimator):
    pixels = estimator.preprocess(case.image)
    expected = case.tensors["pixel_values"]
    assert pixels.shape == expected.shape and pixels.dtype == torch.float32
    # PIL resizes the same uint8 image to the same uint8 pixels; then three elementwise roundings (the rescale's
    # float64 -> float32, the subtraction, the division), each within half an ulp of values up to max |expected|
    tolerance = 3 * EPS32 * expected.abs().max()
    assert (pixels - expected).abs().max() <= tolerance


def test_depth_matches_the_reference(case, estimator):
    depth = estimator.estimate(case.image)
    expected = case.tensors["predicted_depth"]
    assert depth.shape == expected.shape
    relative_error = (depth - expected).abs().max() / expected.abs().max()
    tolerance = float_rounding_tolerance(estimator.model)   # what float32 rounding explains: see there
    assert relative_error < tolerance, f"relative error {relative_error:.2e}"


def resized_range(depth: torch.Tensor, latent_hw: tuple[int, int]) -> float:
    resized = F.interpolate(depth[:, None], size=latent_hw, mode="bicubic", align_corners=False)
    return (resized.max() - resized.min()).item()


def test_condition_of_the_reference_depth_matches_prepare_depth_map(case):
    depth = case.tensors["predicted_depth"]
    condition = depth_to_condition(depth, case.latent_hw)
    expected = case.tensors["condition"]
    assert condition.shape == expected.shape == (1, 1, *case.latent_hw)
    # the same bicubic resize of the same depth (16 products summed: 16 roundings of terms up to 1.9 max |depth|, the
    # cubic's weights summing in magnitude to at most 1.375 a side), then (d - min) / (max - min) in [0, 1] scaled
    # by 2: those errors over the range, and 4 roundings of the result
    error = 16 * 1.9 * EPS32 * depth.abs().max().item()
    tolerance = 2 * 3 * error / resized_range(depth, case.latent_hw) + 4 * EPS32
    assert (condition - expected).abs().max() <= tolerance


def test_condition_of_the_estimated_depth_matches_prepare_depth_map(case, estimator):
    """The whole estimator path of diffusers' pipeline: its feature extractor, its depth estimator, its resize."""
    depth = estimator.estimate(case.image)
    expected = case.tensors["condition"]
    reference_depth = case.tensors["predicted_depth"]
    # the depth's error (float32 rounding of the network, relative to its largest value; see test_depth_...)
    # passes through the resize (the cubic's weights sum in magnitude to at most 1.375 a side: 1.9) and the
    # min-max scaling, which divides it by the range and counts it three times (the value, the min and the max), by 2
    depth_error = float_rounding_tolerance(estimator.model) * reference_depth.abs().max().item()
    tolerance = 2 * 3 * 1.9 * depth_error / resized_range(reference_depth, case.latent_hw) + 4 * EPS32
    assert (depth_to_condition(depth, case.latent_hw) - expected).abs().max() <= tolerance


def test_condition_is_minus_one_to_one_per_image():
    depth = torch.stack([torch.linspace(0, 1, 30).reshape(5, 6), torch.linspace(7, 3, 30).reshape(5, 6)])
    condition = depth_to_condition(depth, (4, 3))
    assert condition.shape == (2, 1, 4, 3)
    for one in condition:
        assert one.min() == -1 and one.max() == 1


def test_a_flat_depth_map_is_refused():
    with pytest.raises(UserError, match="same everywhere"):
        depth_to_condition(torch.full((1, 8, 8), 3.0), (2, 2))


def test_both_layouts_load_the_same_model(case, estimator, tmp_path):
    other = write_folder(tmp_path, "transformers" if case.layout == "sd2" else "sd2", case.config, case.weights,
                         case.preprocessor)
    again = load_depth_estimator(other)
    assert torch.equal(again.preprocess(case.image), estimator.preprocess(case.image))
    assert again.model.state_dict().keys() == estimator.model.state_dict().keys()


def test_pickled_weights_load_through_the_weights_only_loader(case, estimator, tmp_path):
    folder = write_folder(tmp_path, "transformers", case.config, case.weights, case.preprocessor)
    (folder / "model.safetensors").unlink()
    torch.save(case.weights, folder / "pytorch_model.bin")
    again = load_depth_estimator(folder)
    assert all(torch.equal(again.model.state_dict()[key], value)
               for key, value in estimator.model.state_dict().items())


# ---- config.json and preprocessor_config.json keys: each honoured or refused by name ----

DPT_HYBRID = {  # Intel/dpt-hybrid-midas as transformers' conversion script configures it (SD 2 depth's estimator)
    "architectures": ["DPTForDepthEstimation"], "is_hybrid": True, "hidden_size": 768, "num_hidden_layers": 12,
    "num_attention_heads": 12, "intermediate_size": 3072, "image_size": 384, "patch_size": 16,
    "backbone_out_indices": [2, 5, 8, 11], "reassemble_factors": [1, 1, 1, 0.5],
    "neck_hidden_sizes": [256, 512, 768, 768], "neck_ignore_stages": [0, 1], "readout_type": "project",
    "backbone_featmap_shape": [1, 1024, 24, 24], "embedding_type": "hybrid", "use_batch_norm_in_fusion_residual": False,
    "backbone_config": {"global_padding": "same", "layer_type": "bottleneck", "depths": [3, 4, 9],
                        "hidden_sizes": [256, 512, 1024, 2048], "out_features": ["stage1", "stage2", "stage3"],
                        "embedding_dynamic_padding": True, "model_type": "bit", "bad_words_ids": None,
                        "num_beams": 1, "torchscript": False},
}


def test_dpt_hybrid_config_gives_the_defaults():
    assert DPTConfig.from_json(DPT_HYBRID) == DPTConfig()
    without_backbone_config = {k: v for k, v in DPT_HYBRID.items() if k != "backbone_config"}
    assert DPTConfig.from_json(without_backbone_config) == DPTConfig()   # transformers' default BiT is DPT-Hybrid's


def test_keys_without_effect_change_nothing():
    changed = {**DPT_HYBRID, "output_hidden_states": True, "id2label": {"0": "a"}, "torch_dtype": "float16",
               "pooler_act": "relu", "pooler_output_size": 3, "use_auxiliary_head": False,
               "semantic_classifier_dropout": 0.5, "auxiliary_loss_weight": 1.0, "embedding_type": "patch",
               "backbone_config": {**DPT_HYBRID["backbone_config"], "num_beams": 4, "return_dict": False}}
    assert DPTConfig.from_json(changed) == DPTConfig.from_json(DPT_HYBRID)


def test_every_reference_config_key_is_implemented_or_refused():
    """make_dpt.py records the keys of DPTConfig, BitConfig and DPTImageProcessor: a key a new transformers adds fails
    here until sdlite implements or refuses it."""
    neither = [key for keys, implemented, refused in [(REFERENCE_KEYS["dpt"], DPT_IMPLEMENTED, DPT_REFUSED),
                                                      (REFERENCE_KEYS["bit"], BIT_IMPLEMENTED, BIT_REFUSED),
                                                      (REFERENCE_KEYS["preprocessor"], PREPROCESSOR_KEYS, {})]
               for key in keys if key not in implemented and key not in refused and not key.startswith("_")]
    assert not neither, f"neither implemented nor refused: {neither}"


@pytest.mark.parametrize("change, named", [
    ({"hidden_dropout_prob": 0.1}, "hidden_dropout_prob"),
    ({"some_new_key": 1}, "some_new_key"),
    ({"architectures": ["DPTForSemanticSegmentation"]}, "architectures"),
    ({"readout_type": "add"}, "readout_type"),
    ({"use_batch_norm_in_fusion_residual": True}, "use_batch_norm_in_fusion_residual"),
    ({"add_projection": True}, "add_projection"),
    ({"hidden_size": "768"}, "hidden_size"),
    ({"num_attention_heads": 5}, "num_attention_heads"),
    ({"backbone_featmap_shape": [1, 512, 24, 24]}, "backbone_featmap_shape"),
    ({"neck_ignore_stages": [0]}, "neck_ignore_stages"),
    ({"neck_hidden_sizes": [256, 512, 768]}, "neck_hidden_sizes"),
    ({"backbone_out_indices": [2, 5, 8, 12]}, "backbone_out_indices"),
    ({"backbone_out_indices": [2, 5, 8, 8]}, "backbone_out_indices"),
    ({"reassemble_factors": [1, 1, 1, 0.4]}, "reassemble factor"),
    ({"backbone_config": {**DPT_HYBRID["backbone_config"], "layer_type": "preactivation"}}, "layer_type"),
    ({"backbone_config": {**DPT_HYBRID["backbone_config"], "global_padding": None}}, "global_padding"),
    ({"backbone_config": {**DPT_HYBRID["backbone_config"], "depths": [3, 4, 6, 3]}}, "depths"),
    ({"backbone_config": {**DPT_HYBRID["backbone_config"], "drop_path_rate": 0.1}}, "drop_path_rate"),
    ({"backbone_config": {**DPT_HYBRID["backbone_config"], "num_groups": 7}}, "num_groups"),
    ({"backbone_config": {k: v for k, v in DPT_HYBRID["backbone_config"].items()
                          if k != "embedding_dynamic_padding"}}, "embedding_dynamic_padding"),
    ({"backbone_config": {k: v for k, v in DPT_HYBRID["backbone_config"].items() if k != "out_features"}}, "depths"),
    ({"is_hybrid": False}, "backbone_config"),
])
def test_refused_keys_and_wrong_types_are_one_line(change, named):
    with pytest.raises(UserError) as e:
        DPTConfig.from_json({**DPT_HYBRID, **change}, "x/depth_estimator/config.json")
    assert "\n" not in str(e.value) and named in str(e.value) and "x/depth_estimator/config.json" in str(e.value)


@pytest.mark.parametrize("change, named", [
    ({"size": {"shortest_edge": 384}}, "size"),
    ({"resample": 9}, "resample"),
    ({"image_std": [0.5, 0, 0.5]}, "image_std"),
    ({"do_center_crop": True}, "do_center_crop"),
    ({"ensure_multiple_of": 0}, "ensure_multiple_of"),
])
def test_refused_preprocessor_keys_are_one_line(change, named):
    with pytest.raises(UserError) as e:
        Preprocessor.from_json({"size": 384, "resample": 2, **change}, "x/preprocessor_config.json")
    assert "\n" not in str(e.value) and named in str(e.value) and "x/preprocessor_config.json" in str(e.value)


def test_preprocessor_size_as_one_number_is_a_square():
    assert Preprocessor.from_json({"size": 384}).size == Preprocessor.from_json({"size": {"height": 384,
                                                                                         "width": 384}}).size


def test_bit_widths_follow_width_factor():
    backbone = {**DPT_HYBRID["backbone_config"], "width_factor": 2, "hidden_sizes": [21, 35, 50], "num_groups": 8}
    config = BiTConfig.from_json(backbone, "x")
    assert config.hidden_sizes == (40, 72, 104)   # the multiples of 8 nearest to twice the widths (42, 70, 100)


# ---- folders that do not fit ----

def test_weights_that_do_not_fit_the_config_are_one_line(case, tmp_path):
    weights = dict(case.weights)
    weights.pop(next(iter(weights)))
    folder = write_folder(tmp_path, case.layout, case.config, weights, case.preprocessor)
    with pytest.raises(UserError, match="missing") as e:
        load_depth_estimator(folder)
    assert "\n" not in str(e.value)


def test_a_folder_without_weights_or_config_is_one_line(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        load_depth_estimator(tmp_path / "nowhere")
    with pytest.raises(UserError, match="config.json is missing"):
        load_depth_estimator(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(DPT_HYBRID))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 384}))
    with pytest.raises(UserError, match="no weights"):
        load_depth_estimator(tmp_path)


def test_an_image_too_small_for_the_preprocessing_is_one_line():
    preprocess = Preprocessor.from_json({"size": 32, "keep_aspect_ratio": True, "ensure_multiple_of": 32})
    with pytest.raises(UserError, match="too small"):
        preprocess(Image.new("RGB", (200, 3)))
