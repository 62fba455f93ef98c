//! Model-update envelopes and chunked payload transfer.
//!
//! A node offers its weights for a round as a small signed [`UpdateEnvelope`]; the payload
//! (raw little-endian tensor bytes, see [`crate::encoding`]) follows in chunks. The receiver
//! checks the envelope against the manifest's layout *before* allocating, then feeds chunks
//! to a [`PayloadAssembler`], which hashes as it goes and refuses anything out of place.

use medmesh_crypto::{Domain, Identity, PublicKey, Signature, SignatureError};
use serde::{Deserialize, Serialize};

use crate::encoding::{PayloadError, WeightEncoding};
use crate::layout::ParamLayout;

/// Default payload chunk size: 1 MiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Largest chunk size a receiver accepts.
pub const MAX_CHUNK_SIZE: u32 = 1 << 20;
/// Smallest chunk size a receiver accepts (keeps per-chunk overhead sane).
pub const MIN_CHUNK_SIZE: u32 = 4 << 10;

/// Chunks a sender aims to split a payload into, for payloads under 16 MiB.
pub const TARGET_CHUNKS: u64 = 16;

/// The chunk size a sender picks for a payload of `payload_len` bytes: about a
/// [`TARGET_CHUNKS`]th of it, within 16 KiB..=[`MAX_CHUNK_SIZE`], a multiple of 4. Small
/// models get small chunks, so a receiver with a few chunks in flight holds a small part of
/// the model at a time rather than all of it, several times over.
pub fn chunk_size_for(payload_len: u64) -> u32 {
    let target = (payload_len / TARGET_CHUNKS).clamp(16 << 10, u64::from(MAX_CHUNK_SIZE));
    (target as u32) & !3
}

/// Everything an envelope says about an update; the signature covers exactly this.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateHeader {
    /// The experiment.
    pub experiment_id: String,
    /// Digest of the exact manifest this update was trained under.
    pub manifest_digest: [u8; 32],
    /// Communication round.
    pub round: u64,
    /// The attempt at the round: 0, or a secure-aggregation redo without members whose
    /// upload did not arrive ([`crate::secagg`]).
    pub attempt: u32,
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
    Signature(SignatureError),
    /// For another experiment or manifest version.
    #[error("update is for experiment {got:?}, expected {expected:?} (or its manifest differs)")]
    WrongExperiment {
        /// Expected experiment id.
        expected: String,
        /// Offered experiment id.
        got: String,
    },
    /// The layout digest or parameter count does not match the local model.
    #[error(
        "update layout does not match: expected {expected_params} parameters with layout {expected_digest}, got {got_params} with {got_digest}"
    )]
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
    /// Chunk size out of range or not a multiple of 4.
    #[error("chunk size {0} must be a multiple of 4 in {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}")]
    BadChunkSize(u32),
    /// The payload hashed correctly but does not decode (e.g. a NaN int8 scale).
    #[error("payload does not decode: {0}")]
    Payload(PayloadError),
    /// Sample weight NaN, infinite, or not positive.
    #[error("sample weight {0} must be a positive finite number")]
    BadSampleWeight(f64),
    /// A chunk arrived at the wrong offset or with the wrong length.
    #[error(
        "chunk at offset {offset} with {len} bytes is out of place (expected offset {expected_offset}, {expected_len} bytes)"
    )]
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

impl UpdateError {
    /// A short, stable name of the reason, for metrics labels and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Signature(_) => "bad_signature",
            Self::WrongExperiment { .. } => "wrong_experiment",
            Self::LayoutMismatch { .. } => "wrong_layout",
            Self::WrongEncoding { .. } => "wrong_encoding",
            Self::WrongPayloadSize { .. } => "wrong_payload_size",
            Self::BadChunkSize(_) => "bad_chunk_size",
            Self::Payload(_) => "undecodable_payload",
            Self::BadSampleWeight(_) => "bad_sample_weight",
            Self::ChunkOutOfPlace { .. } => "chunk_out_of_place",
            Self::Incomplete { .. } => "incomplete_payload",
            Self::HashMismatch => "hash_mismatch",
        }
    }
}

