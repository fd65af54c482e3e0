//! Neural network models run by the pipeline stages.

pub mod blip;
