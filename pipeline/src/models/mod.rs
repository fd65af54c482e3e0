//! Model architectures and weight loading.

pub mod frozen;
pub mod unet;