impl From<SignatureError> for UpdateError {
    fn from(e: SignatureError) -> Self {
        Self::Signature(e)
    }
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
        self.header.sender.verify(
            Domain::UpdateEnvelope,
            &self.header.canonical_bytes(),
            &self.signature,
        )
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
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&h.chunk_size)
            || !h.chunk_size.is_multiple_of(4)
        {
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

/// Payloads at least this large are hashed on all cores (BLAKE3's tree mode parallelizes).
const PARALLEL_HASH_MIN: usize = 128 << 10;

/// BLAKE3 of a payload.
pub fn hash_payload(payload: &[u8]) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    hash_update(&mut hasher, payload);
    hasher.finalize()
}

fn hash_update(hasher: &mut blake3::Hasher, bytes: &[u8]) {
    if bytes.len() >= PARALLEL_HASH_MIN {
        hasher.update_rayon(bytes);
    } else {
        hasher.update(bytes);
    }
}

/// Splits a payload into `(offset, bytes)` chunks of `chunk_size`.
pub fn chunks(payload: &[u8], chunk_size: u32) -> impl Iterator<Item = (u64, &[u8])> {
    let size = chunk_size.max(1) as usize;
    payload
        .chunks(size)
        .enumerate()
        .map(move |(i, c)| ((i * size) as u64, c))
}

/// Receives a payload chunk by chunk for a checked envelope, hashing and decoding each chunk
/// while it is still in cache.
///
/// Memory is reserved once, for exactly the size that the *receiver's own* layout and
/// encoding imply (checked by [`UpdateEnvelope::check`]), never for what a peer claims; the
/// output vector can be recycled from an earlier transfer. Decoded values are handed out only
/// by [`PayloadAssembler::finish`], after the hash matched. After a dropped connection, ask the
/// sender to resume at [`PayloadAssembler::received`].
#[derive(Debug)]
pub struct PayloadAssembler {
    expected_len: u64,
    chunk_size: u32,
    params: u64,
    encoding: WeightEncoding,
    expected_hash: [u8; 32],
    hasher: blake3::Hasher,
    received: u64,
    /// Decoded values (f32, f16 payloads).
    values: Vec<f32>,
    /// Raw bytes of payloads that only decode whole (int8: scales come first).
    raw: Vec<u8>,
}

impl PayloadAssembler {
    /// Starts receiving the payload of `envelope`; checks it against `expect` first.
    /// `recycled` is any vector to reuse for the output (its contents are discarded).
    pub fn new(
        envelope: &UpdateEnvelope,
        expect: &UpdateExpectation<'_>,
        mut recycled: Vec<f32>,
    ) -> Result<Self, UpdateError> {
        envelope.check(expect)?;
        let h = &envelope.header;
        recycled.clear();
        recycled.reserve_exact(h.num_params as usize);
        let raw = match h.encoding.element_size() {
            Some(_) => Vec::new(),
            None => Vec::with_capacity(h.payload_len as usize),
        };
        Ok(Self {
            expected_len: h.payload_len,
            chunk_size: h.chunk_size,
            params: h.num_params,
            encoding: h.encoding,
            expected_hash: h.payload_hash,
            hasher: blake3::Hasher::new(),
            received: 0,
            values: recycled,
            raw,
        })
    }

    /// Bytes received so far: the offset to resume from.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Whether every byte has arrived.
    pub fn is_complete(&self) -> bool {
        self.received == self.expected_len
    }

