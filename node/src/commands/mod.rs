//! One module per command group; each function runs one subcommand and prints its result.

pub mod data;
pub mod demo;
pub mod experiment;
pub mod keys;
pub mod network;
pub mod roster;
pub mod simulate;
pub mod train;

use std::path::Path;

use anyhow::{Context, Result};
use medmesh_crypto::PublicKey;

use crate::keystore;

/// Accepts a public key as 64 hex digits or as the path of an identity file.
pub fn parse_public_key(arg: &str) -> Result<PublicKey> {
    if let Ok(key) = arg.parse::<PublicKey>() {
        return Ok(key);
    }
    let path = Path::new(arg);
    if path.exists() {
        return Ok(keystore::load_identity(path)?.public_key());
    }
    anyhow::bail!("{arg:?} is neither a 64-hex-digit public key nor an existing key file")
}

/// Reads a text file with the path in the error.
pub fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}
