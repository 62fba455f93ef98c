//! An experiment manifest in JSON: parsed and validated, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use medmesh_protocol::Manifest;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(manifest) = Manifest::from_json(text) {
        let _ = manifest.digest();
        let _ = Manifest::parse(text);
    }
});
