"""PyTorch side of bench/inference.sh: per-item compute time of the full-size inference models.

  make DIR      writes DIR with random weights (torch / transformers / diffusers initialisation,
                seed 0) in the real layouts, float32:
                  DIR/sdxl/text_encoder    CLIP ViT-L/14 text model (SD1.x / SDXL encoder 1)
                  DIR/sdxl/text_encoder_2  OpenCLIP ViT-bigG/14 as CLIPTextModelWithProjection
                  DIR/sdxl/vae             the SD / SDXL AutoencoderKL (one architecture)
                  DIR/blip                 BLIP-large captioning (ViT-L/16 at 384 px, BERT-base
                                           decoder), with the fixture's bert tokenizer
  run DIR ROW   times one row (see ROWS) and prints one JSON line (the CLIP rows load both text
                encoders, as lorakit loads an SDXL model's pair, and run one):
                {"row", "items", "seconds_per_item", "repeats"}

Inputs are the same on both sides: token ids from `ids(batch)`, pixels and latents from a fixed
formula (`ramp`). Each row runs once to warm up, then REPEATS times (env, default 2); the figure
is the mean time of one call divided by the items in it. Model loading is not timed. torch uses
THREADS threads (env, default: all cores).
"""

import json
import os
import sys
import time

import torch

ROWS = {
    "clip-l-b1": ("clip", "text_encoder", 1),
    "clip-l-b8": ("clip", "text_encoder", 8),
    "clip-l-b32": ("clip", "text_encoder", 32),
    "clip-bigg-b1": ("clip", "text_encoder_2", 1),
    "clip-bigg-b8": ("clip", "text_encoder_2", 8),
    "clip-bigg-b32": ("clip", "text_encoder_2", 32),
    "vae-encode-512": ("vae-encode", 512, 1),
    "vae-encode-1024": ("vae-encode", 1024, 1),
    "vae-decode-512": ("vae-decode", 512, 1),
    "vae-decode-1024": ("vae-decode", 1024, 1),
    "blip-greedy-b1": ("blip", 1, 1),
    "blip-greedy-b8": ("blip", 1, 8),
    "blip-beam3-b1": ("blip", 3, 1),
    "blip-beam3-b8": ("blip", 3, 8),
}

# Tokens generated per caption in the BLIP rows: min_length = max_length forces exactly this many
# after the 4 prompt tokens.
BLIP_TOKENS = 30
BLIP_PROMPT = 4


def ids(batch, vocab=49408, length=77):
    """Token ids [batch, 77]: BOS, a body of varied ids of a caption-like length, EOS padding."""
    rows = []
    for b in range(batch):
        body = 20 + (b * 7) % 40
        row = [49406] + [(b * 7919 + j * 104729) % 49000 + 200 for j in range(body)]
        row += [49407] * (length - len(row))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def ramp(shape):
    """Deterministic values in [-1, 1] laid out over `shape`."""
    n = 1
    for d in shape:
        n *= d
    return (torch.arange(n, dtype=torch.float64) * 0.618033988749895 % 2.0 - 1.0).float().reshape(shape)


def make(out):
    from diffusers import AutoencoderKL
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
    )

    torch.manual_seed(0)
    sdxl = os.path.join(out, "sdxl")
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            projection_dim=768,
        )
    ).save_pretrained(os.path.join(sdxl, "text_encoder"))
    CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
            num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
            projection_dim=1280,
        )
    ).save_pretrained(os.path.join(sdxl, "text_encoder_2"))
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), scaling_factor=0.13025,
    ).save_pretrained(os.path.join(sdxl, "vae"))
    config = BlipConfig(
        text_config=dict(
            vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=512, hidden_act="gelu",
            layer_norm_eps=1e-12, bos_token_id=30522, sep_token_id=102, pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=384, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-5,
        ),
        projection_dim=512,
        image_text_hidden_size=256,
    )
    blip = os.path.join(out, "blip")
    BlipForConditionalGeneration(config).save_pretrained(blip)
    print(f"wrote {out}", file=sys.stderr)


def timed(fn, items):
    repeats = max(1, int(os.environ.get("REPEATS", "2")))
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    seconds = (time.perf_counter() - start) / repeats
    return seconds / items, repeats


@torch.inference_mode()
def run(out, row):
    kind, a, b = ROWS[row]
    sdxl = os.path.join(out, "sdxl")
    if kind == "clip":
        from transformers import CLIPTextModel

        # The row's encoder alone, as lorakit's side loads it.
        model = CLIPTextModel.from_pretrained(os.path.join(sdxl, a)).eval()
        tokens = ids(b)
        per_item, repeats = timed(lambda: model(tokens, output_hidden_states=True), b)
    elif kind.startswith("vae"):
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(os.path.join(sdxl, "vae")).eval()
        if kind == "vae-encode":
            pixels = ramp((b, 3, a, a))
            per_item, repeats = timed(lambda: vae.encode(pixels).latent_dist.mean, b)
        else:
            latents = ramp((b, 4, a // 8, a // 8))
            per_item, repeats = timed(lambda: vae.decode(latents).sample, b)
    else:
        from transformers import BlipForConditionalGeneration

        model = BlipForConditionalGeneration.from_pretrained(os.path.join(out, "blip")).eval()
        pixels = ramp((b, 3, 384, 384))
        length = BLIP_PROMPT + BLIP_TOKENS

        def caption():
            generated = model.generate(
                pixel_values=pixels, num_beams=a, max_length=length, min_length=length,
                do_sample=False, early_stopping=False, length_penalty=1.0,
            )
            assert generated.shape[1] >= length - 1, generated.shape

        per_item, repeats = timed(caption, b)
    print(json.dumps({"row": row, "items": b, "seconds_per_item": per_item, "repeats": repeats}))


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("THREADS", os.cpu_count())))
    if sys.argv[1] == "make":
        make(sys.argv[2])
    elif sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
