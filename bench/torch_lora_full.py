"""The PyTorch side of bench/train-lora-full.sh: sd-scripts' own SD1 UNet (library.original_unet,
loaded with model_util.convert_ldm_unet_checkpoint as train_network.py loads a single-file
checkpoint) and its networks.lora LoRA, trained on random latents and text states of the same
shapes with AdamW, batch 1, fp32 -- the inner step of train_network.py without its data loader.

    SD_PYTHON bench/torch_lora_full.py SD_SCRIPTS UNET.safetensors STEPS RES DIM ALPHA [CONV_DIM CONV_ALPHA]

Prints seconds per step over STEPS steps after a first (warm-up) step, and the peak RSS.
TORCH_THREADS (default 2) sets torch's intra-op threads; GRADIENT_CHECKPOINTING=1 turns on the
UNet's gradient checkpointing as train_network.py's --gradient_checkpointing does.
"""

import os
import resource
import sys
import time


def main():
    sd_scripts, unet_path = sys.argv[1], sys.argv[2]
    steps, res, dim, alpha = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
    conv = {"conv_dim": sys.argv[7], "conv_alpha": sys.argv[8]} if len(sys.argv) > 8 else {}
    sys.path.insert(0, sd_scripts)
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))
    from library import model_util
    from library.original_unet import UNet2DConditionModel
    from networks import lora

    config = model_util.create_unet_diffusers_config(False)
    unet = UNet2DConditionModel(**config)
    unet.load_state_dict(model_util.convert_ldm_unet_checkpoint(False, load_file(unet_path), config))
    unet.requires_grad_(False)
    if os.environ.get("GRADIENT_CHECKPOINTING"):
        unet.enable_gradient_checkpointing()
    network = lora.create_network(1.0, dim, alpha, None, [], unet, **conv)
    network.apply_to([], unet, apply_text_encoder=False, apply_unet=True)
    params, _ = network.prepare_optimizer_params(None, 1e-4, 1e-4)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    unet.train()
    generator = torch.Generator().manual_seed(1)
    side = res // 8

    def step():
        latents = torch.randn(1, 4, side, side, generator=generator)
        context = torch.randn(1, 77, 768, generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (1,), generator=generator)
        prediction = unet(latents + noise, timesteps, context).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    began = time.perf_counter()
    cpu_began = time.process_time()
    for _ in range(steps):
        step()
    wall = (time.perf_counter() - began) / steps
    cpu = (time.process_time() - cpu_began) / steps
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    checkpointing = " checkpointing" if os.environ.get("GRADIENT_CHECKPOINTING") else ""
    print(f"pytorch {res}px rank {dim}{' conv ' + conv['conv_dim'] if conv else ''}{checkpointing}: "
          f"{wall:.2f} s/step wall, {cpu:.2f} CPU s/step, {rss:.0f} MiB peak RSS")


if __name__ == "__main__":
    main()