    /// Takes the chunk at `offset`. Chunks must arrive in order with the declared size.
    pub fn push(&mut self, offset: u64, bytes: &[u8]) -> Result<(), UpdateError> {
        let expected_offset = self.received;
        let expected_len = u64::from(self.chunk_size).min(self.expected_len - expected_offset);
        if offset != expected_offset || bytes.len() as u64 != expected_len || expected_len == 0 {
            return Err(UpdateError::ChunkOutOfPlace {
                offset,
                len: bytes.len(),
                expected_offset,
                expected_len,
            });
        }
        let (hasher, encoding) = (&mut self.hasher, self.encoding);
        match encoding.element_size() {
            // Hash on one core while the other decodes; chunk sizes are multiples of 4
            // (checked), so every chunk holds whole elements.
            Some(_) => {
                let values = &mut self.values;
                rayon_core::join(
                    || hasher.update_rayon(bytes),
                    || encoding.decode_elementwise(bytes, values),
                );
            }
            None => {
                hash_update(hasher, bytes);
                self.raw.extend_from_slice(bytes);
            }
        }
        self.received += expected_len;
        Ok(())
    }

    /// Checks completeness and the hash, and hands over the payload's bytes undecoded (for
    /// encodings without element-wise decoding: int8, masked residues).
    pub fn finish_raw(self) -> Result<Vec<u8>, UpdateError> {
        self.check_complete()?;
        Ok(self.raw)
    }

    fn check_complete(&self) -> Result<(), UpdateError> {
        if !self.is_complete() {
            return Err(UpdateError::Incomplete {
                received: self.received,
                expected: self.expected_len,
            });
        }
        if *self.hasher.finalize().as_bytes() != self.expected_hash {
            return Err(UpdateError::HashMismatch);
        }
        Ok(())
    }

    /// Checks completeness and the hash, and hands over the decoded weights.
    pub fn finish(mut self) -> Result<Vec<f32>, UpdateError> {
        self.check_complete()?;
        if self.encoding.element_size().is_none() {
            self.encoding
                .decode_into(&self.raw, self.params, &mut self.values)
                .map_err(UpdateError::Payload)?;
        }
        Ok(self.values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{DType, TensorSpec};
    use proptest::prelude::*;

    #[test]
    fn chunk_sizes_follow_the_payload_within_bounds() {
        assert_eq!(chunk_size_for(0), 16 << 10);
        assert_eq!(chunk_size_for(1 << 20), 64 << 10);
        assert_eq!(chunk_size_for(8 << 20), 512 << 10);
        assert_eq!(chunk_size_for(1 << 30), MAX_CHUNK_SIZE);
        for len in [0, 5, 1_000_003, 77_777_777, u64::MAX] {
            let c = chunk_size_for(len);
            assert!(
                (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&c) && c.is_multiple_of(4),
                "{len}: {c}"
            );
        }
    }

    fn layout(n: u64) -> ParamLayout {
        ParamLayout {
            tensors: vec![TensorSpec {
                name: "w".into(),
                shape: vec![n],
                dtype: DType::F32,
            }],
        }
    }

    fn sealed(values: &[f32], chunk_size: u32) -> (UpdateEnvelope, Vec<u8>) {
        sealed_as(values, chunk_size, WeightEncoding::F32)
    }

    fn sealed_as(
        values: &[f32],
        chunk_size: u32,
        encoding: WeightEncoding,
    ) -> (UpdateEnvelope, Vec<u8>) {
        let sender = Identity::from_seed(&[5; 32]);
        let payload = encoding.encode(values);
        let header = UpdateHeader {
            experiment_id: "exp".into(),
            manifest_digest: [1; 32],
            round: 3,
            attempt: 0,
            sender: sender.public_key(),
            layout_digest: layout(values.len() as u64).digest(),
            num_params: values.len() as u64,
            encoding,
            sample_weight: 120.0,
            payload_len: 0,
            payload_hash: [0; 32],
            chunk_size,
        };
        (UpdateEnvelope::seal(header, &payload, &sender), payload)
    }

    fn expect(layout: &ParamLayout) -> UpdateExpectation<'_> {
        UpdateExpectation {
            experiment_id: "exp",
            manifest_digest: &[1; 32],
            layout,
            encoding: WeightEncoding::F32,
        }
    }

    fn receive(
        env: &UpdateEnvelope,
        payload: &[u8],
        l: &ParamLayout,
    ) -> Result<Vec<f32>, UpdateError> {
        let mut asm = PayloadAssembler::new(env, &expect(l), Vec::new())?;
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
            let got = receive(&env, &payload, &l).unwrap();
            prop_assert!(got.iter().zip(&values).all(|(a, b)| a.to_bits() == b.to_bits()) && got.len() == values.len());
        }
    }

