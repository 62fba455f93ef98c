//! The consortium roster: who is a member, in which role, and who was thrown out.
//!
//! # How a roster is endorsed and updated
//!
//! There is no server to ask, so trust is a chain of rosters, each endorsed by the stewards
//! of the one before:
//!
//! * A roster names a set of **stewards** (founding members' keys, typically one per founding
//!   site's IT lead) and an **endorsement threshold** `t`.
//! * The **first roster** a node is installed with (its *genesis*, handed over out of band,
//!   like the network key) must be endorsed by `t` of its own stewards. A node's config may
//!   pin its digest so that a swapped file is refused.
//! * A **newer roster** (higher `version`, same consortium) is accepted only if `t` distinct
//!   stewards of the roster the node currently trusts endorsed it. Stewards can thus add or
//!   replace stewards, but nobody else can, and a stolen member key can't rewrite membership.
//! * **Revocations are permanent**: a newer roster must keep every revocation of the current
//!   one, so a roster signed before a compromise can never readmit the compromised key.
//! * A node adopts the **newest roster it can reach** by walking candidates in version order
//!   ([`TrustedRoster::advance`]). Two different rosters with the same version, both validly
//!   endorsed, are an *equivocation*: neither is adopted and the node keeps the one it has.

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::identity::{Identity, PublicKey};
use crate::signing::{Domain, Signature, SignatureError};

/// The most members (and, separately, revocations) a roster may hold. Keeps decoding bounded.
pub const MAX_MEMBERS: usize = 10_000;

/// What a member may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A clinic's node: trains, exchanges updates, reports progress.
    Node,
    /// A researcher: signs and submits experiment manifests.
    Researcher,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Node => "node",
            Role::Researcher => "researcher",
        })
    }
}

/// One member of the consortium.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The member's ed25519 key (and, for nodes, its libp2p identity).
    pub public_key: PublicKey,
    /// What the member may do.
    pub role: Role,
    /// Human-readable site name, e.g. `"charite-radiology"`.
    pub site: String,
}

/// A key that is no longer trusted, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The revoked key.
    pub public_key: PublicKey,
    /// Free-text reason, for the audit trail.
    pub reason: String,
}

/// The membership list of a consortium at one version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roster {
    /// Consortium name: lowercase letters, digits and `-`. Also names the network protocols.
    pub consortium: String,
    /// Monotonic version; a node only moves to a higher one.
    pub version: u64,
    /// Keys allowed to endorse the next version.
    pub stewards: Vec<PublicKey>,
    /// How many distinct stewards must endorse the next version.
    pub threshold: u32,
    /// Current members.
    pub members: Vec<Member>,
    /// Revoked keys; never shrinks from one version to the next.
    pub revoked: Vec<Revocation>,
}

/// A steward's signature over a roster's canonical bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endorsement {
    /// The steward who endorsed.
    pub steward: PublicKey,
    /// Signature in [`Domain::Roster`] over [`Roster::canonical_bytes`].
    pub signature: Signature,
}

/// A roster with the endorsements collected so far. This is what files and the wire carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRoster {
    /// The roster.
    pub roster: Roster,
    /// Endorsements, at most one per steward.
    pub endorsements: Vec<Endorsement>,
}

