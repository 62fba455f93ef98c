//! Node and researcher identities: one ed25519 key each, and its text file format.
//!
//! # Key file format
//!
//! An identity is stored as a small UTF-8 text file (the node writes it with mode 0600):
//!
//! ```text
//! # medmesh identity. Keep this file private: it is the key of your site.
//! format: medmesh-ed25519-v1
//! secret: <64 lowercase hex digits: the 32-byte ed25519 seed>
//! public: <64 lowercase hex digits: the 32-byte ed25519 public key>
//! ```
//!
//! Lines starting with `#` and blank lines are ignored. The `public` line is redundant on
//! purpose: loading recomputes it from the secret and refuses a file where they differ, which
//! catches copy-paste damage that a bare seed would silently turn into another identity.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

use crate::peer_id::PeerId;
use crate::signing::{Domain, Signature};

/// The tag on the `format:` line of a key file.
pub const KEY_FILE_FORMAT: &str = "medmesh-ed25519-v1";

/// Length of an ed25519 public key in bytes.
pub const PUBLIC_KEY_LEN: usize = 32;

/// Why a key file could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyFileError {
    /// The file is not a medmesh key file at all (another format, or binary garbage).
    #[error("not a medmesh key file: expected a `format: {KEY_FILE_FORMAT}` line, found {found}")]
    UnknownFormat {
        /// What stood where the format line should be.
        found: String,
    },
    /// The file stops before a required line, or a key is shorter than 64 hex digits.
    #[error("key file is truncated: {0}")]
    Truncated(String),
    /// A line is present but its value is not valid.
    #[error("key file is malformed: {0}")]
    Malformed(String),
    /// The stored public key does not belong to the stored secret.
    #[error("key file is inconsistent: its `public` line does not match its secret key")]
    PublicKeyMismatch,
}

/// Why a public key could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PublicKeyError {
    /// Not 64 hex digits.
    #[error("public key must be 64 hex digits (32 bytes), got {0:?}")]
    BadEncoding(String),
    /// 32 bytes that are not a valid ed25519 point.
    #[error("bytes are not a valid ed25519 public key")]
    InvalidPoint,
    /// A key of small order: agreeing with it gives a secret anyone knows.
    #[error("the public key has small order; no secret can be agreed with it")]
    SmallOrder,
}

/// The secret half of a member's identity: signs manifests, updates and progress records,
/// and (through [`Identity::peer_id`]) names the node on the network.
pub struct Identity {
    signing: SigningKey,
}

impl Identity {
    /// Generates a fresh identity from the operating system's randomness.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut())?;
        Ok(Self::from_seed(&seed))
    }

    /// Builds the identity whose ed25519 seed (secret key) is `seed`.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(seed),
        }
    }

    /// The 32-byte seed. Handle with care: whoever holds it is this member.
    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.signing.to_bytes())
    }

    /// The public key that the roster lists for this member.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.signing.verifying_key().to_bytes())
    }

    /// The libp2p peer id derived from the same key.
    pub fn peer_id(&self) -> PeerId {
        self.public_key().peer_id()
    }

    /// The secret this member shares with `peer`: X25519 between the two members' roster
    /// keys (their ed25519 keys in Montgomery form, as libsodium's
    /// `crypto_sign_ed25519_sk_to_curve25519` does; using one key for both is shown safe by
    /// Thormarker, eprint 2021/509), hashed with both public keys in a fixed order under
    /// its own BLAKE3 context. Both ends compute the same 32 bytes; no one else can.
    /// Refused when the agreement gives the identity point (a key of small order).
    pub fn shared_secret(&self, peer: &PublicKey) -> Result<Zeroizing<[u8; 32]>, PublicKeyError> {
        let theirs = VerifyingKey::from_bytes(&peer.0)
            .map_err(|_| PublicKeyError::InvalidPoint)?
            .to_montgomery();
        let scalar = Zeroizing::new(self.signing.to_scalar_bytes());
        let shared = Zeroizing::new(theirs.mul_clamped(*scalar).to_bytes());
        if shared.iter().all(|&b| b == 0) {
            return Err(PublicKeyError::SmallOrder);
        }
        let mine = self.public_key();
        let (lo, hi) = if mine <= *peer {
            (mine, *peer)
        } else {
            (*peer, mine)
        };
        let mut hasher = blake3::Hasher::new_derive_key("medmesh 2026-12 pairwise secret v1");
        hasher.update(shared.as_ref());
        hasher.update(&lo.0);
        hasher.update(&hi.0);
        Ok(Zeroizing::new(*hasher.finalize().as_bytes()))
    }

    /// Signs `message` for use in `domain` only (see [`crate::signing`]).
    pub fn sign(&self, domain: Domain, message: &[u8]) -> Signature {
        crate::signing::sign(&self.signing, domain, message)
    }

    /// Renders the key file text described in the module documentation.
    pub fn to_key_file(&self) -> Zeroizing<String> {
        let seed = self.seed();
        Zeroizing::new(format!(
            "# medmesh identity. Keep this file private: it is the key of your site.\n\
             format: {KEY_FILE_FORMAT}\n\
             secret: {}\n\
             public: {}\n",
            hex::encode(seed.as_ref()),
            self.public_key()
        ))
    }

    /// Parses key file text, checking format, completeness and consistency.
    pub fn from_key_file(text: &str) -> Result<Self, KeyFileError> {
        let mut lines = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'));

        match lines.next() {
            Some(line) if line == format!("format: {KEY_FILE_FORMAT}") => {}
            Some(line) if line.starts_with("format:") => {
                return Err(KeyFileError::UnknownFormat {
                    found: line.chars().take(60).collect(),
                });
            }
            Some(line) => {
                return Err(KeyFileError::UnknownFormat {
                    found: describe_foreign(line),
                });
            }
            None => return Err(KeyFileError::Truncated("the file is empty".into())),
        }
        let seed = Zeroizing::new(read_hex_line::<32>(lines.next(), "secret")?);
        let public = read_hex_line::<32>(lines.next(), "public")?;
        if let Some(extra) = lines.next() {
            return Err(KeyFileError::Malformed(format!(
                "unexpected line after `public`: {:?}",
                extra.chars().take(40).collect::<String>()
            )));
        }
        let identity = Self::from_seed(&seed);
        if identity.public_key().to_bytes() != public {
            return Err(KeyFileError::PublicKeyMismatch);
        }
        Ok(identity)
    }
}

