"""Full-size SDXL generation, PyTorch side of `MODEL=sdxl bench/generate-images-full.sh`.

  make OUT TOKENIZER    writes OUT: a diffusers SDXL folder in SDXL base's real layout with random
                        weights (diffusers / transformers initialisation, seed 0): `unet/` (2.57 B
                        parameters: levels 320/640/1280, transformer depth 0/2/10, linear
                        projections, text-time add-embedding of 2816 inputs), `text_encoder/`
                        (CLIP ViT-L/14 shape), `text_encoder_2/` (OpenCLIP bigG shape, with
                        projection), `vae/` (SDXL VAE, scaling factor 0.13025), fp16 as released
                        SDXL folders are; the CLIP vocabulary from TOKENIZER as `tokenizer/` and
                        `tokenizer_2/`.
  run OUT SIZE STEPS SCALE
                        diffusers' StableDiffusionXLPipeline on those weights (float32),
                        EulerDiscreteScheduler as gen_img.py configures it, one image; prints the
                        seconds of the pipeline call.
"""

import os
import shutil
import sys

import torch

from torch_generate_full import euler_scheduler, timed_image

UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def make(out, tokenizer_dir):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    os.makedirs(out, exist_ok=True)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.13025,
    )
    vae.to(torch.float16).save_pretrained(f"{out}/vae")
    del vae
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    ))
    text_encoder.to(torch.float16).save_pretrained(f"{out}/text_encoder")
    del text_encoder
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
        num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
    ))
    text_encoder_2.to(torch.float16).save_pretrained(f"{out}/text_encoder_2")
    del text_encoder_2
    unet = UNet2DConditionModel(**UNET_CONFIG)
    unet.to(torch.float16).save_pretrained(f"{out}/unet")
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(tokenizer_dir, f"{out}/{name}", dirs_exist_ok=True)
    euler_scheduler().save_pretrained(f"{out}/scheduler")


@torch.no_grad()
def run(out, size, steps, scale):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    f32 = dict(torch_dtype=torch.float32)
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(f"{out}/vae", **f32).eval(),
        text_encoder=CLIPTextModel.from_pretrained(f"{out}/text_encoder", **f32).eval(),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(f"{out}/text_encoder_2", **f32).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(f"{out}/tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(f"{out}/tokenizer_2"),
        unet=UNet2DConditionModel.from_pretrained(f"{out}/unet", **f32).eval(),
        scheduler=euler_scheduler(),
    )
    timed_image(pipe, size, steps, scale)


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    else:
        run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
