"""Full-size SDXL LoRA step benchmark, PyTorch side, and the maker of its weights.

    SD_PYTHON bench/torch_sdxl_lora_full.py make SD_SCRIPTS UNET.safetensors
        writes sd-scripts' SDXL UNet (library.sdxl_original_unet.SdxlUNet2DConditionModel,
        SDXL base's real layout: 2.57 B parameters) with PyTorch's default random initialisation
        (seed 0), stored as bf16 under `model.diffusion_model.*`, as single-file SDXL
        checkpoints store it.
    SD_PYTHON bench/torch_sdxl_lora_full.py train SD_SCRIPTS UNET.safetensors STEPS RES DIM
        trains sd-scripts' networks.lora (rank DIM, alpha DIM, the default attention modules) on
        that UNet: random latents, text states, pool2 and size conditioning of SDXL's shapes,
        batch 1, AdamW -- the inner step of sdxl_train_network.py without its data loader. The
        UNet computes in fp32 (MIXED_PRECISION=bf16: under torch.autocast bf16, as accelerate runs
        --mixed_precision bf16 on the CPU); GRADIENT_CHECKPOINTING=1 turns on the UNet's gradient
        checkpointing. Prints seconds per step over STEPS steps after a first (warm-up) step, and
        the peak RSS. TORCH_THREADS (default 2) sets torch's intra-op threads.
"""

import contextlib
import os
import resource
import sys
import time


def make(unet_path):
    import torch
    from safetensors.torch import save_file
    from library.sdxl_original_unet import SdxlUNet2DConditionModel

    torch.manual_seed(0)
    unet = SdxlUNet2DConditionModel()
    tensors = {f"model.diffusion_model.{k}": v.to(torch.bfloat16).contiguous()
               for k, v in unet.state_dict().items()}
    count = sum(v.numel() for v in tensors.values())
    save_file(tensors, unet_path)
    print(f"{unet_path}: {count / 1e9:.2f} B parameters")


def train(unet_path, steps, res, dim):
    import torch
    from safetensors.torch import load_file
    from library.sdxl_original_unet import SdxlUNet2DConditionModel
    from networks import lora

    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))
    unet = SdxlUNet2DConditionModel()
    prefix = "model.diffusion_model."
    state = {k[len(prefix):]: v.float() for k, v in load_file(unet_path).items()}
    unet.load_state_dict(state, strict=True)
    del state
    unet.requires_grad_(False)
    checkpointing = bool(os.environ.get("GRADIENT_CHECKPOINTING"))
    if checkpointing:
        unet.enable_gradient_checkpointing()
    network = lora.create_network(1.0, dim, dim, None, [], unet)
    network.apply_to([], unet, apply_text_encoder=False, apply_unet=True)
    params, _ = network.prepare_optimizer_params(None, 1e-4, 1e-4)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    unet.train()
    bf16 = os.environ.get("MIXED_PRECISION") == "bf16"
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    generator = torch.Generator().manual_seed(1)
    side = res // 8

    def step():
        latents = torch.randn(1, 4, side, side, generator=generator)
        context = torch.randn(1, 77, 2048, generator=generator)
        vector = torch.randn(1, 2816, generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (1,), generator=generator)
        noisy = latents + noise
        if checkpointing:
            # As train_network.py does: the SDXL UNet checkpoints with use_reentrant=True, which
            # runs no backward through a block none of whose inputs requires a gradient.
            noisy.requires_grad_(True)
            context.requires_grad_(True)
        with autocast():
            prediction = unet(noisy, timesteps, context, vector)
        loss = torch.nn.functional.mse_loss(prediction.float(), noise)
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
    print(f"pytorch sdxl {res}px rank {dim} {'bf16 autocast' if bf16 else 'fp32'}"
          f"{' checkpointing' if checkpointing else ''}: "
          f"{wall:.2f} s/step wall, {cpu:.2f} CPU s/step, {rss:.0f} MiB peak RSS")


def main():
    mode, sd_scripts, unet_path = sys.argv[1], sys.argv[2], sys.argv[3]
    sys.path.insert(0, sd_scripts)
    if mode == "make":
        make(unet_path)
    else:
        train(unet_path, int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))


if __name__ == "__main__":
    main()
