//! The text encoder(s) trained with the LoRA (sd-scripts' default, without
//! `--network_train_unet_only`): loaded from the base checkpoint, with `lora_te_*` modules (SDXL:
//! `lora_te1_*` / `lora_te2_*`) attached, encoding every step's captions the way
//! cache-text-encoder encodes them ([`CaptionEncoder`]: one implementation of clip skip, token
//! chunks and SDXL's two encoders and `pool2`).

use candle_core::{DType, Device, Tensor};

use crate::models::adapter::Adaptable;
use crate::models::text_encoders::{paddings, text_encoders_of};
use crate::models::unet::{sdxl_vector, SIZE_VALUES};
use crate::models::{Checkpoint, ModelFamily};
use crate::stages::cache_text_encoder::{tokenizer_sources, CaptionEncoder};
use crate::text::tokenize::{ClipTokenizer, MaxTokenLength, TokenChunks};
use crate::{Error, Result};

/// The trained text encoder(s) of a run and their tokenizers.
pub struct LiveText {
    /// Encoders (with LoRA modules attached), tokenizers and settings.
    pub encoder: CaptionEncoder,
}

impl LiveText {
    /// Loads the text encoder(s) of `checkpoint` and their tokenizers (from the model's
    /// `tokenizer/` folder, else the built-in CLIP vocabulary); `clip_skip` and
    /// `max_token_length` are sd-scripts' options (SDXL ignores clip skip, as sd-scripts);
    /// `weighted` reads the A1111 attention syntax (`--weighted_captions`).
    pub fn load(
        checkpoint: &Checkpoint,
        dtype: DType,
        device: &Device,
        clip_skip: Option<usize>,
        max_token_length: Option<usize>,
        weighted: bool,
    ) -> Result<Self> {
        let mut encoders = text_encoders_of(checkpoint, dtype, device)?;
        let family = encoders.family;
        for (encoder, prefix) in encoders
            .encoders
            .iter_mut()
            .zip(family.text_encoder_lora_prefixes())
        {
            encoder.set_lora_prefix(prefix);
        }
        let clip_skip = match family {
            ModelFamily::Sdxl => 1,
            _ => clip_skip.unwrap_or(1),
        };
        let layers = encoders.encoders[0].config().num_hidden_layers;
        if clip_skip == 0 || clip_skip > layers {
            return Err(Error::Usage(format!(
                "--clip_skip must be between 1 and {layers} for this {layers}-layer text \
                 encoder, not {clip_skip}"
            )));
        }
        let tokenizers = paddings(family)
            .iter()
            .zip(tokenizer_sources(checkpoint.path(), None, family))
            .map(|(&padding, source)| ClipTokenizer::open(&source, padding))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            encoder: CaptionEncoder {
                encoders,
                tokenizers,
                clip_skip,
                max_len: MaxTokenLength::new(max_token_length.unwrap_or(75))?,
                weighted,
                device: device.clone(),
            },
        })
    }

    /// The encoders, to attach LoRA modules to (in sd-scripts' order: encoder 1 first).
    pub fn models(&mut self) -> Vec<&mut dyn Adaptable> {
        (self.encoder.encoders.encoders.iter_mut())
            .map(|e| e as &mut dyn Adaptable)
            .collect()
    }

    /// Turns gradient checkpointing of every encoder's transformer layers on or off.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        for encoder in &mut self.encoder.encoders.encoders {
            encoder.set_gradient_checkpointing(on);
        }
    }

    /// The family of the loaded encoders.
    pub fn family(&self) -> ModelFamily {
        self.encoder.encoders.family
    }

    /// The UNet conditioning of `captions`: the context `[B, 75n+2, D]` and, for SDXL, the
    /// add-embedding input from the live `pool2` and each sample's `sizes`.
    pub fn encode(
        &self,
        captions: &[String],
        sizes: Option<&[[i64; SIZE_VALUES]]>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let tokens = (captions.iter())
            .map(|caption| self.encoder.tokenize(caption))
            .collect::<Result<Vec<_>>>()?;
        let batch: Vec<&[TokenChunks]> = tokens.iter().map(Vec::as_slice).collect();
        let named = self.encoder.conditioning(&batch)?;
        match named.as_slice() {
            [(_, hidden)] => Ok((hidden.clone(), None)),
            [(_, hidden1), (_, hidden2), (_, pool2)] => {
                let sizes = sizes.ok_or_else(|| {
                    Error::Usage(
                        "SDXL: the latent caches hold no original_size / crop_ltrb, which SDXL \
                         training is conditioned on; re-run prepare-latents with the SDXL \
                         checkpoint"
                            .into(),
                    )
                })?;
                let context = Tensor::cat(&[hidden1, hidden2], 2)?;
                Ok((context, Some(sdxl_vector(pool2, sizes)?)))
            }
            _ => Err(Error::Model("unexpected text-encoder outputs".into())),
        }
    }
}