/// Why a roster is malformed, untrusted, or not an acceptable update.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum RosterError {
    /// The roster breaks a structural rule.
    #[error("roster is malformed: {0}")]
    Malformed(String),
    /// An endorsement from a steward does not verify.
    #[error("endorsement by steward {steward} is invalid: {reason}")]
    BadEndorsement {
        /// The steward named in the endorsement.
        steward: PublicKey,
        /// Why the signature failed.
        reason: SignatureError,
    },
    /// Not enough distinct stewards endorsed it.
    #[error("roster v{version} has {valid} valid steward endorsement(s), {required} required")]
    InsufficientEndorsements {
        /// The roster version concerned.
        version: u64,
        /// Distinct valid endorsements by the relevant stewards.
        valid: usize,
        /// The threshold.
        required: usize,
    },
    /// The genesis roster's digest is not the one pinned in the node's config.
    #[error("roster digest {actual} does not match the pinned digest {expected}")]
    DigestMismatch {
        /// The pinned digest (hex).
        expected: String,
        /// The roster's digest (hex).
        actual: String,
    },
    /// An update for another consortium.
    #[error("roster is for consortium {offered:?}, this node belongs to {current:?}")]
    ConsortiumMismatch {
        /// This node's consortium.
        current: String,
        /// The update's consortium.
        offered: String,
    },
    /// An update that is not newer than what the node has.
    #[error("roster v{offered} is not newer than the current v{current}")]
    NotNewer {
        /// The trusted version.
        current: u64,
        /// The offered version.
        offered: u64,
    },
    /// An update that would readmit a revoked key.
    #[error("roster v{version} drops the revocation of {key}; revocations are permanent")]
    RevocationDropped {
        /// The offered version.
        version: u64,
        /// The key whose revocation disappeared.
        key: PublicKey,
    },
    /// Two different, validly endorsed rosters claim the same version.
    #[error(
        "two different validly endorsed rosters claim version {version}; keeping the current roster"
    )]
    Equivocation {
        /// The contested version.
        version: u64,
    },
}

/// Why a key may not do something.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum MembershipError {
    /// The key is not on the roster.
    #[error("key {0} is not a member of the consortium")]
    NotAMember(PublicKey),
    /// The key was revoked.
    #[error("key {key} was revoked: {reason}")]
    Revoked {
        /// The key.
        key: PublicKey,
        /// The revocation's reason.
        reason: String,
    },
    /// The key is a member, but in another role.
    #[error("key {key} ({site}) is a {actual}, but a {expected} is required")]
    WrongRole {
        /// The key.
        key: PublicKey,
        /// Its site.
        site: String,
        /// The role required.
        expected: Role,
        /// The role it has.
        actual: Role,
    },
}

impl Roster {
    /// A first, empty roster (version 1) governed by `stewards` with `threshold`.
    pub fn genesis(
        consortium: impl Into<String>,
        stewards: Vec<PublicKey>,
        threshold: u32,
    ) -> Self {
        Self {
            consortium: consortium.into(),
            version: 1,
            stewards,
            threshold,
            members: Vec::new(),
            revoked: Vec::new(),
        }
    }

