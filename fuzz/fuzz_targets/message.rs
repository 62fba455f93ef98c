//! Every frame a peer can send: decoding never panics, and what decodes re-encodes to
//! bytes that decode to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use medmesh_protocol::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = Message::decode(data) {
        let bytes = message
            .encode()
            .expect("a decoded message re-encodes within the limit");
        let again = Message::decode(&bytes).expect("a re-encoded message decodes");
        assert_eq!(again.encode().as_deref(), Ok(bytes.as_slice()));
    }
});
