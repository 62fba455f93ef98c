//! The medmesh protocol: what peers say to each other and how they combine models.
//!
//! * [`manifest`]: experiment manifests (TOML/JSON), validation, researcher signatures.
//! * [`messages`]: every message peers exchange, with a bounded bincode codec.
//! * [`envelope`]: signed model-update envelopes and chunked payload reception.
//! * [`encoding`]: weight payloads as raw little-endian f32, f16 or int8.
//! * [`layout`]: parameter layouts (names, shapes, dtypes) and their digests.
//! * [`progress`]: signed per-round progress records.
//! * [`provenance`]: signed statements about exported models.
//! * [`averaging`] and [`robust`]: the averaging rules, as pure functions over flat slices,
//!   used by the node and the simulator alike.
//!
//! Errors say what went wrong in their own text, including the cause (they expose no
//! `source()` chain), so a single log line or `{err}` is complete.
//!
//! Pure: no I/O, no async runtime, no ML framework.

pub mod averaging;
pub mod encoding;
pub mod envelope;
pub mod layout;
pub mod manifest;
pub mod messages;
pub mod progress;
pub mod provenance;
pub mod robust;

pub use encoding::WeightEncoding;
pub use envelope::{
    PayloadAssembler, UpdateEnvelope, UpdateError, UpdateExpectation, UpdateHeader,
};
pub use layout::{DType, ParamLayout, TensorSpec};
pub use manifest::{Manifest, ManifestError, ManifestVerifyError, SignedManifest};
pub use messages::{Artifact, Message, WireError};
pub use progress::{ProgressRecord, SignedProgress};
pub use provenance::{Provenance, ProvenanceError, SignedProvenance};