    /// The bytes that stewards sign: bincode (standard config) of this struct.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(self, bincode::config::standard())
            .unwrap_or_else(|e| unreachable!("encoding a roster into memory cannot fail: {e}"))
    }

    /// BLAKE3 digest of the canonical bytes: the roster's identity, e.g. for pinning.
    pub fn digest(&self) -> [u8; 32] {
        *blake3::hash(&self.canonical_bytes()).as_bytes()
    }

    /// Checks the structural rules: name, threshold, no duplicates, no revoked key listed.
    pub fn check(&self) -> Result<(), RosterError> {
        let bad = |msg: String| Err(RosterError::Malformed(msg));
        if self.consortium.is_empty()
            || self.consortium.len() > 64
            || !self
                .consortium
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return bad(format!(
                "consortium name {:?} must be 1-64 characters of a-z, 0-9 and '-'",
                self.consortium
            ));
        }
        if self.version == 0 {
            return bad("version must be at least 1".into());
        }
        if self.threshold == 0 || self.threshold as usize > self.stewards.len() {
            return bad(format!(
                "threshold {} must be between 1 and the number of stewards ({})",
                self.threshold,
                self.stewards.len()
            ));
        }
        if self.members.len() > MAX_MEMBERS || self.revoked.len() > MAX_MEMBERS {
            return bad(format!("more than {MAX_MEMBERS} members or revocations"));
        }
        let mut stewards = HashSet::new();
        if let Some(dup) = self.stewards.iter().find(|k| !stewards.insert(**k)) {
            return bad(format!("steward {dup} is listed twice"));
        }
        let revoked: HashSet<_> = self.revoked.iter().map(|r| r.public_key).collect();
        let mut seen = HashSet::new();
        for m in &self.members {
            if !seen.insert(m.public_key) {
                return bad(format!("member {} is listed twice", m.public_key));
            }
            if m.site.trim().is_empty() {
                return bad(format!("member {} has an empty site name", m.public_key));
            }
            if revoked.contains(&m.public_key) {
                return bad(format!("member {} is also revoked", m.public_key));
            }
        }
        if let Some(s) = self.stewards.iter().find(|k| revoked.contains(k)) {
            return bad(format!("steward {s} is also revoked"));
        }
        Ok(())
    }

    /// Looks up a member by key.
    pub fn member(&self, key: &PublicKey) -> Option<&Member> {
        self.members.iter().find(|m| m.public_key == *key)
    }

    /// Checks that `key` is an unrevoked member with `role`.
    pub fn authorize(&self, key: &PublicKey, role: Role) -> Result<&Member, MembershipError> {
        if let Some(r) = self.revoked.iter().find(|r| r.public_key == *key) {
            return Err(MembershipError::Revoked {
                key: *key,
                reason: r.reason.clone(),
            });
        }
        let member = self.member(key).ok_or(MembershipError::NotAMember(*key))?;
        if member.role != role {
            return Err(MembershipError::WrongRole {
                key: *key,
                site: member.site.clone(),
                expected: role,
                actual: member.role,
            });
        }
        Ok(member)
    }

    /// Adds (or replaces the role and site of) a member.
    pub fn upsert_member(&mut self, member: Member) {
        match self
            .members
            .iter_mut()
            .find(|m| m.public_key == member.public_key)
        {
            Some(existing) => *existing = member,
            None => self.members.push(member),
        }
    }

    /// Revokes `key`: removes it from members and stewards and records why.
    pub fn revoke(&mut self, key: PublicKey, reason: impl Into<String>) {
        self.members.retain(|m| m.public_key != key);
        self.stewards.retain(|s| *s != key);
        if !self.revoked.iter().any(|r| r.public_key == key) {
            self.revoked.push(Revocation {
                public_key: key,
                reason: reason.into(),
            });
        }
    }
}

impl SignedRoster {
    /// Wraps a roster with no endorsements yet.
    pub fn unsigned(roster: Roster) -> Self {
        Self {
            roster,
            endorsements: Vec::new(),
        }
    }

    /// Adds `steward`'s endorsement (replacing an earlier one by the same key).
    pub fn endorse(&mut self, steward: &Identity) {
        let key = steward.public_key();
        let signature = steward.sign(Domain::Roster, &self.roster.canonical_bytes());
        self.endorsements.retain(|e| e.steward != key);
        self.endorsements.push(Endorsement {
            steward: key,
            signature,
        });
    }

    /// Counts distinct valid endorsements by `stewards`; fails on a forged one or too few.
    fn check_endorsed_by(&self, stewards: &[PublicKey], threshold: u32) -> Result<(), RosterError> {
        let bytes = self.roster.canonical_bytes();
        let mut valid = HashSet::new();
        for e in self
            .endorsements
            .iter()
            .filter(|e| stewards.contains(&e.steward))
        {
            e.steward
                .verify(Domain::Roster, &bytes, &e.signature)
                .map_err(|reason| RosterError::BadEndorsement {
                    steward: e.steward,
                    reason,
                })?;
            valid.insert(e.steward);
        }
        if valid.len() < threshold as usize {
            return Err(RosterError::InsufficientEndorsements {
                version: self.roster.version,
                valid: valid.len(),
                required: threshold as usize,
            });
        }
        Ok(())
    }