    #[test]
    fn compressed_payloads_decode_through_the_assembler() {
        let values: Vec<f32> = (0..10_000).map(|i| (i as f32 * 0.01).sin()).collect();
        let l = layout(values.len() as u64);
        for (encoding, tol) in [
            (WeightEncoding::F16, 1e-3),
            (WeightEncoding::Int8, 1.0 / 127.0),
        ] {
            let (env, payload) = sealed_as(&values, 4096, encoding);
            let exp = UpdateExpectation {
                encoding,
                ..expect(&l)
            };
            let mut asm = PayloadAssembler::new(&env, &exp, Vec::new()).unwrap();
            for (offset, chunk) in chunks(&payload, 4096) {
                asm.push(offset, chunk).unwrap();
            }
            let got = asm.finish().unwrap();
            assert_eq!(got.len(), values.len());
            assert!(
                got.iter().zip(&values).all(|(a, b)| (a - b).abs() <= tol),
                "{encoding:?}"
            );
        }
    }

    #[test]
    fn flipped_payload_bit_is_a_hash_mismatch() {
        let values = vec![0.5f32; 5000];
        let (env, mut payload) = sealed(&values, 4096);
        payload[1234] ^= 0x10;
        assert_eq!(
            receive(&env, &payload, &layout(5000)),
            Err(UpdateError::HashMismatch)
        );
    }

    #[test]
    fn envelope_defects_are_named() {
        let (env, _) = sealed(&[1.0; 100], 4096);
        let l = layout(100);
        assert!(matches!(
            env.check(&expect(&layout(101))),
            Err(UpdateError::LayoutMismatch { .. })
        ));
        let mut forged = env.clone();
        forged.header.round = 4;
        assert!(matches!(
            forged.check(&expect(&l)),
            Err(UpdateError::Signature(_))
        ));
        let mut huge = env.clone();
        huge.header.payload_len = u64::MAX;
        assert!(matches!(
            huge.check(&expect(&l)),
            Err(UpdateError::WrongPayloadSize { .. })
        ));
        let mut nan = env.clone();
        nan.header.sample_weight = f64::NAN;
        assert!(matches!(
            nan.check(&expect(&l)),
            Err(UpdateError::BadSampleWeight(_))
        ));
        let mut odd = env.clone();
        odd.header.chunk_size = 4097;
        assert!(matches!(
            odd.check(&expect(&l)),
            Err(UpdateError::BadChunkSize(4097))
        ));
        let other = UpdateExpectation {
            experiment_id: "other",
            ..expect(&l)
        };
        assert!(matches!(
            env.check(&other),
            Err(UpdateError::WrongExperiment { .. })
        ));
    }

    #[test]
    fn out_of_place_and_missing_chunks_are_refused_and_resumable() {
        let values = vec![2.0f32; 3000];
        let (env, payload) = sealed(&values, 4096);
        let l = layout(3000);
        let mut asm = PayloadAssembler::new(&env, &expect(&l), Vec::new()).unwrap();
        assert!(matches!(
            asm.push(4096, &payload[4096..8192]),
            Err(UpdateError::ChunkOutOfPlace { .. })
        ));
        asm.push(0, &payload[..4096]).unwrap();
        // Connection drops here; the receiver resumes from `received()`.
        let resume_at = asm.received() as usize;
        assert_eq!(resume_at, 4096);
        asm.push(4096, &payload[4096..8192]).unwrap();
        let partial = asm;
        assert!(matches!(
            partial.finish(),
            Err(UpdateError::Incomplete {
                received: 8192,
                expected: 12000
            })
        ));
    }
}