impl fmt::Debug for Identity {
    // Never print the secret, not even in debug output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("public_key", &self.public_key())
            .finish_non_exhaustive()
    }
}

fn describe_foreign(line: &str) -> String {
    if line.starts_with("-----BEGIN") {
        format!("a PEM file ({})", line.trim_matches('-'))
    } else if line.starts_with("/key/swarm/psk") {
        "a network key (swarm.key), not an identity".into()
    } else if line.chars().any(|c| c.is_control()) {
        "binary data".into()
    } else {
        format!("{:?}", line.chars().take(40).collect::<String>())
    }
}

fn read_hex_line<const N: usize>(line: Option<&str>, key: &str) -> Result<[u8; N], KeyFileError> {
    let line =
        line.ok_or_else(|| KeyFileError::Truncated(format!("the `{key}` line is missing")))?;
    let value = line
        .strip_prefix(key)
        .and_then(|rest| rest.trim_start().strip_prefix(':'))
        .map(str::trim)
        .ok_or_else(|| {
            KeyFileError::Malformed(format!(
                "expected a `{key}:` line, found {:?}",
                line.split(':').next().unwrap_or_default()
            ))
        })?;
    if !value.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(KeyFileError::Malformed(format!(
            "`{key}` is not hexadecimal"
        )));
    }
    if value.len() < 2 * N {
        return Err(KeyFileError::Truncated(format!(
            "`{key}` has {} hex digits, expected {}",
            value.len(),
            2 * N
        )));
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(value, &mut out).map_err(|_| {
        KeyFileError::Malformed(format!(
            "`{key}` has {} hex digits, expected {}",
            value.len(),
            2 * N
        ))
    })?;
    Ok(out)
}

/// A member's public key. Displayed and parsed as 64 lowercase hex digits; serialized as hex
/// in human-readable formats (TOML, JSON) and as 32 raw bytes in bincode.
///
/// Holds the 32 compressed bytes (checked to be a valid point when constructed), so it is
/// small to copy, compare and hash; the point is decompressed only to verify.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; PUBLIC_KEY_LEN]);

impl PublicKey {
    /// Parses 32 raw bytes, rejecting those that are not a point on the curve.
    pub fn from_bytes(bytes: &[u8; PUBLIC_KEY_LEN]) -> Result<Self, PublicKeyError> {
        VerifyingKey::from_bytes(bytes)
            .map(|_| Self(*bytes))
            .map_err(|_| PublicKeyError::InvalidPoint)
    }

    /// The 32 raw bytes.
    pub fn to_bytes(&self) -> [u8; PUBLIC_KEY_LEN] {
        self.0
    }

    /// The libp2p peer id of this key.
    pub fn peer_id(&self) -> PeerId {
        PeerId::from_ed25519(&self.to_bytes())
    }

