"""Writes a full-size SD1.5 LoRA as sd-scripts' networks.lora makes it (LierLa: the UNet's
transformer layers and the text encoder's attention and MLP, 264 modules) at rank DIM / alpha
DIM, every factor drawn from N(0, 0.02^2) with seed 0, in float16: the input of the lora-tools
benchmark (bench/compare-sd-scripts.sh lora-tools). The models are built on PyTorch's meta device,
so only the LoRA's own tensors take memory.

  PYTHONPATH=SD_SCRIPTS python bench/sd_scripts_full_lora.py OUT.safetensors [DIM]
"""

import sys

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from library import original_unet
from networks import lora


def main():
    out = sys.argv[1]
    dim = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    with torch.device("meta"):
        # sd-scripts' SD1.5 UNet (its model_util builds it with these arguments) and CLIP ViT-L/14.
        unet = original_unet.UNet2DConditionModel(
            sample_size=64, attention_head_dim=8, cross_attention_dim=768, use_linear_projection=False
        )
        text_encoder = CLIPTextModel(CLIPTextConfig())
    network = lora.create_network(1.0, dim, dim, None, text_encoder, unet)
    network.apply_to(text_encoder, unet, True, True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(network.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    network.save_weights(out, torch.float16, {"ss_network_dim": str(dim), "ss_network_alpha": str(dim)})
    print(out, len(network.unet_loras), "UNet and", len(network.text_encoder_loras), "text-encoder modules")


if __name__ == "__main__":
    main()
