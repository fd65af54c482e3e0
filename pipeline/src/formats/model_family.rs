//! The Stable Diffusion generations, and what each means for the files the stages write.

/// The Stable Diffusion generation a checkpoint belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModelFamily {
    /// SD 1.x: CLIP ViT-L text encoder, 768-wide context.
    Sd1,
    /// SD 2.x: OpenCLIP ViT-H text encoder, linear transformer projections.
    Sd2,
    /// SDXL: two text encoders, three UNet levels.
    Sdxl,
}

impl ModelFamily {
    /// Suffix of latent cache files (`_sd.npz` / `_sdxl.npz`).
    pub fn latent_suffix(self) -> &'static str {
        match self {
            ModelFamily::Sd1 | ModelFamily::Sd2 => "sd",
            ModelFamily::Sdxl => "sdxl",
        }
    }

    /// Latent scaling factor applied at training time.
    pub fn vae_scale(self) -> f64 {
        match self {
            ModelFamily::Sd1 | ModelFamily::Sd2 => 0.18215,
            ModelFamily::Sdxl => 0.13025,
        }
    }

    /// The kohya prefixes of the text-encoder LoRA modules, one per encoder (`lora_te`; SDXL:
    /// `lora_te1`, `lora_te2`).
    pub fn text_encoder_lora_prefixes(self) -> &'static [&'static str] {
        match self {
            ModelFamily::Sdxl => &["lora_te1", "lora_te2"],
            _ => &["lora_te"],
        }
    }

    /// Short lowercase name (`sd1`, `sd2`, `sdxl`).
    pub fn name(self) -> &'static str {
        match self {
            ModelFamily::Sd1 => "sd1",
            ModelFamily::Sd2 => "sd2",
            ModelFamily::Sdxl => "sdxl",
        }
    }
}
