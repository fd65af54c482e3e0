"""Full-size SD1.5 generation, PyTorch side of bench/generate-images-full.sh.

  make OUT SD_SCRIPTS   writes OUT: a single-file SD1.5 checkpoint in the real layout (UNet from
                        sd-scripts' create_unet_diffusers_config(v2=False), VAE from
                        create_vae_diffusers_config(), CLIP ViT-L/14-shaped text encoder) with
                        random weights (diffusers / transformers initialisation, seed 0), saved by
                        sd-scripts' save_stable_diffusion_checkpoint in fp16 as released SD1.5 files are.
  run CKPT TOKENIZER SIZE STEPS SCALE
                        diffusers' StableDiffusionPipeline on those weights (float32, loaded through
                        diffusers' single-file converters), EulerDiscreteScheduler as gen_img.py
                        configures it, one image; prints the seconds of the pipeline call.
"""

import sys
import time

import torch


def make(out, sd_scripts):
    sys.path.insert(0, sd_scripts)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from library import model_util

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**model_util.create_unet_diffusers_config(False))
    vae = AutoencoderKL(**model_util.create_vae_diffusers_config())
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        )
    )
    model_util.save_stable_diffusion_checkpoint(
        False, out, text_encoder, unet, None, 0, 0, None, save_dtype=torch.float16, vae=vae
    )


@torch.no_grad()
def run(ckpt, tokenizer_dir, size, steps, scale):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    checkpoint = {k: v.float() for k, v in load_file(ckpt).items()}
    unet_config = dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
        attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, dict(unet.config)))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, dict(vae.config)))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        )
    )
    state = convert_ldm_clip_checkpoint(checkpoint)
    state.pop("text_model.embeddings.position_ids", None)
    text_encoder.load_state_dict(state, strict=False)
    del checkpoint, state
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        unet=unet.eval(), scheduler=euler_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    timed_image(pipe, size, steps, scale)


def euler_scheduler():
    """EulerDiscreteScheduler as gen_img.py configures it."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )


def timed_image(pipe, size, steps, scale):
    """Makes the benchmark's image with `pipe` and prints the seconds of the pipeline call."""
    pipe.set_progress_bar_config(disable=True)
    start = time.time()
    pipe(
        "a photo of a cat", negative_prompt="lowres", height=size, width=size, num_inference_steps=steps,
        guidance_scale=scale, generator=torch.Generator().manual_seed(1), output_type="np",
    )
    print(f"pipeline call {time.time() - start:.1f} s")


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    else:
        run(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]))
