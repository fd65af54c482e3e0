//! Neural-network modules (candle) and their checkpoint name mappings.

pub mod clip;
pub mod text_encoders;
