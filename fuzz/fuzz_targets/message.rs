//! Every frame a peer can send, either way: decoding never panics, and what decodes
//! re-encodes to bytes that decode to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use medmesh_protocol::{Request, Response};

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = Request::decode(data) {
        let bytes = request
            .encode()
            .expect("a decoded request re-encodes within the limit");
        let again = Request::decode(&bytes).expect("a re-encoded request decodes");
        assert_eq!(again.encode().as_deref(), Ok(bytes.as_slice()));
    }
    if let Ok(response) = Response::decode(data) {
        let bytes = response
            .encode()
            .expect("a decoded response re-encodes within the limit");
        let again = Response::decode(&bytes).expect("a re-encoded response decodes");
        assert_eq!(again.encode().as_deref(), Ok(bytes.as_slice()));
    }
});