    /// Verifies a signature made with [`Identity::sign`] in `domain`.
    pub fn verify(
        &self,
        domain: Domain,
        message: &[u8],
        signature: &Signature,
    ) -> Result<(), crate::signing::SignatureError> {
        let key = VerifyingKey::from_bytes(&self.0)
            .map_err(|_| crate::signing::SignatureError::Invalid { domain })?;
        crate::signing::verify(&key, domain, message, signature)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = PublicKeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0u8; PUBLIC_KEY_LEN];
        hex::decode_to_slice(s.trim(), &mut bytes)
            .map_err(|_| PublicKeyError::BadEncoding(s.chars().take(80).collect()))?;
        Self::from_bytes(&bytes)
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            self.to_bytes().serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            text.parse().map_err(serde::de::Error::custom)
        } else {
            let bytes = <[u8; PUBLIC_KEY_LEN]>::deserialize(deserializer)?;
            Self::from_bytes(&bytes).map_err(serde::de::Error::custom)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Identity {
        Identity::from_seed(&[7u8; 32])
    }

    #[test]
    fn key_file_round_trips() {
        let id = sample();
        let back = Identity::from_key_file(&id.to_key_file()).unwrap();
        assert_eq!(back.public_key(), id.public_key());
        assert_eq!(*back.seed(), *id.seed());
    }

    #[test]
    fn truncated_key_file_is_named_truncated() {
        let text = sample().to_key_file();
        // Cut in the middle of the secret, at the end of the secret line, and mid-public.
        for cut in [
            text.find("secret").unwrap() + 20,
            text.find("public").unwrap(),
            text.len() - 10,
        ] {
            let err = Identity::from_key_file(&text[..cut]).unwrap_err();
            assert!(
                matches!(err, KeyFileError::Truncated(_)),
                "cut at {cut}: {err:?}"
            );
        }
        assert!(matches!(
            Identity::from_key_file(""),
            Err(KeyFileError::Truncated(_))
        ));
    }

    #[test]
    fn foreign_formats_are_named() {
        let pem =
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n";
        let err = Identity::from_key_file(pem).unwrap_err();
        assert!(err.to_string().contains("PEM"), "{err}");
        let psk = "/key/swarm/psk/1.0.0/\n/base16/\n00\n";
        let err = Identity::from_key_file(psk).unwrap_err();
        assert!(err.to_string().contains("network key"), "{err}");
        let err = Identity::from_key_file("format: medmesh-ed25519-v9\n").unwrap_err();
        assert!(matches!(err, KeyFileError::UnknownFormat { .. }));
    }

    #[test]
    fn mismatched_public_line_is_rejected() {
        let text = sample().to_key_file();
        let other = Identity::from_seed(&[8u8; 32]).public_key().to_string();
        let public_line = text.lines().find(|l| l.starts_with("public")).unwrap();
        let tampered = text.replace(public_line, &format!("public: {other}"));
        assert_eq!(
            Identity::from_key_file(&tampered).unwrap_err(),
            KeyFileError::PublicKeyMismatch
        );
    }

    #[test]
    fn two_members_agree_on_a_secret_no_third_knows() {
        let a = Identity::from_seed(&[1; 32]);
        let b = Identity::from_seed(&[2; 32]);
        let c = Identity::from_seed(&[3; 32]);
        let ab = a.shared_secret(&b.public_key()).unwrap();
        assert_eq!(*ab, *b.shared_secret(&a.public_key()).unwrap());
        assert_ne!(*ab, *a.shared_secret(&c.public_key()).unwrap());
        assert_ne!(*ab, *c.shared_secret(&b.public_key()).unwrap());
        // The identity point is a valid encoding, but of small order: refused.
        let mut small = [0u8; 32];
        small[0] = 1;
        let weak = PublicKey::from_bytes(&small).unwrap();
        assert_eq!(
            a.shared_secret(&weak).unwrap_err(),
            PublicKeyError::SmallOrder
        );
    }

    #[test]
    fn debug_output_hides_the_secret() {
        let id = sample();
        let shown = format!("{id:?}");
        assert!(!shown.contains(&hex::encode(id.seed().as_ref())));
    }

    proptest! {
        #[test]
        fn any_seed_round_trips_through_the_key_file(seed in any::<[u8; 32]>()) {
            let id = Identity::from_seed(&seed);
            let back = Identity::from_key_file(&id.to_key_file()).unwrap();
            prop_assert_eq!(back.public_key(), id.public_key());
        }

        #[test]
        fn public_key_text_and_bincode_round_trip(seed in any::<[u8; 32]>()) {
            let key = Identity::from_seed(&seed).public_key();
            prop_assert_eq!(key.to_string().parse::<PublicKey>().unwrap(), key);
            let cfg = bincode::config::standard();
            let bytes = bincode::serde::encode_to_vec(key, cfg).unwrap();
            prop_assert_eq!(bytes.len(), 32);
            let (back, _): (PublicKey, _) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
            prop_assert_eq!(back, key);
        }

        #[test]
        fn key_file_parser_never_panics(text in ".{0,300}") {
            let _ = Identity::from_key_file(&text);
        }
    }
}
