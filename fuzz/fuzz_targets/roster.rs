//! A roster file (TOML, as `medmesh roster` writes it): parsed, checked as a genesis roster,
//! and offered as an update to a trusted one. Never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use medmesh_crypto::{Identity, Member, Role, Roster, SignedRoster};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(candidate) = toml::from_str::<SignedRoster>(text) else {
        return;
    };
    let _ = candidate.clone().into_genesis(None);

    let steward = Identity::from_seed(&[1; 32]);
    let mut roster = Roster::genesis("fuzz", vec![steward.public_key()], 1);
    roster.upsert_member(Member {
        public_key: Identity::from_seed(&[2; 32]).public_key(),
        role: Role::Node,
        site: "site-1".into(),
    });
    let mut signed = SignedRoster::unsigned(roster);
    signed.endorse(&steward);
    if let Ok(trusted) = signed.into_genesis(None) {
        let _ = trusted.accept_update(&candidate);
    }
});
