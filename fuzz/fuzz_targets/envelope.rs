//! The update path: an envelope as it comes off the wire (bounded bincode), checked against
//! the receiver's expectation, then a payload assembled from fuzzer-chosen chunks (offset,
//! length, bytes) for a valid envelope, in all three encodings.
#![no_main]

use libfuzzer_sys::fuzz_target;
use medmesh_crypto::Identity;
use medmesh_protocol::envelope::MIN_CHUNK_SIZE;
use medmesh_protocol::{
    DType, ParamLayout, PayloadAssembler, TensorSpec, UpdateEnvelope, UpdateError,
    UpdateExpectation, UpdateHeader, WeightEncoding,
};

const LIMIT: usize = 64 << 10;

fn layout() -> ParamLayout {
    ParamLayout {
        tensors: vec![TensorSpec {
            name: "w".into(),
            shape: vec![3000],
            dtype: DType::F32,
        }],
    }
}

fuzz_target!(|data: &[u8]| {
    let layout = layout();
    let digest = [9u8; 32];
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let encoding = match selector % 4 {
        0 => WeightEncoding::F32,
        1 => WeightEncoding::F16,
        2 => WeightEncoding::Int8,
        _ => WeightEncoding::Masked,
    };
    let expect = UpdateExpectation {
        experiment_id: "fuzz",
        manifest_digest: &digest,
        layout: &layout,
        encoding,
    };

    // 1. Arbitrary envelope bytes.
    let config = bincode::config::standard().with_limit::<LIMIT>();
    if let Ok((envelope, _)) = bincode::serde::decode_from_slice::<UpdateEnvelope, _>(rest, config)
    {
        let _ = envelope.check(&expect);
        let _ = PayloadAssembler::new(&envelope, &expect, Vec::new());
    }

    // 2. A genuine envelope over a payload taken from the input, fed in fuzzer-chosen chunks.
    let sender = Identity::from_seed(&[3; 32]);
    let payload_len = encoding.payload_len(layout.num_params()) as usize;
    let payload: Vec<u8> = rest.iter().copied().cycle().take(payload_len).collect();
    if payload.len() != payload_len {
        return;
    }
    let header = UpdateHeader {
        experiment_id: "fuzz".into(),
        manifest_digest: digest,
        round: 1,
        attempt: 0,
        sender: sender.public_key(),
        layout_digest: layout.digest(),
        num_params: layout.num_params(),
        encoding,
        sample_weight: 1.0,
        payload_len: 0,
        payload_hash: [0; 32],
        chunk_size: MIN_CHUNK_SIZE,
    };
    let envelope = UpdateEnvelope::seal(header, &payload, &sender);
    let mut assembler =
        PayloadAssembler::new(&envelope, &expect, Vec::new()).expect("a sealed envelope checks");
    // Each 4-byte group of the input steers one push: honest next chunk, or a wrong
    // offset or length.
    for steer in rest.chunks(4) {
        let at = assembler.received() as usize;
        let want = (MIN_CHUNK_SIZE as usize).min(payload_len - at);
        let (offset, len) = match steer[0] % 4 {
            0 | 1 => (at as u64, want),
            2 => (u64::from(steer.get(1).copied().unwrap_or(0)) * 4096, want),
            _ => (
                at as u64,
                usize::from(steer.get(2).copied().unwrap_or(0)) * 17,
            ),
        };
        let end = (at + len).min(payload_len);
        let _ = assembler.push(offset, &payload[at..end]);
        if assembler.is_complete() {
            break;
        }
    }
    if assembler.is_complete() {
        match assembler.finish() {
            Ok(values) => assert_eq!(values.len() as u64, layout.num_params()),
            // Int8 scales come from the input and may be NaN: refused, by name.
            Err(UpdateError::Payload(_)) if encoding == WeightEncoding::Int8 => {}
            Err(e) => panic!("a genuine, complete payload was refused: {e}"),
        }
    }
});
