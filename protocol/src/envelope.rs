//! Model-update envelopes and chunked payload transfer.
//!
//! A node offers its weights for a round as a small signed [`UpdateEnvelope`]; the payload
//! (raw little-endian tensor bytes, see [`crate::encoding`]) follows in chunks. The receiver
//! checks the envelope against the manifest's layout *before* allocating, then feeds chunks
//! to a [`PayloadAssembler`], which hashes as it goes and refuses anything out of place.

use medmesh_crypto::{Domain, Identity, PublicKey, Signature, SignatureError};
use serde::{Deserialize, Serialize};

use crate::encoding::WeightEncoding;
use crate::layout::ParamLayout;

/// Default payload chunk size: 1 MiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Largest chunk size a receiver accepts.
pub const MAX_CHUNK_SIZE: u32 = 1 << 20;
/// Smallest chunk size a receiver accepts (keeps per-chunk overhead sane).
pub const MIN_CHUNK_SIZE: u32 = 4 << 10;

/// Everything an envelope says about an update; the signature covers exactly this.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateHeader {
    /// The experiment.
    pub experiment_id: String,
    /// Digest of the exact manifest this update was trained under.
    pub manifest_digest: [u8; 32],
    /// Communication round.
    pub round: u64,
    /// The sending node.
    pub sender: PublicKey,
    /// Digest of the [`ParamLayout`] of the payload (names, shapes, dtypes).
    pub layout_digest: [u8; 32],
    /// Number of parameters in the payload.
    pub num_params: u64,
    /// How the payload encodes them.
    pub encoding: WeightEncoding,
    /// Weight of this model in averaging: the sender's training sample count, or its
    /// push-sum mass under the push-sum scheme.
    pub sample_weight: f64,
    /// Exact payload length in bytes.
    pub payload_len: u64,
    /// BLAKE3 of the payload.
    pub payload_hash: [u8; 32],
    /// Bytes per chunk (the last may be shorter).
    pub chunk_size: u32,
}

/// A signed [`UpdateHeader`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateEnvelope {
    /// What is offered.
    pub header: UpdateHeader,
    /// The sender's signature in [`Domain::UpdateEnvelope`] over the header's bincode bytes.
    pub signature: Signature,
}

/// What the receiver expects of an update, from its manifest and model.
#[derive(Debug, Clone, Copy)]
pub struct UpdateExpectation<'a> {
    /// Experiment id.
    pub experiment_id: &'a str,
    /// Manifest digest.
    pub manifest_digest: &'a [u8; 32],
    /// The layout being averaged (after leaving local layers out).
    pub layout: &'a ParamLayout,
    /// The manifest's encoding.
    pub encoding: WeightEncoding,
}

/// Why an update was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum UpdateError {
    /// The envelope's signature does not verify.
    #[error("update signature rejected: {0}")]
    Signature(#[from] SignatureError),
    /// For another experiment or manifest version.
    #[error("update is for experiment {got:?}, expected {expected:?} (or its manifest differs)")]
    WrongExperiment {
        /// Expected experiment id.
        expected: String,
        /// Offered experiment id.
        got: String,
    },
    /// The layout digest or parameter count does not match the local model.
    #[error("update layout does not match: expected {expected_params} parameters with layout {expected_digest}, got {got_params} with {got_digest}")]
    LayoutMismatch {
        /// Local parameter count.
        expected_params: u64,
        /// Offered parameter count.
        got_params: u64,
        /// Local layout digest (hex, shortened).
        expected_digest: String,
        /// Offered layout digest (hex, shortened).
        got_digest: String,
    },
    /// Not the manifest's encoding.
    #[error("update uses encoding {got:?}, the manifest says {expected:?}")]
    WrongEncoding {
        /// The manifest's.
        expected: WeightEncoding,
        /// Offered.
        got: WeightEncoding,
    },
    /// The declared payload length does not fit the layout, or exceeds the limit.
    #[error("update declares {declared} payload bytes, but exactly {expected} are allowed")]
    WrongPayloadSize {
        /// Offered.
        declared: u64,
        /// What layout and encoding imply.
        expected: u64,
    },
    /// Chunk size out of range.
    #[error("chunk size {0} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}")]
    BadChunkSize(u32),
    /// Sample weight NaN, infinite, or not positive.
    #[error("sample weight {0} must be a positive finite number")]
    BadSampleWeight(f64),
    /// A chunk arrived at the wrong offset or with the wrong length.
    #[error("chunk at offset {offset} with {len} bytes is out of place (expected offset {expected_offset}, {expected_len} bytes)")]
    ChunkOutOfPlace {
        /// Offered offset.
        offset: u64,
        /// Offered length.
        len: usize,
        /// Next expected offset.
        expected_offset: u64,
        /// Expected length at that offset.
        expected_len: u64,
    },
    /// The transfer ended before the full payload arrived.
    #[error("payload incomplete: {received} of {expected} bytes")]
    Incomplete {
        /// Bytes received.
        received: u64,
        /// Bytes declared.
        expected: u64,
    },
    /// The payload's hash does not match the signed envelope.
    #[error("payload hash mismatch: the payload was altered in transit or by its sender")]
    HashMismatch,
}