    /// Trusts this roster as a node's starting point: it must be well formed, endorsed by a
    /// threshold of its own stewards, and match `pinned_digest` when one is configured.
    pub fn into_genesis(
        self,
        pinned_digest: Option<&[u8; 32]>,
    ) -> Result<TrustedRoster, RosterError> {
        self.roster.check()?;
        if let Some(expected) = pinned_digest {
            let actual = self.roster.digest();
            if actual != *expected {
                return Err(RosterError::DigestMismatch {
                    expected: hex::encode(expected),
                    actual: hex::encode(actual),
                });
            }
        }
        self.check_endorsed_by(&self.roster.stewards, self.roster.threshold)?;
        Ok(TrustedRoster(self))
    }
}

/// A roster this node has verified and adopted. Only obtainable through the checks above.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedRoster(SignedRoster);

impl TrustedRoster {
    /// The roster itself.
    pub fn roster(&self) -> &Roster {
        &self.0.roster
    }

    /// The roster with its endorsements, for passing on to peers.
    pub fn signed(&self) -> &SignedRoster {
        &self.0
    }

    /// Checks that `key` is an unrevoked member with `role`.
    pub fn authorize(&self, key: &PublicKey, role: Role) -> Result<&Member, MembershipError> {
        self.0.roster.authorize(key, role)
    }

    /// Verifies `candidate` as the direct successor of this roster (see the module docs).
    pub fn accept_update(&self, candidate: &SignedRoster) -> Result<TrustedRoster, RosterError> {
        let current = self.roster();
        let next = &candidate.roster;
        if next.consortium != current.consortium {
            return Err(RosterError::ConsortiumMismatch {
                current: current.consortium.clone(),
                offered: next.consortium.clone(),
            });
        }
        if next.version <= current.version {
            return Err(RosterError::NotNewer {
                current: current.version,
                offered: next.version,
            });
        }
        next.check()?;
        if let Some(dropped) = current
            .revoked
            .iter()
            .find(|r| !next.revoked.iter().any(|n| n.public_key == r.public_key))
        {
            return Err(RosterError::RevocationDropped {
                version: next.version,
                key: dropped.public_key,
            });
        }
        candidate.check_endorsed_by(&current.stewards, current.threshold)?;
        Ok(TrustedRoster(candidate.clone()))
    }

