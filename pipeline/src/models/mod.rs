//! Model architectures and weight loading.

pub mod attention;
pub mod frozen;
pub mod unet;
