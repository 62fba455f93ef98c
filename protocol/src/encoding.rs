//! Weight payloads: flat f32 parameters as raw little-endian bytes, optionally compressed to
//! f16 or to int8 with per-block scales.
//!
//! The payload length is a function of the parameter count and the encoding alone
//! ([`WeightEncoding::payload_len`]), so a receiver knows exactly how many bytes to accept
//! before it allocates anything.

use serde::{Deserialize, Serialize};

/// Values per int8 block; each block carries one f32 scale.
pub const INT8_BLOCK: usize = 1024;

/// How weights are written into a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightEncoding {
    /// 4 bytes per value, exact.
    #[default]
    F32,
    /// 2 bytes per value (IEEE half precision, round to nearest).
    F16,
    /// 1 byte per value: symmetric int8 with one f32 scale per [`INT8_BLOCK`] values.
    /// Layout: all scales (little-endian f32) first, then all quantized values.
    Int8,
    /// 8 bytes per value: little-endian u64 residues modulo 2^64 of signed fixed point with
    /// [`crate::secagg::FRACTION_BITS`] fractional bits. Secure aggregation sends its
    /// masked uploads so ([`crate::secagg`]); a manifest does not choose it. Encoding f32
    /// values writes their unmasked residues (saturating).
    Masked,
}

/// Why a payload could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    /// Its length does not match the parameter count and encoding.
    #[error(
        "payload has {actual} bytes, but {expected} are needed for {params} parameters as {encoding:?}"
    )]
    WrongLength {
        /// The parameter count.
        params: u64,
        /// The encoding.
        encoding: WeightEncoding,
        /// Bytes expected.
        expected: u64,
        /// Bytes present.
        actual: u64,
    },
    /// An int8 block scale is NaN, infinite or negative.
    #[error("int8 scale of block {block} is not a finite non-negative number")]
    BadScale {
        /// Block index.
        block: usize,
    },
}

impl WeightEncoding {
    /// Exact payload size for `params` values.
    pub fn payload_len(self, params: u64) -> u64 {
        match self {
            WeightEncoding::F32 => params * 4,
            WeightEncoding::F16 => params * 2,
            WeightEncoding::Int8 => params.div_ceil(INT8_BLOCK as u64) * 4 + params,
            WeightEncoding::Masked => params * 8,
        }
    }

    /// Writes `values` as a payload into a fresh vector.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(values, &mut out);
        out
    }

    /// Writes `values` as a payload into `out` (cleared first), reusing its allocation.
    pub fn encode_into(self, values: &[f32], out: &mut Vec<u8>) {
        out.clear();
        out.reserve_exact(self.payload_len(values.len() as u64) as usize);
        match self {
            WeightEncoding::F32 => out.extend_from_slice(f32_le_bytes(values).as_ref()),
            WeightEncoding::F16 => out.extend(
                values
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes()),
            ),
            WeightEncoding::Int8 => encode_int8(values, out),
            WeightEncoding::Masked => {
                let residues: Vec<u64> = values
                    .iter()
                    .map(|&v| crate::secagg::to_fixed(f64::from(v)))
                    .collect();
                out.extend_from_slice(&residue_bytes(&residues));
            }
        }
    }

    /// The payload of `values`: on little-endian machines an f32 payload *is* the weights'
    /// memory, so it is borrowed without a copy; other encodings are written into `scratch`.
    pub fn payload<'a>(self, values: &'a [f32], scratch: &'a mut Vec<u8>) -> &'a [u8] {
        match (self, f32_le_bytes(values)) {
            (WeightEncoding::F32, std::borrow::Cow::Borrowed(bytes)) => bytes,
            _ => {
                self.encode_into(values, scratch);
                scratch
            }
        }
    }

    /// Reads a payload of `params` values into `out` (cleared first).
    pub fn decode_into(
        self,
        payload: &[u8],
        params: u64,
        out: &mut Vec<f32>,
    ) -> Result<(), PayloadError> {
        let expected = self.payload_len(params);
        if payload.len() as u64 != expected {
            return Err(PayloadError::WrongLength {
                params,
                encoding: self,
                expected,
                actual: payload.len() as u64,
            });
        }
        out.clear();
        out.reserve_exact(params as usize);
        match self {
            WeightEncoding::F32 | WeightEncoding::F16 => self.decode_elementwise(payload, out),
            WeightEncoding::Int8 => decode_int8(payload, params as usize, out)?,
            WeightEncoding::Masked => out.extend(
                residues(payload)
                    .into_iter()
                    .map(|r| crate::secagg::from_fixed(r) as f32),
            ),
        }
        Ok(())
    }

    /// Convenience: decode into a fresh vector.
    pub fn decode(self, payload: &[u8], params: u64) -> Result<Vec<f32>, PayloadError> {
        let mut out = Vec::new();
        self.decode_into(payload, params, &mut out)?;
        Ok(out)
    }

    /// Bytes per value for encodings without side data (f32, f16); `None` for int8.
    pub fn element_size(self) -> Option<usize> {
        match self {
            WeightEncoding::F32 => Some(4),
            WeightEncoding::F16 => Some(2),
            WeightEncoding::Int8 | WeightEncoding::Masked => None,
        }
    }

    /// Appends the values of `bytes` (whole elements of an f32 or f16 payload) to `out`, so a
    /// receiver can decode chunk by chunk while the chunk is still in cache. Trailing partial
    /// elements are ignored; int8 payloads are not element-wise and append nothing.
    pub fn decode_elementwise(self, bytes: &[u8], out: &mut Vec<f32>) {
        match self {
            WeightEncoding::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
            WeightEncoding::F16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
            WeightEncoding::Int8 | WeightEncoding::Masked => {}
        }
    }
}

