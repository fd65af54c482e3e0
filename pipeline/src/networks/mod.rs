//! Trainable networks attached to a frozen model's adaptable layers.

pub mod lora;
