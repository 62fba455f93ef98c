//! `medmesh keygen`, `medmesh whoami`, `medmesh network-key`.

use std::path::Path;

use anyhow::Result;
use medmesh_crypto::{Identity, NetworkKey};

use crate::keystore;

/// Generates and saves an identity; prints what the roster needs.
pub fn keygen(out: &Path, force: bool) -> Result<()> {
    let identity = Identity::generate()?;
    keystore::save_identity(out, &identity, force)?;
    println!("wrote {} (mode 0600)", out.display());
    print_identity(&identity);
    Ok(())
}

/// Prints an identity file's public key and peer id.
pub fn whoami(key: &Path) -> Result<()> {
    print_identity(&keystore::load_identity(key)?);
    Ok(())
}

fn print_identity(identity: &Identity) {
    println!("public key: {}", identity.public_key());
    println!("peer id:    {}", identity.peer_id());
}

/// Generates and saves the network key.
pub fn network_key(out: &Path, force: bool) -> Result<()> {
    let key = NetworkKey::generate()?;
    keystore::save_network_key(out, &key, force)?;
    println!(
        "wrote {} (mode 0600); give it to every member over a secure channel",
        out.display()
    );
    Ok(())
}
