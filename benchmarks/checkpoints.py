"""Full-size Stable Diffusion 1.5 and 2.1 checkpoints with random weights, in both official layouts, for the parity
and speed benchmarks. Written once under /tmp/sdbench (about 19 GB) and reused:

  /tmp/sdbench/sd1/              diffusers folder (save_pretrained, fp32), the SD 1.5 Hub scheduler config
  /tmp/sdbench/sd1.safetensors   the same weights in the original single-file layout (model.diffusion_model.*,
                                 first_stage_model.*, cond_stage_model.transformer.* OpenAI CLIP), fp32
  /tmp/sdbench/sd2/, sd2.safetensors   the same for SD 2.1 (OpenCLIP text keys with the unused last block)

The architectures are the official configs; only the weights are random. Each matrix is drawn with variance 1/fan_in,
norm scales around 1 and small biases, so that activations keep the scale trained weights give them (about unit
variance after every normalisation) instead of exploding or vanishing through the depth of the networks.
"""
import json
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
from make_schedulers import SD1, SD2  # noqa: E402
from make_text import hf_names, make_tokenizer_folders, to_openai, to_openclip  # noqa: E402
from make_unet import ldm_key  # noqa: E402
from make_vae import to_ldm as vae_ldm_key  # noqa: E402

WHERE = Path("/tmp/sdbench")
CROSS, PLAIN, CROSS_UP, PLAIN_UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, down_block_types=(CROSS,) * 3 + (PLAIN,),
            up_block_types=(PLAIN_UP,) + (CROSS_UP,) * 3)
TEXT = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
# the stable-diffusion-v1-5 and stable-diffusion-2-1 Hub configs (unet/, text_encoder/, vae/config.json)
FAMILIES = {
    "sd1": dict(unet=dict(UNET, attention_head_dim=8, cross_attention_dim=768, sample_size=64),
                text=dict(TEXT, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          hidden_act="quick_gelu", pad_token_id=49407),
                scheduler=SD1, tokenizer="sd1", side=512),
    "sd2": dict(unet=dict(UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, sample_size=96,
                          use_linear_projection=True, upcast_attention=True),
                text=dict(TEXT, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                          num_attention_heads=16, hidden_act="gelu", pad_token_id=0),
                scheduler=SD2, tokenizer="sd2_legacy", side=768),
}
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def folder(family: str) -> Path:
    """The diffusers folder of `family`, written first if missing."""
    make(family)
    return WHERE / family


def single_file(family: str) -> Path:
    """The single file of `family`, written first if missing."""
    make(family)
    return WHERE / f"{family}.safetensors"


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Weights of variance 1/fan_in, norm scales 1 + N(0, 0.1^2), biases and embeddings N(0, 0.02^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif p.ndim > 1 and "embedding" not in name:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.02 * noise)


def original_layout(pipe: StableDiffusionPipeline, family: str) -> dict[str, torch.Tensor]:
    """The pipeline's weights under the original (CompVis / Stability) single-file names."""
    unet = pipe.unet
    with_attention = {i for i, block in enumerate(unet.up_blocks) if hasattr(block, "attentions")}
    sd = {"model.diffusion_model." + ldm_key(k, unet.config.layers_per_block, with_attention): v
          for k, v in unet.state_dict().items()}
    for k, v in pipe.vae.state_dict().items():
        conv_1x1 = "attentions" in k and k.endswith("weight") and v.ndim == 2
        sd["first_stage_model." + vae_ldm_key(k, 4)] = v[:, :, None, None] if conv_1x1 else v
    text = hf_names(pipe.text_encoder)
    sd |= to_openai(text) if family == "sd1" else to_openclip(text, seed=0)
    return {k: v.contiguous() for k, v in sd.items()}


def make(family: str) -> None:
    """Writes the folder and the single file of `family` unless they are there (`done` is written last)."""
    done = WHERE / f"{family}.done"
    if done.exists():
        return
    spec = FAMILIES[family]
    print(f"writing random full-size {family} checkpoints under {WHERE} (once)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(make_tokenizer_folders(Path(tmp))[spec["tokenizer"]])
    text_encoder = CLIPTextModel(CLIPTextConfig(**spec["text"])).eval()
    unet = UNet2DConditionModel(**spec["unet"]).eval()
    vae = AutoencoderKL(**VAE, sample_size=spec["side"]).eval()
    for seed, module in enumerate((text_encoder, unet, vae)):
        randomise(module, seed)
    scheduler = (PNDMScheduler if spec["scheduler"]["_class_name"] == "PNDMScheduler" else DDIMScheduler)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler.from_config(spec["scheduler"]), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(WHERE / family)
    (WHERE / family / "scheduler" / "scheduler_config.json").write_text(json.dumps(spec["scheduler"], indent=2))
    save_file(original_layout(pipe, family), WHERE / f"{family}.safetensors")
    done.touch()


if __name__ == "__main__":
    for name in FAMILIES:
        make(name)