/// The payload bytes of `masked` residues (see [`WeightEncoding::Masked`]).
pub fn residue_bytes(masked: &[u64]) -> Vec<u8> {
    masked.iter().flat_map(|r| r.to_le_bytes()).collect()
}

/// The residues of a [`WeightEncoding::Masked`] payload (trailing partial values ignored).
pub fn residues(payload: &[u8]) -> Vec<u64> {
    payload
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
        .collect()
}

fn f32_le_bytes(values: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        std::borrow::Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

fn encode_int8(values: &[f32], out: &mut Vec<u8>) {
    let scales: Vec<f32> = values
        .chunks(INT8_BLOCK)
        .map(|block| {
            let max = block
                .iter()
                .filter(|v| v.is_finite())
                .fold(0f32, |m, v| m.max(v.abs()));
            max / 127.0
        })
        .collect();
    for s in &scales {
        out.extend_from_slice(&s.to_le_bytes());
    }
    for (block, scale) in values.chunks(INT8_BLOCK).zip(&scales) {
        let inv = if *scale > 0.0 { 1.0 / scale } else { 0.0 };
        out.extend(
            block
                .iter()
                .map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8),
        );
    }
}

fn decode_int8(payload: &[u8], params: usize, out: &mut Vec<f32>) -> Result<(), PayloadError> {
    let blocks = params.div_ceil(INT8_BLOCK);
    let (scales, quantized) = payload.split_at(blocks * 4);
    for (i, (s, block)) in scales
        .chunks_exact(4)
        .zip(quantized.chunks(INT8_BLOCK))
        .enumerate()
    {
        let scale = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        if !scale.is_finite() || scale < 0.0 {
            return Err(PayloadError::BadScale { block: i });
        }
        out.extend(block.iter().map(|q| f32::from(*q as i8) * scale));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn masked_payloads_are_fixed_point_residues() {
        let values = [0.0f32, 1.5, -2.25, 1e-7, 3.0e4];
        let payload = WeightEncoding::Masked.encode(&values);
        assert_eq!(payload.len() as u64, WeightEncoding::Masked.payload_len(5));
        assert_eq!(residues(&payload).len(), 5);
        assert_eq!(residue_bytes(&residues(&payload)), payload);
        let back = WeightEncoding::Masked.decode(&payload, 5).unwrap();
        for (a, b) in values.iter().zip(&back) {
            assert!((a - b).abs() <= 2f32.powi(-24), "{a} vs {b}");
        }
        assert_eq!(residues(&payload)[2] as i64, -(9 << 22));
    }

    proptest! {
        #[test]
        fn f32_round_trips_bit_exactly(values in proptest::collection::vec(any::<f32>(), 0..3000)) {
            let payload = WeightEncoding::F32.encode(&values);
            prop_assert_eq!(payload.len() as u64, WeightEncoding::F32.payload_len(values.len() as u64));
            let back = WeightEncoding::F32.decode(&payload, values.len() as u64).unwrap();
            let same = back.iter().zip(&values).all(|(a, b)| a.to_bits() == b.to_bits());
            prop_assert!(same);
        }

        #[test]
        fn lossy_encodings_stay_close(values in proptest::collection::vec(-4.0f32..4.0, 1..3000)) {
            for (enc, tol) in [(WeightEncoding::F16, 4.0 / 1024.0), (WeightEncoding::Int8, 4.0 / 127.0)] {
                let payload = enc.encode(&values);
                prop_assert_eq!(payload.len() as u64, enc.payload_len(values.len() as u64));
                let back = enc.decode(&payload, values.len() as u64).unwrap();
                for (a, b) in back.iter().zip(&values) {
                    prop_assert!((a - b).abs() <= tol, "{enc:?}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn f32_payload_is_borrowed_and_equals_the_encoding() {
        let values = [1.5f32, -2.0, 3.25];
        let mut scratch = Vec::new();
        let payload = WeightEncoding::F32.payload(&values, &mut scratch);
        assert_eq!(payload, WeightEncoding::F32.encode(&values).as_slice());
        let half = WeightEncoding::F16.encode(&values);
        assert_eq!(
            WeightEncoding::F16.payload(&values, &mut scratch),
            half.as_slice()
        );
    }

    #[test]
    fn wrong_length_is_reported_before_decoding() {
        let err = WeightEncoding::F32.decode(&[0u8; 7], 2).unwrap_err();
        assert_eq!(
            err,
            PayloadError::WrongLength {
                params: 2,
                encoding: WeightEncoding::F32,
                expected: 8,
                actual: 7
            }
        );
    }

    #[test]
    fn nan_scale_is_rejected() {
        let mut payload = WeightEncoding::Int8.encode(&[1.0; 10]);
        payload[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(
            WeightEncoding::Int8.decode(&payload, 10),
            Err(PayloadError::BadScale { block: 0 })
        );
    }
}
