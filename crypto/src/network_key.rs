//! The consortium's pre-shared network key, in the standard libp2p swarm key file format.
//!
//! ```text
//! /key/swarm/psk/1.0.0/
//! /base16/
//! <64 hex digits>
//! ```
//!
//! This is the `swarm.key` format of go-libp2p, kubo and rust-libp2p's `pnet`, so one file
//! works with all of them. Without this key a peer cannot finish a transport handshake.

use std::fmt;
use std::str::FromStr;

use zeroize::Zeroize;

const HEADER: &str = "/key/swarm/psk/1.0.0/";
const ENCODING: &str = "/base16/";

/// Why a network key file could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetworkKeyError {
    /// The file has fewer than the three required lines.
    #[error("network key file is truncated: expected 3 lines (header, encoding, key), found {0}")]
    Truncated(usize),
    /// The first line is not the swarm key header.
    #[error("not a swarm key file: first line must be `{HEADER}`, found {0:?}")]
    WrongHeader(String),
    /// An encoding other than base16.
    #[error("unsupported key encoding {0:?}: only `{ENCODING}` is supported")]
    UnsupportedEncoding(String),
    /// The key line is not 64 hex digits.
    #[error("network key must be 64 hex digits (256 bits), found {0} characters")]
    WrongLength(usize),
    /// The key line contains a non-hex character.
    #[error("network key contains a character that is not a hex digit")]
    NotHex,
}

/// A 256-bit pre-shared key for libp2p's private networks. Zeroed on drop; `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct NetworkKey([u8; 32]);

impl Drop for NetworkKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl NetworkKey {
    /// Generates a key from the operating system's randomness.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)?;
        Ok(Self(key))
    }

    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw key bytes, for handing to the transport.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Renders the swarm key file (with a trailing newline).
    pub fn to_key_file(&self) -> String {
        format!("{HEADER}\n{ENCODING}\n{}\n", hex::encode(self.0))
    }
}

impl FromStr for NetworkKey {
    type Err = NetworkKeyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let lines: Vec<&str> = text.lines().take(3).map(str::trim_end).collect();
        let [header, encoding, key] = lines.as_slice() else {
            return Err(NetworkKeyError::Truncated(lines.len()));
        };
        if *header != HEADER {
            return Err(NetworkKeyError::WrongHeader(
                header.chars().take(40).collect(),
            ));
        }
        if *encoding != ENCODING {
            return Err(NetworkKeyError::UnsupportedEncoding(
                encoding.chars().take(40).collect(),
            ));
        }
        if key.len() != 64 {
            return Err(NetworkKeyError::WrongLength(key.chars().count()));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(key, &mut bytes).map_err(|_| NetworkKeyError::NotHex)?;
        Ok(Self(bytes))
    }
}

impl fmt::Debug for NetworkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NetworkKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn libp2p_reads_our_file_and_we_read_theirs(bytes in any::<[u8; 32]>()) {
            let ours = NetworkKey::from_bytes(bytes);
            let theirs: libp2p_pnet::PreSharedKey = ours.to_key_file().parse().unwrap();
            prop_assert_eq!(theirs.to_key_file(), ours.to_key_file());
            let back: NetworkKey = theirs.to_key_file().parse().unwrap();
            prop_assert_eq!(back, ours);
        }

        #[test]
        fn parser_never_panics(text in ".{0,200}") {
            let _ = text.parse::<NetworkKey>();
        }
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(
            NetworkKey::generate().unwrap(),
            NetworkKey::generate().unwrap()
        );
    }

    #[test]
    fn each_defect_has_its_own_error() {
        let good = NetworkKey::from_bytes([9; 32]).to_key_file();
        assert_eq!(
            "/key/swarm/psk/1.0.0/\n".parse::<NetworkKey>(),
            Err(NetworkKeyError::Truncated(1))
        );
        assert!(matches!(
            good.replace("psk", "xyz").parse::<NetworkKey>(),
            Err(NetworkKeyError::WrongHeader(_))
        ));
        assert!(matches!(
            good.replace("base16", "base64").parse::<NetworkKey>(),
            Err(NetworkKeyError::UnsupportedEncoding(_))
        ));
        assert_eq!(
            good[..good.len() - 3].parse::<NetworkKey>(),
            Err(NetworkKeyError::WrongLength(62))
        );
        assert_eq!(
            good.replace("09", "zz").parse::<NetworkKey>(),
            Err(NetworkKeyError::NotHex)
        );
    }

    #[test]
    fn debug_hides_the_key() {
        assert!(!format!("{:?}", NetworkKey::from_bytes([0xab; 32])).contains("abab"));
    }
}
