//! libp2p peer ids, derived from a member's ed25519 key exactly as libp2p derives them.
//!
//! A node's libp2p identity and its signing identity are the same key, so the roster (which
//! lists public keys) also decides which peer ids may connect. Deriving the id here keeps that
//! check in the pure crates; a test pins the derivation to libp2p's own.

use std::fmt;

/// Protobuf prefix of an ed25519 `PublicKey` message in libp2p's key encoding:
/// field 1 (`Type`) = 1 (Ed25519), then field 2 (`Data`) with 32 bytes.
const PROTOBUF_ED25519_PREFIX: [u8; 4] = [0x08, 0x01, 0x12, 0x20];
/// Multihash code of the identity hash; libp2p inlines keys of at most 42 bytes this way.
const MULTIHASH_IDENTITY: u8 = 0x00;
const ENCODED_KEY_LEN: usize = PROTOBUF_ED25519_PREFIX.len() + 32;

/// The libp2p peer id of an ed25519 key: an identity multihash of the protobuf-encoded key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId([u8; 2 + ENCODED_KEY_LEN]);

impl PeerId {
    /// Derives the peer id of a 32-byte ed25519 public key.
    pub fn from_ed25519(public_key: &[u8; 32]) -> Self {
        let mut bytes = [0u8; 2 + ENCODED_KEY_LEN];
        bytes[0] = MULTIHASH_IDENTITY;
        bytes[1] = ENCODED_KEY_LEN as u8;
        bytes[2..6].copy_from_slice(&PROTOBUF_ED25519_PREFIX);
        bytes[6..].copy_from_slice(public_key);
        Self(bytes)
    }

    /// The multihash bytes, as libp2p's `PeerId::to_bytes` gives them.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.to_vec()
    }

    /// The ed25519 public key inside the id.
    pub fn ed25519_public_key(&self) -> [u8; 32] {
        let mut key = [0u8; 32];
        key.copy_from_slice(&self.0[6..]);
        key
    }
}

impl fmt::Display for PeerId {
    /// Base58btc, the `12D3KooW...` form libp2p prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&bs58::encode(&self.0).into_string())
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({self})")
    }
}

#[cfg(test)]
mod tests {
    use crate::Identity;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn derivation_equals_libp2p(seed in any::<[u8; 32]>()) {
            let ours = Identity::from_seed(&seed).peer_id();
            let keypair = libp2p_identity::Keypair::ed25519_from_bytes(seed).unwrap();
            let theirs = keypair.public().to_peer_id();
            prop_assert_eq!(ours.to_bytes(), theirs.to_bytes());
            prop_assert_eq!(ours.to_string(), theirs.to_base58());
        }
    }

    #[test]
    fn printed_form_is_the_familiar_one() {
        let id = Identity::from_seed(&[1u8; 32]).peer_id();
        assert!(id.to_string().starts_with("12D3KooW"), "{id}");
        assert_eq!(
            id.ed25519_public_key(),
            Identity::from_seed(&[1u8; 32]).public_key().to_bytes()
        );
    }
}
