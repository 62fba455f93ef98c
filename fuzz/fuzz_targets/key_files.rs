//! The two secret files a node reads at start: its identity key file and the consortium's
//! network key (`swarm.key` format). Never a panic; what parses writes back identically.
#![no_main]

use libfuzzer_sys::fuzz_target;
use medmesh_crypto::{Identity, NetworkKey};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(identity) = Identity::from_key_file(text) {
        let again = Identity::from_key_file(&identity.to_key_file())
            .expect("a written key file reads back");
        assert_eq!(again.public_key(), identity.public_key());
    }
    if let Ok(key) = text.parse::<NetworkKey>() {
        let again: NetworkKey = key
            .to_key_file()
            .parse()
            .expect("a written swarm.key reads back");
        assert_eq!(again.as_bytes(), key.as_bytes());
    }
});