impl UpdateHeader {
    fn canonical_bytes(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(self, bincode::config::standard())
            .unwrap_or_else(|e| unreachable!("encoding a header into memory cannot fail: {e}"))
    }

    /// Number of chunks the payload is sent in.
    pub fn chunk_count(&self) -> u64 {
        self.payload_len.div_ceil(u64::from(self.chunk_size.max(1)))
    }
}

impl UpdateEnvelope {
    /// Hashes `payload`, fills in the payload fields of `header`, and signs it.
    pub fn seal(mut header: UpdateHeader, payload: &[u8], sender: &Identity) -> Self {
        header.sender = sender.public_key();
        header.payload_len = payload.len() as u64;
        header.payload_hash = *hash_payload(payload).as_bytes();
        let signature = sender.sign(Domain::UpdateEnvelope, &header.canonical_bytes());
        Self { header, signature }
    }

    /// Verifies the sender's signature.
    pub fn verify_signature(&self) -> Result<(), SignatureError> {
        self.header
            .sender
            .verify(Domain::UpdateEnvelope, &self.header.canonical_bytes(), &self.signature)
    }

    /// Checks signature and every field against what the receiver expects. Cheap: run it
    /// before reading a single payload byte.
    pub fn check(&self, expect: &UpdateExpectation<'_>) -> Result<(), UpdateError> {
        let h = &self.header;
        if h.experiment_id != expect.experiment_id || h.manifest_digest != *expect.manifest_digest {
            return Err(UpdateError::WrongExperiment {
                expected: expect.experiment_id.to_owned(),
                got: h.experiment_id.clone(),
            });
        }
        let layout_digest = expect.layout.digest();
        if h.layout_digest != layout_digest || h.num_params != expect.layout.num_params() {
            return Err(UpdateError::LayoutMismatch {
                expected_params: expect.layout.num_params(),
                got_params: h.num_params,
                expected_digest: hex_prefix(&layout_digest),
                got_digest: hex_prefix(&h.layout_digest),
            });
        }
        if h.encoding != expect.encoding {
            return Err(UpdateError::WrongEncoding {
                expected: expect.encoding,
                got: h.encoding,
            });
        }
        let expected_len = h.encoding.payload_len(h.num_params);
        if h.payload_len != expected_len {
            return Err(UpdateError::WrongPayloadSize {
                declared: h.payload_len,
                expected: expected_len,
            });
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&h.chunk_size) {
            return Err(UpdateError::BadChunkSize(h.chunk_size));
        }
        if !(h.sample_weight.is_finite() && h.sample_weight > 0.0) {
            return Err(UpdateError::BadSampleWeight(h.sample_weight));
        }
        self.verify_signature()?;
        Ok(())
    }
}

