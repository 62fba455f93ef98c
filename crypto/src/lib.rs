//! The medmesh trust model: who a member is, what they signed, who belongs, and the key that
//! closes the network.
//!
//! * [`Identity`] / [`PublicKey`]: one ed25519 key per member; its libp2p [`PeerId`] is
//!   derived from the same key.
//! * [`signing`]: signatures with one context string per kind of object ([`Domain`]).
//! * [`roster`]: the signed membership list, endorsed by a quorum of stewards.
//! * [`NetworkKey`]: the 256-bit pre-shared key of the private libp2p network.
//!
//! Errors say what went wrong in their own text, including the cause (they expose no
//! `source()` chain), so a single log line or `{err}` is complete.
//!
//! This crate is pure: no I/O, no async runtime. Reading and writing files (and their
//! permissions) is the node's job; this crate parses and renders their contents.
//!
//! ```
//! use medmesh_crypto::{Domain, Identity};
//! let alice = Identity::from_seed(&[42; 32]);
//! let sig = alice.sign(Domain::Manifest, b"experiment");
//! assert!(alice.public_key().verify(Domain::Manifest, b"experiment", &sig).is_ok());
//! assert!(alice.public_key().verify(Domain::ProgressRecord, b"experiment", &sig).is_err());
//! ```

pub mod identity;
pub mod network_key;
pub mod peer_id;
pub mod roster;
pub mod signing;

pub use identity::{Identity, KeyFileError, PublicKey, PublicKeyError};
pub use network_key::{NetworkKey, NetworkKeyError};
pub use peer_id::PeerId;
pub use roster::{Member, MembershipError, Role, Roster, RosterError, SignedRoster, TrustedRoster};
pub use signing::{Domain, Signature, SignatureError};
