"""DPT, the Dense Prediction Transformer (Ranftl et al. 2021, "Vision Transformers for Dense Prediction"): an image ->
its relative inverse depth, large where things are near. SD 2's depth-to-image folder ships one (DPT-Hybrid, trained
as MiDaS 3.0) in depth_estimator/ with its preprocessing in feature_extractor/.

  encoder (sec. 3, "Transformer encoder")   the image as tokens: DPT-Hybrid embeds it with a ResNet (BiT: weight-
                                            standardised convolutions and GroupNorm) and takes its stride-16 features
                                            as the patches; DPT-Large (non-hybrid) cuts 16x16 patches. A readout
                                            (CLS) token, position embeddings resized to the image's grid, ViT layers.
  reassemble (sec. 3, eq. 4-5)              four stages' tokens back into images: Read (the readout token projected
                                            into every token), Concatenate (tokens -> a grid), Resample (1x1
                                            convolution, then up or down to strides 4, 8, 16, 32). DPT-Hybrid takes
                                            its first two from the ResNet's stages 1 and 2 as they are.
  fusion (sec. 3, "Convolutional decoder")  RefineNet-like: from the coarsest, each stage adds residual convolution
                                            units of the next finer one and upsamples by 2.
  head (supplementary, "Monocular depth")   3x3 convolution, upsample by 2, 3x3, ReLU, 1x1 -> one channel, ReLU.

Attribute names equal the keys of transformers' DPTForDepthEstimation, so its weights load as they are (the final
LayerNorm of its ViT feeds only outputs the depth head never reads: its weights are left out). The preprocessing is
DPTImageProcessor's (PIL resize, rescale, normalise), read from preprocessor_config.json. transformers runs a hybrid
only on images of its config's image_size (SD 2 depth's preprocessing makes them so) and takes a plain ViT's token
grid to be square; sdlite resizes the position embeddings to any grid (sec. 3, "Image size") and lays the tokens out
as the grid is.

    estimator = load_depth_estimator("stable-diffusion-2-depth")    # or a DPTForDepthEstimation folder
    depth = estimator.estimate(image)                                 # (1, H', W')
    condition = depth_to_condition(depth, (h // 8, w // 8))           # (1, 1, h/8, w/8) in [-1, 1]
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .attention import attention
from .config import ConfigFile, show
from .errors import UserError

# Keys of transformers' configs that cannot change the predicted depth: bookkeeping (versions, model_type, the dtype it
# was saved in: the caller picks the dtype), output switches of transformers' forward, the initialisation of untrained
# weights, the labels and losses of classification and segmentation heads a depth model has none of, and the
# generation settings every config of transformers 4 wrote out (the SD 2 depth folder's nested backbone_config holds
# them all).
NO_EFFECT = {
    "transformers_version", "model_type", "dtype", "torch_dtype", "output_hidden_states", "output_attentions",
    "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "initializer_range", "initializer_factor", "architectures", "torchscript", "use_bfloat16", "pruned_heads",
    "tie_word_embeddings", "is_decoder", "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder",
    "finetuning_task", "tokenizer_class", "prefix", "bos_token_id", "pad_token_id", "eos_token_id", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "tf_legacy_loss",
}
# DPTConfig's keys that sdlite reads, and those of the heads DPTForDepthEstimation does not build (the pooler, the
# segmentation and auxiliary heads) or that transformers does not read (embedding_type: is_hybrid decides).
DPT_IMPLEMENTED = {
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act", "layer_norm_eps",
    "image_size", "patch_size", "qkv_bias", "is_hybrid", "backbone_config", "backbone_featmap_shape",
    "backbone_out_indices", "neck_ignore_stages", "reassemble_factors", "neck_hidden_sizes", "fusion_hidden_size",
    "use_bias_in_fusion_residual", "readout_type", "num_channels",
    "pooler_output_size", "pooler_act", "use_auxiliary_head", "auxiliary_loss_weight", "semantic_loss_ignore_index",
    "semantic_classifier_dropout", "embedding_type",
} | NO_EFFECT
# Dropout acts in training only, which sdlite runs without; the others are architectures sdlite does not build.
DPT_REFUSED = {
    "hidden_dropout_prob": (0, 0.0), "attention_probs_dropout_prob": (0, 0.0), "add_projection": (False,),
    "use_batch_norm_in_fusion_residual": (False, None), "head_in_index": (-1,), "backbone": (None,),
    "use_pretrained_backbone": (False,), "use_timm_backbone": (False,), "backbone_kwargs": (None, {}),
}
# BitConfig's keys (the hybrid's ResNet): DPT reads the three stages stage1..stage3 of a "bottleneck" (ResNet v1.5)
# BiT with TensorFlow's "SAME" padding, as DPT-Hybrid has it.
BIT_IMPLEMENTED = {
    "embedding_size", "hidden_sizes", "depths", "num_groups", "width_factor", "hidden_act", "num_channels",
    "out_features", "out_indices", "stage_names", "layer_type", "global_padding", "embedding_dynamic_padding",
} | NO_EFFECT
BIT_REFUSED = {"drop_path_rate": (0, 0.0), "output_stride": (32,)}
PREPROCESSOR_KEYS = {
    "do_resize", "size", "resample", "keep_aspect_ratio", "ensure_multiple_of", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std", "do_pad", "size_divisor",
    # the names of the class that wrote it; labels of segmentation maps; RGB conversion (sdlite passes RGB images)
    "image_processor_type", "feature_extractor_type", "processor_class", "do_reduce_labels", "do_convert_rgb",
}
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin")
# transformers' BitConfig for a hybrid DPTConfig without one (its defaults for the keys not given)
HYBRID_BACKBONE = {"global_padding": "same", "layer_type": "bottleneck", "depths": [3, 4, 9],
                   "out_features": ["stage1", "stage2", "stage3"], "embedding_dynamic_padding": True}
UNUSED_WEIGHTS = ("dpt.layernorm.",)   # the ViT's final LayerNorm: it feeds an output the depth head never reads


@dataclass
class BiTConfig:
    """The hybrid's ResNet (Kolesnikov et al. 2020, "Big Transfer"): a stem, then stages of bottleneck blocks. Defaults
    are DPT-Hybrid's (ResNet-50's first three stages)."""
    embedding_size: int = 64
    hidden_sizes: tuple[int, ...] = (256, 512, 1024)
    depths: tuple[int, ...] = (3, 4, 9)
    num_groups: int = 32

    @classmethod
    def from_json(cls, config: dict, where: str) -> "BiTConfig":
        c = ConfigFile(config, where, BIT_IMPLEMENTED, BIT_REFUSED)
        c.choice("layer_type", "preactivation", ("bottleneck",))
        if c.get("global_padding", "", str).upper() != "SAME":
            raise UserError(f"{where}: global_padding = {show(config.get('global_padding'))} is not supported by "
                            "sdlite (only \"SAME\", as DPT-Hybrid has it)")
        if not c.get("embedding_dynamic_padding", False, bool):
            raise UserError(f"{where}: embedding_dynamic_padding must be true (the stem's max-pool padded \"SAME\", "
                            "as DPT-Hybrid has it)")
        c.choice("hidden_act", "relu", ("relu",))
        depths = c.list_of("depths", [3, 4, 6, 3], int)
        stages = [f"stage{i}" for i in (1, 2, 3)]
        if len(depths) != 3 or c.list_of("out_features", ["stage3"], str) != tuple(stages):
            raise UserError(f"{where}: DPT-Hybrid's ResNet has 3 stages, all read (depths of 3 values, out_features "
                            f"{show(stages)}), not depths = {show(config.get('depths'))}")
        if c.get("num_channels", 3, int) != 3:
            raise UserError(f"{where}: num_channels must be 3 (RGB), not {show(config['num_channels'])}")
        width = c.get("width_factor", 1, int)
        hidden_sizes = c.list_of("hidden_sizes", [256, 512, 1024, 2048], int)
        if len(hidden_sizes) < 3 or width < 1 or min(hidden_sizes + depths) < 1:
            raise UserError(f"{where}: hidden_sizes needs a positive width for each of the 3 stages and depths and "
                            "width_factor must be positive")
        result = cls(embedding_size=c.get("embedding_size", 64, int),
                     hidden_sizes=tuple(round_to_8(w * width) for w in hidden_sizes[:3]),
                     depths=depths, num_groups=c.get("num_groups", 32, int))
        if any(w % result.num_groups for w in [result.embedding_size, *result.hidden_sizes, *map(bottleneck,
                                                                                              result.hidden_sizes)]):
            raise UserError(f"{where}: num_groups ({result.num_groups}) must divide every width of the ResNet")
        return result


def round_to_8(width: float) -> int:
    """BiT's channel counts: the nearest multiple of 8 (at least 8), one more 8 if that lost over 10%."""
    rounded = max(8, int(width + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * width else rounded


def bottleneck(width: int) -> int:
    """The width inside a bottleneck block: a quarter of its output's."""
    return round_to_8(width * 0.25)


@dataclass
class DPTConfig:
    """Defaults are DPT-Hybrid's (Intel/dpt-hybrid-midas, SD 2 depth's depth_estimator/); `backbone` None is the plain
    ViT of DPT-Large."""
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-12
    image_size: int = 384                # of the position embeddings' grid: image_size / patch_size a side
    patch_size: int = 16
    qkv_bias: bool = True
    backbone: BiTConfig | None = field(default_factory=BiTConfig)
    backbone_out_indices: tuple[int, ...] = (2, 5, 8, 11)   # the ViT layers reassembled (the hybrid's last two)
    reassemble_factors: tuple[float, ...] = (1, 1, 1, 0.5)
    neck_hidden_sizes: tuple[int, ...] = (256, 512, 768, 768)
    fusion_hidden_size: int = 256
    use_bias_in_fusion_residual: bool = True

    @classmethod
    def from_json(cls, config: dict, where="depth_estimator/config.json") -> "DPTConfig":
        """From a transformers DPTForDepthEstimation config.json; a key sdlite cannot honour, or a value of the wrong
        type, is a UserError naming it."""
        c = ConfigFile(config, where, DPT_IMPLEMENTED, DPT_REFUSED)
        architectures = c.list_of("architectures", ["DPTForDepthEstimation"], str)
        if architectures != ("DPTForDepthEstimation",):
            raise UserError(f"{where}: architectures = {show(config['architectures'])[:60]} is not supported by "
                            "sdlite (only DPTForDepthEstimation)")
        c.choice("hidden_act", "gelu", ("gelu",))
        c.choice("readout_type", "project", ("project",))
        if c.get("num_channels", 3, int) != 3:
            raise UserError(f"{where}: num_channels must be 3 (RGB), not {show(config['num_channels'])}")
        hybrid = c.get("is_hybrid", False, bool)
        backbone = None
        if hybrid:
            backbone = BiTConfig.from_json(config.get("backbone_config") or HYBRID_BACKBONE, f"{where} backbone_config")
            if c.list_of("backbone_featmap_shape", [1, 1024, 24, 24], int, 4)[1] != backbone.hidden_sizes[-1]:
                raise UserError(f"{where}: backbone_featmap_shape = {show(config['backbone_featmap_shape'])} does not "
                                f"have the ResNet's last width ({backbone.hidden_sizes[-1]}) as its channels")
        elif config.get("backbone_config") is not None:
            raise UserError(f"{where}: a backbone_config without is_hybrid (DINOv2, Swin, BEiT... backbones) is not "
                            "supported by sdlite (only DPT-Hybrid and the plain ViT of DPT-Large)")
        expected = [0, 1] if hybrid else []
        if config.get("neck_ignore_stages", expected) != expected:
            raise UserError(f"{where}: neck_ignore_stages = {show(config['neck_ignore_stages'])[:40]} is not supported "
                            f"by sdlite (only {expected} {'with' if hybrid else 'without'} is_hybrid)")
        bias = c.optional("use_bias_in_fusion_residual", bool)
        result = cls(
            hidden_size=c.get("hidden_size", 768, int), num_hidden_layers=c.get("num_hidden_layers", 12, int),
            num_attention_heads=c.get("num_attention_heads", 12, int),
            intermediate_size=c.get("intermediate_size", 3072, int),
            layer_norm_eps=c.get("layer_norm_eps", 1e-12, float), image_size=c.get("image_size", 384, int),
            patch_size=c.get("patch_size", 16, int), qkv_bias=c.get("qkv_bias", True, bool), backbone=backbone,
            backbone_out_indices=c.list_of("backbone_out_indices", [2, 5, 8, 11], int),
            reassemble_factors=c.list_of("reassemble_factors", [4, 2, 1, 0.5], float),
            neck_hidden_sizes=c.list_of("neck_hidden_sizes", [96, 192, 384, 768], int),
            fusion_hidden_size=c.get("fusion_hidden_size", 256, int),
            use_bias_in_fusion_residual=True if bias is None else bias,   # None: a bias unless batch norm (refused)
        )
        result.check(where)
        return result

    def check(self, where: str) -> None:
        stages = len(self.neck_hidden_sizes)
        if not (len(self.backbone_out_indices) == len(self.reassemble_factors) == stages):
            raise UserError(f"{where}: backbone_out_indices, reassemble_factors and neck_hidden_sizes must have one "
                            "value for each reassembled stage, as many each")
        read = self.backbone_out_indices[2:] if self.backbone else self.backbone_out_indices
        if not all(0 <= i < self.num_hidden_layers for i in read) or len(set(read)) < len(read):
            raise UserError(f"{where}: backbone_out_indices {list(self.backbone_out_indices)} must be distinct layers "
                            f"0 .. {self.num_hidden_layers - 1} of the ViT")
        if self.backbone and (stages < 3 or tuple(self.neck_hidden_sizes[:2]) != self.backbone.hidden_sizes[:2]):
            raise UserError(f"{where}: DPT-Hybrid's first two neck_hidden_sizes must be its ResNet's stage 1 and 2 "
                            f"widths {list(self.backbone.hidden_sizes[:2])}, not {list(self.neck_hidden_sizes[:2])}")
        for factor in self.reassemble_factors:
            if not (factor >= 1 and factor == int(factor) or 0 < factor < 1 and 1 / factor == int(1 / factor)):
                raise UserError(f"{where}: reassemble factor {factor} must be a whole number or 1/n, n whole")
        sizes = [self.hidden_size, self.num_hidden_layers, self.num_attention_heads, self.intermediate_size,
                 self.patch_size, self.image_size // self.patch_size, self.fusion_hidden_size // 2,
                 *self.neck_hidden_sizes]
        if min(sizes) < 1 or self.hidden_size % self.num_attention_heads or self.layer_norm_eps <= 0:
            raise UserError(f"{where}: sizes must be positive, hidden_size ({self.hidden_size}) a multiple of "
                            f"num_attention_heads ({self.num_attention_heads}) and layer_norm_eps positive")


# ---- the hybrid's ResNet (BiT) ----

def same_padding(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow's "SAME" padding: pad so that the output has ceil(size / stride) positions, the odd pixel after."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):   # F.pad's order: the last dimension first
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class WeightStandardizedConv2d(nn.Conv2d):
    """A convolution whose kernel is standardised per output channel before use, w' = (w - mean) / sqrt(var + eps)
    (Qiao et al. 2019, "Weight Standardization", eq. 5; BiT sec. 2.4; eps 1e-8), with "SAME" padding and no bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        w = (w - mean) / torch.sqrt(var + 1e-8)
        return F.conv2d(same_padding(x, self.kernel_size[0], self.stride[0]), w, None, self.stride)


class BottleneckLayer(nn.Module):
    """ResNet v1.5's bottleneck (BiT's "bottleneck" layer_type), the stride on the 3x3:
    relu(x' + norm(1x1(relu(norm(3x3(relu(norm(1x1 x)))))))), where x' is x, or in a stage's first block a strided 1x1
    projection with GroupNorm."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int, first: bool):
        super().__init__()
        mid = bottleneck(out_channels)
        if first:
            self.downsample = nn.ModuleDict({"conv": WeightStandardizedConv2d(in_channels, out_channels, 1, stride),
                                             "norm": nn.GroupNorm(groups, out_channels)})
        self.conv1 = WeightStandardizedConv2d(in_channels, mid, 1)
        self.norm1 = nn.GroupNorm(groups, mid)
        self.conv2 = WeightStandardizedConv2d(mid, mid, 3, stride)
        self.norm2 = nn.GroupNorm(groups, mid)
        self.conv3 = WeightStandardizedConv2d(mid, out_channels, 1)
        self.norm3 = nn.GroupNorm(groups, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample.norm(self.downsample.conv(x)) if hasattr(self, "downsample") else x
        h = F.relu(self.norm1(self.conv1(x)))
        h = F.relu(self.norm2(self.conv2(h)))
        return F.relu(self.norm3(self.conv3(h)) + shortcut)


class BiT(nn.Module):
    """The stem (7x7 convolution, stride 2, GroupNorm, ReLU, 3x3 max-pool, stride 2: stride 4), then the stages
    (strides 1, 2, 2: 4, 8, 16); the output of every stage."""

    def __init__(self, config: BiTConfig):
        super().__init__()
        c = config
        self.embedder = nn.ModuleDict({"convolution": WeightStandardizedConv2d(3, c.embedding_size, 7, 2),
                                       "norm": nn.GroupNorm(c.num_groups, c.embedding_size)})
        stages, width = [], c.embedding_size
        for i, (out, depth) in enumerate(zip(c.hidden_sizes, c.depths)):
            layers = [BottleneckLayer(width if j == 0 else out, out, 2 if i and j == 0 else 1, c.num_groups, j == 0)
                      for j in range(depth)]
            stages.append(nn.ModuleDict({"layers": nn.Sequential(*layers)}))
            width = out
        self.encoder = nn.ModuleDict({"stages": nn.ModuleList(stages)})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu(self.embedder.norm(self.embedder.convolution(x)))
        x = F.max_pool2d(same_padding(x, 3, 2), 3, 2)   # the padding's zeros are no larger than anything after ReLU
        features = []
        for stage in self.encoder.stages:
            x = stage.layers(x)
            features.append(x)
        return features


# ---- the transformer encoder ----

class HybridEmbeddings(nn.Module):
    """DPT-Hybrid's tokens (sec. 3, "Transformer encoder", hybrid): the ResNet's stride-16 features, each position
    projected (1x1) to a token."""

    def __init__(self, config: DPTConfig):
        super().__init__()
        self.backbone = nn.ModuleDict({"bit": BiT(config.backbone)})
        self.projection = nn.Conv2d(config.backbone.hidden_sizes[-1], config.hidden_size, 1)
        add_readout_and_positions(self, config)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, 3, H, W) -> the tokens with their grid's shape, and the ResNet's stage 1 and 2 features."""
        features = self.backbone.bit(pixels)
        return self.projection(features[-1]), features[:2]


class PatchEmbeddings(nn.Module):
    """DPT-Large's tokens (sec. 3, "Transformer encoder"): each 16x16 patch projected linearly (a strided
    convolution)."""

    def __init__(self, config: DPTConfig):
        super().__init__()
        p = config.patch_size
        self.patch_embeddings = nn.ModuleDict({"projection": nn.Conv2d(3, config.hidden_size, p, stride=p)})
        add_readout_and_positions(self, config)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.patch_embeddings.projection(pixels), []


def add_readout_and_positions(embeddings: nn.Module, config: DPTConfig) -> None:
    """The readout token (ViT's CLS) and the learnt position embeddings of the training grid, readout's first."""
    grid = config.image_size // config.patch_size
    embeddings.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
    embeddings.position_embeddings = nn.Parameter(torch.zeros(1, grid * grid + 1, config.hidden_size))


def positions_for(position_embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The training grid's position embeddings resized (bilinear) to a grid of height x width tokens (sec. 3, "Image
    size": "we linearly interpolate the position embeddings to the appropriate size"); the readout's as it is."""
    readout, grid = position_embeddings[:, :1], position_embeddings[0, 1:]
    side = math.isqrt(grid.shape[0])
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
    return torch.cat([readout, grid.flatten(2).transpose(1, 2)], dim=1)


class ViTLayer(nn.Module):
    """A pre-LayerNorm transformer layer: x + attention(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, config: DPTConfig):
        super().__init__()
        d, bias = config.hidden_size, config.qkv_bias
        self.heads = config.num_attention_heads
        self.layernorm_before = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.attention = nn.ModuleDict({
            "attention": nn.ModuleDict({name: nn.Linear(d, d, bias=bias) for name in ("query", "key", "value")}),
            "output": nn.ModuleDict({"dense": nn.Linear(d, d)})})
        self.layernorm_after = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(d, config.intermediate_size)})
        self.output = nn.ModuleDict({"dense": nn.Linear(config.intermediate_size, d)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attention.attention
        h = self.layernorm_before(x)
        x = x + self.attention.output.dense(attention(a.query(h), a.key(h), a.value(h), self.heads))
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


class ViT(nn.Module):
    """Embeddings, then the layers; returns the tokens of the layers the neck reassembles."""

    def __init__(self, config: DPTConfig):
        super().__init__()
        self.config = config
        self.embeddings = HybridEmbeddings(config) if config.backbone else PatchEmbeddings(config)
        layers = nn.ModuleList(ViTLayer(config) for _ in range(config.num_hidden_layers))
        self.encoder = nn.ModuleDict({"layer": layers})

    def forward(self, pixels: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """(B, 3, H, W) -> the ResNet's stage 1 and 2 features (hybrid), then each read layer's tokens (B, 1 + h*w, D);
        and the token grid (h, w)."""
        c, e = self.config, self.embeddings
        patches, features = e(pixels)                              # (B, D, h, w)
        grid = (pixels.shape[2] // c.patch_size, pixels.shape[3] // c.patch_size)
        if patches.shape[2:] != grid:
            raise UserError(f"DPT: a {pixels.shape[2]}x{pixels.shape[3]} input makes a {tuple(patches.shape[2:])} grid "
                            f"of features, not {grid}: give the preprocessor sizes that are multiples of "
                            f"{c.patch_size} (ensure_multiple_of)")
        x = patches.flatten(2).transpose(1, 2)                      # (B, h*w, D)
        x = torch.cat([e.cls_token.expand(len(x), -1, -1), x], dim=1) + positions_for(e.position_embeddings, *grid)
        read = c.backbone_out_indices[2:] if c.backbone else c.backbone_out_indices
        for i, layer in enumerate(self.encoder.layer[:max(read) + 1]):
            x = layer(x)
            if i in read:
                features.append(x)
        return features, grid


# ---- reassemble, fusion, head ----

class Reassemble(nn.Module):
    """Reassemble (sec. 3, eq. 4-5): Read, the readout token concatenated to every token and projected back to D with
    GELU ("project"); Concatenate, the tokens laid out as their grid; Resample, a 1x1 convolution to the stage's width
    and a resize by the stage's factor (a transposed convolution up, a strided 3x3 convolution down). The hybrid's
    first two stages are the ResNet's features and pass as they are (nn.Identity keeps the checkpoint's numbering)."""

    def __init__(self, config: DPTConfig):
        super().__init__()
        d = config.hidden_size
        self.readout_projects, self.layers = nn.ModuleList(), nn.ModuleList()
        for i, (width, factor) in enumerate(zip(config.neck_hidden_sizes, config.reassemble_factors)):
            if config.backbone and i < 2:
                self.readout_projects.append(nn.Identity())
                self.layers.append(nn.Identity())
                continue
            self.readout_projects.append(nn.Sequential(nn.Linear(2 * d, d), nn.GELU()))
            if factor > 1:
                resize = nn.ConvTranspose2d(width, width, int(factor), stride=int(factor))
            elif factor == 1:
                resize = nn.Identity()
            else:
                resize = nn.Conv2d(width, width, 3, stride=round(1 / factor), padding=1)
            self.layers.append(nn.ModuleDict({"projection": nn.Conv2d(d, width, 1), "resize": resize}))

    def forward(self, features: list[torch.Tensor], grid: tuple[int, int]) -> list[torch.Tensor]:
        out = []
        for x, read, layer in zip(features, self.readout_projects, self.layers):
            if x.ndim == 3:                                          # tokens (B, 1 + h*w, D)
                readout, tokens = x[:, :1], x[:, 1:]
                tokens = read(torch.cat([tokens, readout.expand_as(tokens)], dim=-1))
                x = tokens.transpose(1, 2).reshape(len(x), -1, *grid)   # (B, D, h, w)
                x = layer.resize(layer.projection(x))
            out.append(x)
        return out


class ResidualConvUnit(nn.Module):
    """x + conv(relu(conv(relu(x)))), 3x3 convolutions (the pre-activation residual unit of RefineNet)."""

    def __init__(self, width: int, bias: bool):
        super().__init__()
        self.convolution1 = nn.Conv2d(width, width, 3, padding=1, bias=bias)
        self.convolution2 = nn.Conv2d(width, width, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.convolution2(F.relu(self.convolution1(F.relu(x))))


class FusionLayer(nn.Module):
    """One fusion block (sec. 3, "Convolutional decoder", fig. 1 right): the coarser result plus a residual unit of
    this stage's features (resized bilinearly to it if their sizes differ), a residual unit, upsample by 2 (bilinear,
    corners aligned), a 1x1 projection."""

    def __init__(self, width: int, bias: bool):
        super().__init__()
        self.residual_layer1 = ResidualConvUnit(width, bias)
        self.residual_layer2 = ResidualConvUnit(width, bias)
        self.projection = nn.Conv2d(width, width, 1)

    def forward(self, x: torch.Tensor, stage: torch.Tensor | None = None) -> torch.Tensor:
        if stage is not None:
            if stage.shape != x.shape:
                stage = F.interpolate(stage, size=x.shape[2:], mode="bilinear", align_corners=False)
            x = x + self.residual_layer1(stage)
        x = F.interpolate(self.residual_layer2(x), scale_factor=2, mode="bilinear", align_corners=True)
        return self.projection(x)


class Neck(nn.Module):
    """Reassemble the stages, bring each to the fusion width (3x3, no bias), fuse from the coarsest to the finest."""

    def __init__(self, config: DPTConfig):
        super().__init__()
        f = config.fusion_hidden_size
        self.reassemble_stage = Reassemble(config)
        self.convs = nn.ModuleList(nn.Conv2d(w, f, 3, padding=1, bias=False) for w in config.neck_hidden_sizes)
        self.fusion_stage = nn.ModuleDict({"layers": nn.ModuleList(
            FusionLayer(f, config.use_bias_in_fusion_residual) for _ in config.neck_hidden_sizes)})

    def forward(self, features: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        stages = [conv(x) for conv, x in zip(self.convs, self.reassemble_stage(features, grid))]
        fusion = self.fusion_stage.layers
        x = fusion[0](stages[-1])
        for layer, stage in zip(fusion[1:], reversed(stages[:-1])):
            x = layer(x, stage)
        return x


class DPTForDepthEstimation(nn.Module):
    """Pixels (B, 3, H, W), preprocessed -> relative inverse depth (B, H', W'), >= 0 (H' = H for sizes the fusion
    halves evenly)."""

    def __init__(self, config: DPTConfig):
        super().__init__()
        f = config.fusion_hidden_size
        self.dpt = ViT(config)
        self.neck = Neck(config)
        self.head = nn.ModuleDict({"head": nn.Sequential(
            nn.Conv2d(f, f // 2, 3, padding=1), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(f // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 1, 1), nn.ReLU())})

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features, grid = self.dpt(pixels)
        return self.head.head(self.neck(features, grid)).squeeze(1)


# ---- preprocessing ----

@dataclass
class Preprocessor:
    """DPTImageProcessor's steps: resize (PIL), rescale (x * factor), normalise ((x - mean) / std), pad."""
    size: tuple[int, int] | None = (384, 384)     # (height, width); None: not resized
    resample: int = Image.Resampling.BICUBIC
    keep_aspect_ratio: bool = False
    ensure_multiple_of: int = 1
    rescale_factor: float | None = 1 / 255        # None: not rescaled
    mean: tuple[float, ...] | None = (0.5, 0.5, 0.5)   # None: not normalised
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    size_divisor: int | None = None               # pad (centred, zeros) to multiples of it

    @classmethod
    def from_json(cls, config: dict, where="feature_extractor/preprocessor_config.json") -> "Preprocessor":
        c = ConfigFile(config, where, PREPROCESSOR_KEYS, {})
        size = None
        if c.get("do_resize", True, bool):
            size = config.get("size", {"height": 384, "width": 384})
            if type(size) is int:
                size = {"height": size, "width": size}
            if not (isinstance(size, dict) and set(size) == {"height", "width"}
                    and all(type(s) is int and s > 0 for s in size.values())):
                raise UserError(f"{where}: size = {show(config.get('size'))[:60]} is not supported by sdlite (only "
                                "a positive integer or {\"height\": H, \"width\": W})")
            size = (size["height"], size["width"])
        resample = c.get("resample", int(Image.Resampling.BICUBIC), int)
        if resample not in {int(r) for r in Image.Resampling}:
            c.fail("resample", "a PIL resampling filter (0 to 5)")
        multiple = c.get("ensure_multiple_of", 1, int)
        mean = std = None
        if c.get("do_normalize", True, bool):
            mean = c.list_of("image_mean", [0.5] * 3, float, 3)
            std = c.list_of("image_std", [0.5] * 3, float, 3)
            if min(abs(s) for s in std) == 0:
                c.fail("image_std", "three non-zero numbers")
        divisor = c.optional("size_divisor", int) if c.get("do_pad", False, bool) else None
        if multiple < 1 or (divisor is not None and divisor < 1):
            raise UserError(f"{where}: ensure_multiple_of and size_divisor must be positive")
        return cls(size=size, resample=resample, keep_aspect_ratio=c.get("keep_aspect_ratio", False, bool),
                   ensure_multiple_of=multiple,
                   rescale_factor=c.get("rescale_factor", 1 / 255, float) if c.get("do_rescale", True, bool) else None,
                   mean=mean, std=std or cls.std, size_divisor=divisor)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The size scaled to `size`; with keep_aspect_ratio both sides by the factor nearer to 1 (the image changes
        least); each side rounded to the nearest multiple of ensure_multiple_of (Python's round: halves to even)."""
        scale_h, scale_w = self.size[0] / height, self.size[1] / width
        if self.keep_aspect_ratio:
            scale_h = scale_w = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h
        m = self.ensure_multiple_of
        return round(scale_h * height / m) * m, round(scale_w * width / m) * m

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """A PIL image -> pixels (1, 3, H, W) float32."""
        image = image.convert("RGB")
        if self.size is not None:
            height, width = self.resized_size(image.height, image.width)
            if min(height, width) < 1:
                raise UserError(f"a {image.width}x{image.height} image is too small for the depth estimator (it "
                                "would be resized to nothing): give a larger image")
            image = image.resize((width, height), resample=self.resample)
        x = np.asarray(image)                                          # (H, W, 3) uint8
        x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32) if self.rescale_factor is not None \
            else x.astype(np.float32)
        if self.mean is not None:
            x = (x - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        x = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
        if self.size_divisor is not None:
            pads = []
            for side in (x.shape[3], x.shape[2]):
                total = -side % self.size_divisor
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return x


# ---- loading, and the API ----

class DepthEstimator:
    """A DPT with its preprocessing."""

    def __init__(self, model: DPTForDepthEstimation, preprocess: Preprocessor):
        self.model, self.preprocess = model.eval(), preprocess

    @torch.no_grad()
    def estimate(self, image: Image.Image) -> torch.Tensor:
        """The relative inverse depth (1, H', W') float32 of the preprocessed image (H' x W' is the preprocessed size,
        not the image's; depth_to_condition resizes it)."""
        weight = next(self.model.parameters())
        return self.model(self.preprocess(image).to(weight.device, weight.dtype)).float()


def load_depth_estimator(folder: str | Path, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu") -> DepthEstimator:
    """From SD 2 depth's folder (its depth_estimator/ and feature_extractor/) or from a transformers
    DPTForDepthEstimation folder (config.json, model.safetensors and preprocessor_config.json in one)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"depth model not found: {folder} is not a folder (give SD 2 depth's folder or a "
                        "DPTForDepthEstimation folder)")
    if (folder / "depth_estimator").is_dir():
        model_folder = folder / "depth_estimator"
        preprocessor_json = folder / "feature_extractor" / "preprocessor_config.json"
    else:
        model_folder, preprocessor_json = folder, folder / "preprocessor_config.json"
    config = DPTConfig.from_json(read_json(model_folder / "config.json"), str(model_folder / "config.json"))
    preprocess = Preprocessor.from_json(read_json(preprocessor_json), str(preprocessor_json))
    weights = next((model_folder / name for name in WEIGHTS_FILES if (model_folder / name).is_file()), None)
    if weights is None:
        raise UserError(f"{model_folder}: no weights ({' or '.join(WEIGHTS_FILES[:2])}) for the depth estimator")
    from .checkpoint import read_state_dict     # here: checkpoint imports the pipeline, which may import this module
    state_dict = {k: v for k, v in read_state_dict(weights, dtype).items() if not k.startswith(UNUSED_WEIGHTS)}
    with torch.device("meta"):
        model = DPTForDepthEstimation(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    wrong = [f"{state_dict[k].shape} for {k}" for k, v in model.state_dict().items()
             if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong:
        problem = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                   else f"shape {wrong[0]}")
        raise UserError(f"{weights}: the weights do not fit {model_folder / 'config.json'} ({problem}, and "
                        f"{len(missing) + len(unexpected) + len(wrong) - 1} more)")
    return DepthEstimator(model.to(device=device, dtype=dtype), preprocess)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} is missing: the depth estimator needs it")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def read_depth_map(depth_map: Image.Image | str | Path | torch.Tensor) -> torch.Tensor:
    """A depth map as given to depth2img -> (1, H, W) float32, larger = nearer (inverse depth, as DPT predicts it;
    only the order matters, depth_to_condition rescales it): an image's grey levels (16-bit and float images as they
    are, colour ones as luma), or a (H, W) / (1, H, W) tensor."""
    if isinstance(depth_map, torch.Tensor):
        if not (depth_map.ndim == 2 or depth_map.ndim == 3 and depth_map.shape[0] == 1) or not depth_map.numel():
            raise UserError(f"a depth map tensor must be (H, W) or (1, H, W), not {tuple(depth_map.shape)}")
        return depth_map.reshape(1, *depth_map.shape[-2:]).float()
    if not isinstance(depth_map, Image.Image):
        try:
            depth_map = Image.open(depth_map)
            depth_map.load()
        except (OSError, ValueError) as e:   # missing, unreadable, not an image
            raise UserError(f"depth map {depth_map}: cannot be read as an image ({e})") from None
    if depth_map.mode not in ("I;16", "I", "F"):
        depth_map = depth_map.convert("L")
    return torch.from_numpy(np.asarray(depth_map).astype(np.float32))[None]


def depth_to_condition(depth: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """The depth (B, H', W') as SD 2 depth's UNet takes it beside the latents (its 5th input channel): resized to the
    latents' size (bicubic) and scaled per image to [-1, 1] (inverse depth: the nearest point is 1), as diffusers'
    StableDiffusionDepth2ImgPipeline.prepare_depth_map does. -> (B, 1, h, w) float32.

    A flat map (the same value everywhere) is refused: the scaling would divide by zero (diffusers gives NaN)."""
    depth = F.interpolate(depth.float()[:, None], size=tuple(latent_hw), mode="bicubic", align_corners=False)
    low = depth.amin(dim=(1, 2, 3), keepdim=True)
    high = depth.amax(dim=(1, 2, 3), keepdim=True)
    if bool((high == low).any()):
        raise UserError("the depth map is the same everywhere: it tells nothing about depth; give one that varies")
    return 2 * (depth - low) / (high - low) - 1