fn hex_prefix(digest: &[u8; 32]) -> String {
    digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// BLAKE3 of a payload. Large payloads are hashed with BLAKE3's SIMD tree mode, which is
/// what makes hashing cheaper than copying.
pub fn hash_payload(payload: &[u8]) -> blake3::Hash {
    blake3::hash(payload)
}

/// Splits a payload into `(offset, bytes)` chunks of `chunk_size`.
pub fn chunks(payload: &[u8], chunk_size: u32) -> impl Iterator<Item = (u64, &[u8])> {
    let size = chunk_size.max(1) as usize;
    payload
        .chunks(size)
        .enumerate()
        .map(move |(i, c)| ((i * size) as u64, c))
}

/// Receives a payload chunk by chunk for a checked envelope.
///
/// Memory is reserved once, for exactly the size that the *receiver's own* layout and
/// encoding imply (checked by [`UpdateEnvelope::check`]), never for what a peer claims.
/// After a dropped connection, ask the sender to resume at [`PayloadAssembler::received`].
#[derive(Debug)]
pub struct PayloadAssembler {
    expected_len: u64,
    chunk_size: u32,
    expected_hash: [u8; 32],
    buffer: Vec<u8>,
}

impl PayloadAssembler {
    /// Starts receiving the payload of `envelope`, which must already have passed
    /// [`UpdateEnvelope::check`] against `expect`.
    pub fn new(envelope: &UpdateEnvelope, expect: &UpdateExpectation<'_>) -> Result<Self, UpdateError> {
        envelope.check(expect)?;
        let h = &envelope.header;
        Ok(Self {
            expected_len: h.payload_len,
            chunk_size: h.chunk_size,
            expected_hash: h.payload_hash,
            buffer: Vec::with_capacity(h.payload_len as usize),
        })
    }

    /// Bytes received so far: the offset to resume from.
    pub fn received(&self) -> u64 {
        self.buffer.len() as u64
    }

    /// Whether every byte has arrived.
    pub fn is_complete(&self) -> bool {
        self.received() == self.expected_len
    }

    /// Appends the chunk at `offset`. Chunks must arrive in order with the declared size.
    pub fn push(&mut self, offset: u64, bytes: &[u8]) -> Result<(), UpdateError> {
        let expected_offset = self.received();
        let expected_len = u64::from(self.chunk_size).min(self.expected_len - expected_offset);
        if offset != expected_offset || bytes.len() as u64 != expected_len || expected_len == 0 {
            return Err(UpdateError::ChunkOutOfPlace {
                offset,
                len: bytes.len(),
                expected_offset,
                expected_len,
            });
        }
        self.buffer.extend_from_slice(bytes);
        Ok(())
    }

    /// Checks completeness and the hash, and hands over the payload.
    pub fn finish(self) -> Result<Vec<u8>, UpdateError> {
        if !self.is_complete() {
            return Err(UpdateError::Incomplete {
                received: self.received(),
                expected: self.expected_len,
            });
        }
        if *hash_payload(&self.buffer).as_bytes() != self.expected_hash {
            return Err(UpdateError::HashMismatch);
        }
        Ok(self.buffer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{DType, TensorSpec};
    use proptest::prelude::*;

    fn layout(n: u64) -> ParamLayout {
        ParamLayout { tensors: vec![TensorSpec { name: "w".into(), shape: vec![n], dtype: DType::F32 }] }
    }

    fn sealed(values: &[f32], chunk_size: u32) -> (UpdateEnvelope, Vec<u8>) {
        let sender = Identity::from_seed(&[5; 32]);
        let payload = WeightEncoding::F32.encode(values);
        let header = UpdateHeader {
            experiment_id: "exp".into(),
            manifest_digest: [1; 32],
            round: 3,
            sender: sender.public_key(),
            layout_digest: layout(values.len() as u64).digest(),
            num_params: values.len() as u64,
            encoding: WeightEncoding::F32,
            sample_weight: 120.0,
            payload_len: 0,
            payload_hash: [0; 32],
            chunk_size,
        };
        (UpdateEnvelope::seal(header, &payload, &sender), payload)
    }

    fn expect(layout: &ParamLayout) -> UpdateExpectation<'_> {
        UpdateExpectation { experiment_id: "exp", manifest_digest: &[1; 32], layout, encoding: WeightEncoding::F32 }
    }

    fn receive(env: &UpdateEnvelope, payload: &[u8], l: &ParamLayout) -> Result<Vec<u8>, UpdateError> {
        let mut asm = PayloadAssembler::new(env, &expect(l))?;
        for (offset, chunk) in chunks(payload, env.header.chunk_size) {
            asm.push(offset, chunk)?;
        }
        asm.finish()
    }

    proptest! {
        #[test]
        fn payload_survives_chunked_transfer(values in proptest::collection::vec(any::<f32>(), 1..20_000), chunk_kib in 4u32..64) {
            let (env, payload) = sealed(&values, chunk_kib << 10);
            let l = layout(values.len() as u64);
            prop_assert_eq!(receive(&env, &payload, &l).unwrap(), payload);
        }
    }

    #[test]
    fn flipped_payload_bit_is_a_hash_mismatch() {
        let values = vec![0.5f32; 5000];
        let (env, mut payload) = sealed(&values, 4096);
        payload[1234] ^= 0x10;
        assert_eq!(receive(&env, &payload, &layout(5000)), Err(UpdateError::HashMismatch));
    }

    #[test]
    fn envelope_defects_are_named() {
        let (env, _) = sealed(&[1.0; 100], 4096);
        let l = layout(100);
        assert!(matches!(env.check(&expect(&layout(101))), Err(UpdateError::LayoutMismatch { .. })));
        let mut forged = env.clone();
        forged.header.round = 4;
        assert!(matches!(forged.check(&expect(&l)), Err(UpdateError::Signature(_))));
        let mut huge = env.clone();
        huge.header.payload_len = u64::MAX;
        assert!(matches!(huge.check(&expect(&l)), Err(UpdateError::WrongPayloadSize { .. })));
        let mut nan = env.clone();
        nan.header.sample_weight = f64::NAN;
        assert!(matches!(nan.check(&expect(&l)), Err(UpdateError::BadSampleWeight(_))));
        let other = UpdateExpectation { experiment_id: "other", ..expect(&l) };
        assert!(matches!(env.check(&other), Err(UpdateError::WrongExperiment { .. })));
    }

    #[test]
    fn out_of_place_and_missing_chunks_are_refused_and_resumable() {
        let values = vec![2.0f32; 3000];
        let (env, payload) = sealed(&values, 4096);
        let l = layout(3000);
        let mut asm = PayloadAssembler::new(&env, &expect(&l)).unwrap();
        assert!(matches!(asm.push(4096, &payload[4096..8192]), Err(UpdateError::ChunkOutOfPlace { .. })));
        asm.push(0, &payload[..4096]).unwrap();
        // Connection drops here; the receiver resumes from `received()`.
        let resume_at = asm.received() as usize;
        assert_eq!(resume_at, 4096);
        asm.push(4096, &payload[4096..8192]).unwrap();
        let partial = asm;
        assert!(matches!(partial.finish(), Err(UpdateError::Incomplete { received: 8192, expected: 12000 })));
    }
}
