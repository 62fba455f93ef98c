//! The segmentation network and its deterministic initialization.

pub mod init;
pub mod unet;

pub use unet::{UNet, UNetConfig};

#[cfg(test)]
mod kernel_check;
