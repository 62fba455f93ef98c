//! An experiment manifest as a researcher writes it (TOML): parsed and validated, never a
//! panic; what parses has a digest and survives a round trip through JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use medmesh_protocol::Manifest;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(manifest) = Manifest::from_toml(text) {
        let _ = manifest.digest();
        let json = serde_json::to_string(&manifest).expect("a manifest serializes");
        let back = Manifest::from_json(&json).expect("a valid manifest re-parses from JSON");
        assert_eq!(back.digest(), manifest.digest());
    }
});
