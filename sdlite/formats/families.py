"""The model families: what a checkpoint does not say about itself but its family's convention decides.

A single file holds weights only. Which scheduler the model was trained with, what it predicts, at which image size it
works best and how its tokenizer pads are conventions of the family, which the family's diffusers folders state in
their scheduler_config.json, unet/config.json and tokenizer/ files. One record per family holds them; the loader
tells the family from the weights (the text encoder's layout, the UNet's input channels), the trainer starts from one.
"""
from dataclasses import dataclass

# SD's training schedule (Rombach et al. 2022, appendix: 1000 steps, "scaled linear" betas 0.00085 .. 0.012), as the
# official folders' scheduler_config.json state it; SD 1.x folders name PNDM as the sampler, SD 2.x folders DDIM.
SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "trained_betas": None}
PNDM_SCHEDULER = {"_class_name": "PNDMScheduler", **SD_BETAS, "steps_offset": 1, "skip_prk_steps": True,
                  "set_alpha_to_one": False, "clip_sample": False}
DDIM_SCHEDULER = {**PNDM_SCHEDULER, "_class_name": "DDIMScheduler"}


@dataclass(frozen=True)
class Family:
    name: str
    scheduler: dict            # the scheduler_config.json of the family's folders, but for prediction_type
    prediction_type: str       # what the UNet predicts: "epsilon" (the noise) or "v_prediction" (Salimans & Ho 2022)
    image_size: int            # the image side it was trained at (the folders' unet sample_size x 8)
    pad_id: int | None         # the token id prompts are padded with up to 77 (None: the model reads no text)
    text_encoder: str | None   # its single files' text encoder layout: "openai" (CLIP ViT-L/14), "openclip" (ViT-H/14)
    unet_in_channels: int = 4  # the UNet's input: 4 latent channels, 9 for inpainting (latents, mask, masked image),
                               # 5 for depth-to-image (latents, depth map)

    def scheduler_config(self) -> dict:
        """A new scheduler_config.json dict (the caller may change it)."""
        return {**self.scheduler, "prediction_type": self.prediction_type}


# OpenAI CLIP (SD 1.x) pads with <|endoftext|>, 49407; OpenCLIP (SD 2.x) with "!", id 0.
SD1 = Family("sd1", PNDM_SCHEDULER, "epsilon", 512, pad_id=49407, text_encoder="openai")
SD1_INPAINTING = Family("sd1-inpainting", PNDM_SCHEDULER, "epsilon", 512, pad_id=49407, text_encoder="openai",
                        unet_in_channels=9)
# stable-diffusion-2(-1): the 768 model, v-prediction. The 512 "-base" models predict epsilon but their single files
# cannot be told from the 768 ones: the reference takes them as v-prediction too, and so does sdlite (load's
# prediction_type corrects it).
SD2 = Family("sd2", DDIM_SCHEDULER, "v_prediction", 768, pad_id=0, text_encoder="openclip")
# stable-diffusion-2-inpainting: 512, epsilon (so the reference's single-file loader takes a 9-channel SD 2.x file).
SD2_INPAINTING = Family("sd2-inpainting", DDIM_SCHEDULER, "epsilon", 512, pad_id=0, text_encoder="openclip",
                        unet_in_channels=9)
# stable-diffusion-2-depth: a 5-channel UNet (latents and a depth map), fine-tuned from the 512 base model: its folder's
# scheduler_config.json is PNDM with epsilon prediction (its single file 512-depth-ema: the reference's single-file
# loader does not tell depth files from the 768 v-prediction model, which would not run them).
SD2_DEPTH = Family("sd2-depth", PNDM_SCHEDULER, "epsilon", 512, pad_id=0, text_encoder="openclip",
                   unet_in_channels=5)
# The small models `sdlite train` trains from scratch (64 x 64 unless told otherwise). Text-to-image: SD's schedule and
# tokenizer, sampled with DDIM by default, which needs few steps.
SDLITE_TINY = Family("sdlite-tiny", {"_class_name": "DDIMScheduler", **SD_BETAS, "steps_offset": 1,
                                     "clip_sample": False, "set_alpha_to_one": False, "timestep_spacing": "leading"},
                     "epsilon", 64, pad_id=49407, text_encoder="openai")
# Unconditional DDPM in pixel space, on DDPM's own schedule (Ho et al. 2020, sec. 4: linear betas 1e-4 .. 0.02,
# samples clipped to [-1, 1]), sampled with its ancestral loop.
PIXEL_DDPM = Family("pixel-ddpm", {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
                                   "beta_end": 0.02, "beta_schedule": "linear", "trained_betas": None,
                                   "clip_sample": True}, "epsilon", 64, pad_id=None, text_encoder=None,
                    unet_in_channels=3)

SINGLE_FILE_FAMILIES = (SD1, SD1_INPAINTING, SD2, SD2_INPAINTING, SD2_DEPTH)


def single_file_family(text_layout: str, unet_in_channels: int) -> Family:
    """The family of a single file whose text encoder is in `text_layout` ("openai": SD 1.x, "openclip": SD 2.x); a
    UNet of input channels no record of that text encoder has takes its text encoder's family (nothing else is known of it)."""
    version = SD1 if text_layout == "openai" else SD2
    return next((f for f in SINGLE_FILE_FAMILIES if f.text_encoder == text_layout
                 and f.unet_in_channels == unet_in_channels), version)