    /// Moves to the newest roster reachable from this one through `candidates`, trying them
    /// in version order. Returns the adopted roster and why each other candidate was refused.
    pub fn advance(&self, candidates: &[SignedRoster]) -> (TrustedRoster, Vec<RosterError>) {
        let mut sorted: Vec<&SignedRoster> = candidates.iter().collect();
        sorted.sort_by_key(|c| c.roster.version);
        let mut current = self.clone();
        let mut refused = Vec::new();
        let mut i = 0;
        while i < sorted.len() {
            let version = sorted[i].roster.version;
            let end = sorted[i..]
                .iter()
                .position(|c| c.roster.version != version)
                .map_or(sorted.len(), |n| i + n);
            let mut accepted: Vec<TrustedRoster> = Vec::new();
            for candidate in &sorted[i..end] {
                match current.accept_update(candidate) {
                    Ok(t) if !accepted.iter().any(|a| a.roster() == t.roster()) => accepted.push(t),
                    Ok(_) => {}
                    Err(e) => refused.push(e),
                }
            }
            match accepted.len() {
                0 => {}
                1 => current = accepted.remove(0),
                _ => refused.push(RosterError::Equivocation { version }),
            }
            i = end;
        }
        (current, refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u8) -> Identity {
        Identity::from_seed(&[n; 32])
    }

    /// Consortium with stewards 1,2,3 (threshold 2), node 10, researcher 20.
    fn genesis() -> TrustedRoster {
        let mut roster = Roster::genesis(
            "acme-rad",
            vec![id(1).public_key(), id(2).public_key(), id(3).public_key()],
            2,
        );
        roster.upsert_member(Member {
            public_key: id(10).public_key(),
            role: Role::Node,
            site: "site-a".into(),
        });
        roster.upsert_member(Member {
            public_key: id(20).public_key(),
            role: Role::Researcher,
            site: "lab".into(),
        });
        let mut signed = SignedRoster::unsigned(roster);
        signed.endorse(&id(1));
        signed.endorse(&id(2));
        signed.into_genesis(None).unwrap()
    }

    fn successor(
        of: &TrustedRoster,
        edit: impl FnOnce(&mut Roster),
        endorsers: &[u8],
    ) -> SignedRoster {
        let mut roster = of.roster().clone();
        roster.version += 1;
        edit(&mut roster);
        let mut signed = SignedRoster::unsigned(roster);
        for n in endorsers {
            signed.endorse(&id(*n));
        }
        signed
    }

    #[test]
    fn authorization_names_each_failure() {
        let mut g = genesis();
        assert!(g.authorize(&id(20).public_key(), Role::Researcher).is_ok());
        assert!(matches!(
            g.authorize(&id(99).public_key(), Role::Node),
            Err(MembershipError::NotAMember(_))
        ));
        assert!(matches!(
            g.authorize(&id(10).public_key(), Role::Researcher),
            Err(MembershipError::WrongRole { .. })
        ));
        let next = successor(
            &g,
            |r| r.revoke(id(20).public_key(), "laptop stolen"),
            &[1, 3],
        );
        g = g.accept_update(&next).unwrap();
        let err = g
            .authorize(&id(20).public_key(), Role::Researcher)
            .unwrap_err();
        assert!(err.to_string().contains("laptop stolen"), "{err}");
    }

    #[test]
    fn genesis_needs_its_threshold_and_pin() {
        let g = genesis();
        let mut one = g.signed().clone();
        one.endorsements.truncate(1);
        assert_eq!(
            one.into_genesis(None).unwrap_err(),
            RosterError::InsufficientEndorsements {
                version: 1,
                valid: 1,
                required: 2
            }
        );
        let digest = g.roster().digest();
        assert!(g.signed().clone().into_genesis(Some(&digest)).is_ok());
        assert!(matches!(
            g.signed().clone().into_genesis(Some(&[0; 32])),
            Err(RosterError::DigestMismatch { .. })
        ));
    }

    #[test]
    fn tampered_roster_fails_its_endorsement() {
        let mut signed = genesis().signed().clone();
        signed.roster.members[0].role = Role::Researcher;
        assert!(matches!(
            signed.into_genesis(None),
            Err(RosterError::BadEndorsement { .. })
        ));
    }

    #[test]
    fn updates_need_current_stewards() {
        let g = genesis();
        // Endorsed by members who are not stewards: refused.
        let by_members = successor(&g, |r| r.version += 0, &[10, 20]);
        assert!(matches!(
            g.accept_update(&by_members),
            Err(RosterError::InsufficientEndorsements { valid: 0, .. })
        ));
        // A new steward set endorsing itself is not enough: the current stewards must agree.
        let takeover = successor(
            &g,
            |r| {
                r.stewards = vec![id(50).public_key()];
                r.threshold = 1;
            },
            &[50],
        );
        assert!(g.accept_update(&takeover).is_err());
        let ok = successor(
            &g,
            |r| {
                r.upsert_member(Member {
                    public_key: id(11).public_key(),
                    role: Role::Node,
                    site: "site-b".into(),
                })
            },
            &[2, 3],
        );
        assert_eq!(g.accept_update(&ok).unwrap().roster().version, 2);
        assert!(matches!(
            g.accept_update(g.signed()),
            Err(RosterError::NotNewer { .. })
        ));
    }

    #[test]
    fn revocations_are_permanent() {
        let g = genesis();
        let v2 = g
            .accept_update(&successor(
                &g,
                |r| r.revoke(id(10).public_key(), "decommissioned"),
                &[1, 2],
            ))
            .unwrap();
        let readmit = successor(
            &v2,
            |r| {
                r.revoked.clear();
                r.upsert_member(Member {
                    public_key: id(10).public_key(),
                    role: Role::Node,
                    site: "site-a".into(),
                });
            },
            &[1, 2],
        );
        assert!(matches!(
            v2.accept_update(&readmit),
            Err(RosterError::RevocationDropped { .. })
        ));
    }

    #[test]
    fn advance_walks_versions_and_refuses_equivocation() {
        let g = genesis();
        let v2 = successor(
            &g,
            |r| {
                r.upsert_member(Member {
                    public_key: id(11).public_key(),
                    role: Role::Node,
                    site: "b".into(),
                })
            },
            &[1, 2],
        );
        let t2 = g.accept_update(&v2).unwrap();
        // v3 changes the stewards; v4 is endorsed only by the new stewards.
        let v3 = successor(
            &t2,
            |r| {
                r.stewards = vec![id(4).public_key(), id(5).public_key()];
                r.threshold = 1;
            },
            &[1, 3],
        );
        let t3 = t2.accept_update(&v3).unwrap();
        let v4 = successor(
            &t3,
            |r| {
                r.upsert_member(Member {
                    public_key: id(12).public_key(),
                    role: Role::Node,
                    site: "c".into(),
                })
            },
            &[5],
        );
        // Out of order, with a stale duplicate: lands on v4.
        let (newest, refused) =
            g.advance(&[v4.clone(), v2.clone(), v3.clone(), g.signed().clone()]);
        assert_eq!(newest.roster().version, 4);
        assert_eq!(refused.len(), 1, "{refused:?}");
        // Skipping v3 means v4 is endorsed by stewards v2 does not know: stays at v2.
        let (stuck, _) = g.advance(&[v2.clone(), v4]);
        assert_eq!(stuck.roster().version, 2);
        // Two different validly endorsed v2s.
        let other_v2 = successor(
            &g,
            |r| {
                r.upsert_member(Member {
                    public_key: id(13).public_key(),
                    role: Role::Node,
                    site: "d".into(),
                })
            },
            &[2, 3],
        );
        let (kept, refused) = g.advance(&[v2, other_v2]);
        assert_eq!(kept.roster().version, 1);
        assert!(refused.contains(&RosterError::Equivocation { version: 2 }));
    }

    #[test]
    fn structural_rules() {
        let mut r = genesis().roster().clone();
        r.consortium = "Bad Name".into();
        assert!(r.check().is_err());
        let mut r = genesis().roster().clone();
        r.threshold = 4;
        assert!(r.check().is_err());
        let mut r = genesis().roster().clone();
        let dup = r.members[0].clone();
        r.members.push(dup);
        assert!(r.check().is_err());
    }

    fn arb_roster() -> impl Strategy<Value = Roster> {
        (
            "[a-z][a-z0-9-]{0,20}",
            1u64..1_000_000,
            proptest::collection::vec(
                (any::<[u8; 32]>(), any::<bool>(), "[a-z][a-z ]{0,11}"),
                0..8,
            ),
        )
            .prop_map(|(name, version, members)| {
                let mut r = Roster::genesis(name, vec![id(1).public_key()], 1);
                r.version = version;
                for (seed, researcher, site) in members {
                    r.upsert_member(Member {
                        public_key: Identity::from_seed(&seed).public_key(),
                        role: if researcher {
                            Role::Researcher
                        } else {
                            Role::Node
                        },
                        site,
                    });
                }
                r
            })
    }

    proptest! {
        #[test]
        fn roster_round_trips_through_toml_and_bincode(roster in arb_roster()) {
            let mut signed = SignedRoster::unsigned(roster);
            signed.endorse(&id(1));
            let text = toml::to_string(&signed).unwrap();
            let back: SignedRoster = toml::from_str(&text).unwrap();
            prop_assert_eq!(&back, &signed);
            let cfg = bincode::config::standard().with_limit::<{ 1 << 20 }>();
            let bytes = bincode::serde::encode_to_vec(&signed, cfg).unwrap();
            let (back, used): (SignedRoster, usize) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert!(back.into_genesis(None).is_ok());
        }
    }
}
