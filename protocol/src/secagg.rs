//! Secure aggregation inside a gossip group: pairwise additive masks, as in Bonawitz et al.
//! (CCS 2017), with no server.
//!
//! Each member `i` of a group `G` encodes its mass-weighted model `m_i x_i` in fixed point
//! ([`FRACTION_BITS`] fractional bits), as integers modulo 2^64. For every other member `j`
//! it adds the stream of a ChaCha20 generator seeded with the pair's seed `s_ij` when `i`
//! comes before `j` in `G`, and subtracts it otherwise. Only `i` and `j` know `s_ij`: it
//! is their X25519 secret (`medmesh_crypto::Identity::shared_secret`) keyed over the
//! attempt's [`GroupContext`] (experiment, round, attempt, members), so no two attempts share
//! a mask. Modulo 2^64 the masks cancel exactly in the group's sum: whoever holds every
//! member's upload learns `sum m_i x_i` ([`unmask_mean`]), and one upload alone is
//! uniformly distributed to anyone who lacks one of its pair seeds.
//!
//! A member that does not deliver its upload stalls the sum. The others redo the round
//! without it: a new attempt over the members that delivered, with fresh masks
//! ([`GroupContext::without`]). Redoing needs no threshold secret sharing (no server holds
//! the shares here, and groups are small) and costs one more upload per member. Its limit:
//! a member that did receive the missing member's first upload can subtract the redo's sum
//! from the first attempt's and learn that member's model, which is what plain gossip (no
//! masking) would have shown it anyway.

use medmesh_crypto::PublicKey;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

/// Fractional bits of the fixed-point encoding: 2^-24 of a sample's weight.
pub const FRACTION_BITS: u32 = 24;

/// The smallest group masking hides anything in: with two, each learns the other's model
/// from the sum and its own.
pub const MIN_GROUP: usize = 3;

/// Why an upload cannot be made or combined.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SecAggError {
    /// Too few members.
    #[error("secure aggregation needs a group of at least {MIN_GROUP} members; this one has {0}")]
    GroupTooSmall(usize),
    /// This member is not in the group.
    #[error("this member is not in the group")]
    NotAMember,
    /// A weight the fixed-point encoding cannot hold (the group's sum could overflow).
    #[error(
        "weight {index} ({value}) times mass {mass} is beyond what a group of {group} can sum in fixed point (±{limit:.3e})"
    )]
    OutOfRange {
        /// Its index.
        index: usize,
        /// The weight.
        value: f32,
        /// The member's mass.
        mass: f64,
        /// The group's size.
        group: usize,
        /// The largest magnitude of mass times weight.
        limit: f64,
    },
    /// Uploads of different lengths.
    #[error("an upload has {got} values where the model has {expected}")]
    Length {
        /// Values in the upload.
        got: usize,
        /// Values expected.
        expected: usize,
    },
}

/// What every member of a group agrees on for one attempt at a round's sum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupContext {
    /// The experiment's manifest digest.
    pub manifest_digest: [u8; 32],
    /// The round.
    pub round: u64,
    /// 0 first, one more for each redo without missing members.
    pub attempt: u32,
    /// The group, in the order the round engine gives (the same at every member).
    pub members: Vec<PublicKey>,
}

impl GroupContext {
    /// The context of a first attempt; refused for groups below [`MIN_GROUP`].
    pub fn new(
        manifest_digest: [u8; 32],
        round: u64,
        members: Vec<PublicKey>,
    ) -> Result<Self, SecAggError> {
        if members.len() < MIN_GROUP {
            return Err(SecAggError::GroupTooSmall(members.len()));
        }
        Ok(Self {
            manifest_digest,
            round,
            attempt: 0,
            members,
        })
    }

    /// The next attempt, without the members whose upload did not arrive (`delivered[i]`
    /// false); refused once fewer than [`MIN_GROUP`] remain.
    pub fn without(&self, delivered: &[bool]) -> Result<Self, SecAggError> {
        let members: Vec<PublicKey> = self
            .members
            .iter()
            .zip(delivered)
            .filter(|(_, d)| **d)
            .map(|(k, _)| *k)
            .collect();
        if members.len() < MIN_GROUP {
            return Err(SecAggError::GroupTooSmall(members.len()));
        }
        Ok(Self {
            manifest_digest: self.manifest_digest,
            round: self.round,
            attempt: self.attempt + 1,
            members,
        })
    }

    /// Where `key` stands in the group.
    pub fn position(&self, key: &PublicKey) -> Result<usize, SecAggError> {
        self.members
            .iter()
            .position(|k| k == key)
            .ok_or(SecAggError::NotAMember)
    }

    /// The mask seed of a pair of members for this attempt, from their shared secret.
    pub fn pair_seed(&self, shared_secret: &[u8; 32]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(shared_secret);
        h.update(b"medmesh secagg pair seed v1");
        h.update(&self.manifest_digest);
        h.update(&self.round.to_le_bytes());
        h.update(&self.attempt.to_le_bytes());
        h.update(&(self.members.len() as u64).to_le_bytes());
        for k in &self.members {
            h.update(&k.to_bytes());
        }
        *h.finalize().as_bytes()
    }
}

/// `v` in fixed point, as a residue modulo 2^64 (saturating; NaN is 0).
pub fn to_fixed(v: f64) -> u64 {
    (v * f64::from(1u32 << FRACTION_BITS)).round() as i64 as u64
}

/// The value of a fixed-point residue.
pub fn from_fixed(r: u64) -> f64 {
    r as i64 as f64 / f64::from(1u32 << FRACTION_BITS)
}

/// The largest |mass x weight| a group of `group` can sum without overflow.
pub fn range_limit(group: usize) -> f64 {
    (1u64 << (63 - FRACTION_BITS)) as f64 / group.max(1) as f64
}

/// Member `me`'s masked upload of `model` with mass `mass`: fixed-point `mass x model` plus
/// the masks of every pair it is in; `seed_with(j)` is the pair seed it shares with member
/// `j` ([`GroupContext::pair_seed`]).
pub fn masked_upload(
    ctx: &GroupContext,
    me: usize,
    model: &[f32],
    mass: f64,
    seed_with: impl Fn(usize) -> [u8; 32],
) -> Result<Vec<u64>, SecAggError> {
    let n = ctx.members.len();
    if me >= n {
        return Err(SecAggError::NotAMember);
    }
    let limit = range_limit(n);
    let mut out = Vec::with_capacity(model.len());
    for (index, &value) in model.iter().enumerate() {
        let v = mass * f64::from(value);
        if v.is_nan() || v.abs() >= limit {
            return Err(SecAggError::OutOfRange {
                index,
                value,
                mass,
                group: n,
                limit,
            });
        }
        out.push(to_fixed(v));
    }
    // Every pair's stream in one pass over the upload, a block of words per generator call
    // (far faster than a word per call, and the upload stays in cache).
    let mut streams: Vec<(ChaCha20Rng, bool)> = (0..n)
        .filter(|&j| j != me)
        .map(|j| (ChaCha20Rng::from_seed(seed_with(j)), me < j))
        .collect();
    let mut block = [0u64; MASK_BLOCK];
    for chunk in out.chunks_mut(MASK_BLOCK) {
        let mask = &mut block[..chunk.len()];
        for (rng, add) in &mut streams {
            rng.fill_bytes(bytemuck::cast_slice_mut(mask));
            if *add {
                chunk
                    .iter_mut()
                    .zip(mask.iter())
                    .for_each(|(v, m)| *v = v.wrapping_add(u64::from_le(*m)));
            } else {
                chunk
                    .iter_mut()
                    .zip(mask.iter())
                    .for_each(|(v, m)| *v = v.wrapping_sub(u64::from_le(*m)));
            }
        }
    }
    Ok(out)
}

/// Mask words drawn per call of the generator.
const MASK_BLOCK: usize = 1024;

/// The group's mass-weighted mean from every member's upload and the members' total mass.
pub fn unmask_mean(uploads: &[&[u64]], total_mass: f64) -> Result<Vec<f32>, SecAggError> {
    let Some((first, rest)) = uploads.split_first() else {
        return Ok(Vec::new());
    };
    let mut sum = first.to_vec();
    for u in rest {
        if u.len() != sum.len() {
            return Err(SecAggError::Length {
                got: u.len(),
                expected: sum.len(),
            });
        }
        sum.iter_mut()
            .zip(u.iter())
            .for_each(|(s, v)| *s = s.wrapping_add(*v));
    }
    let scale = 1.0 / (f64::from(1u32 << FRACTION_BITS) * total_mass);
    Ok(sum
        .iter()
        .map(|&s| (s as i64 as f64 * scale) as f32)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use medmesh_crypto::Identity;

    struct Group {
        ids: Vec<Identity>,
        models: Vec<Vec<f32>>,
        masses: Vec<f64>,
    }

    fn group(n: usize, len: usize) -> Group {
        let ids: Vec<Identity> = (0..n)
            .map(|i| Identity::from_seed(&[i as u8 + 1; 32]))
            .collect();
        let models = (0..n)
            .map(|i| {
                (0..len)
                    .map(|k| ((k * (i + 3)) as f32 * 0.37).sin() * (1.0 + i as f32))
                    .collect()
            })
            .collect();
        let masses = (0..n).map(|i| 10.0 + 7.0 * i as f64).collect();
        Group {
            ids,
            models,
            masses,
        }
    }

    fn context(g: &Group) -> GroupContext {
        GroupContext::new(
            [9; 32],
            12,
            g.ids.iter().map(Identity::public_key).collect(),
        )
        .unwrap()
    }

    /// Member `i`'s upload, its pair seeds computed from its own key only.
    fn upload(g: &Group, ctx: &GroupContext, key: usize) -> Vec<u64> {
        let id = &g.ids[key];
        let me = ctx.position(&id.public_key()).unwrap();
        masked_upload(ctx, me, &g.models[key], g.masses[key], |j| {
            ctx.pair_seed(&id.shared_secret(&ctx.members[j]).unwrap())
        })
        .unwrap()
    }

    fn weighted_mean(g: &Group, keys: &[usize]) -> Vec<f32> {
        let total: f64 = keys.iter().map(|&k| g.masses[k]).sum();
        (0..g.models[0].len())
            .map(|w| {
                (keys
                    .iter()
                    .map(|&k| g.masses[k] * f64::from(g.models[k][w]))
                    .sum::<f64>()
                    / total) as f32
            })
            .collect()
    }

    fn correlation(a: &[f64], b: &[f64]) -> f64 {
        let n = a.len() as f64;
        let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
        let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
        let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
        let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
        cov / (va * vb).sqrt()
    }

    #[test]
    fn the_group_mean_equals_the_unmasked_mean() {
        let g = group(5, 10_000);
        let ctx = context(&g);
        let uploads: Vec<Vec<u64>> = (0..5).map(|i| upload(&g, &ctx, i)).collect();
        let refs: Vec<&[u64]> = uploads.iter().map(Vec::as_slice).collect();
        let mean = unmask_mean(&refs, g.masses.iter().sum()).unwrap();
        let exact = weighted_mean(&g, &[0, 1, 2, 3, 4]);
        let worst = mean
            .iter()
            .zip(&exact)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-6, "largest error {worst}");
        // Missing one upload, the masks do not cancel: nothing like the mean comes out.
        let partial = unmask_mean(&refs[..4], g.masses.iter().sum()).unwrap();
        assert!(partial.iter().zip(&exact).any(|(a, b)| (a - b).abs() > 1e3));
    }

    #[test]
    fn one_upload_looks_like_noise() {
        let g = group(4, 100_000);
        let ctx = context(&g);
        let masked = upload(&g, &ctx, 1);
        let truth: Vec<f64> = g.models[1].iter().map(|&v| f64::from(v)).collect();
        // As the signed fixed-point numbers an eavesdropper would decode, and as uniform
        // residues in [0, 1).
        let decoded: Vec<f64> = masked.iter().map(|&v| v as i64 as f64).collect();
        let unit: Vec<f64> = masked.iter().map(|&v| v as f64 / 2f64.powi(64)).collect();
        let (r1, r2) = (correlation(&decoded, &truth), correlation(&unit, &truth));
        // 100,000 independent draws: |r| of noise is about 1/sqrt(n) = 0.003.
        assert!(
            r1.abs() < 0.015 && r2.abs() < 0.015,
            "correlations {r1}, {r2}"
        );
        let mean = unit.iter().sum::<f64>() / unit.len() as f64;
        assert!((mean - 0.5).abs() < 0.005, "mean residue {mean}");
        // Unmasked, the same encoding correlates perfectly: the test can tell.
        let clear: Vec<f64> = g.models[1]
            .iter()
            .map(|&v| (g.masses[1] * f64::from(v) * 2f64.powi(24)).round())
            .collect();
        assert!(correlation(&clear, &truth) > 0.999);
        // And the same member's upload in the next round wears other masks.
        let mut next = ctx.clone();
        next.round += 1;
        let again = upload(&g, &next, 1);
        let diff: Vec<f64> = masked
            .iter()
            .zip(&again)
            .map(|(a, b)| a.wrapping_sub(*b) as i64 as f64)
            .collect();
        assert!(correlation(&diff, &truth).abs() < 0.015);
    }

    #[test]
    fn a_drop_out_is_survived_by_redoing_without_it() {
        let g = group(5, 5_000);
        let first = context(&g);
        // Member 3 uploads nothing (its node went down): the others hold four uploads, whose
        // masks with member 3 do not cancel.
        let delivered = [true, true, true, false, true];
        let redo = first.without(&delivered).unwrap();
        assert_eq!(redo.attempt, 1);
        assert_eq!(redo.members.len(), 4);
        let survivors = [0, 1, 2, 4];
        let uploads: Vec<Vec<u64>> = survivors.iter().map(|&i| upload(&g, &redo, i)).collect();
        let refs: Vec<&[u64]> = uploads.iter().map(Vec::as_slice).collect();
        let total: f64 = survivors.iter().map(|&k| g.masses[k]).sum();
        let mean = unmask_mean(&refs, total).unwrap();
        let exact = weighted_mean(&g, &survivors);
        assert!(
            mean.iter().zip(&exact).all(|(a, b)| (a - b).abs() < 1e-6),
            "the survivors' mean"
        );
        // The redo's masks are fresh: a first-attempt upload does not combine with them.
        let stale = upload(&g, &first, 0);
        let mut mixed = refs.clone();
        mixed[0] = &stale;
        let wrong = unmask_mean(&mixed, total).unwrap();
        assert!(wrong.iter().zip(&exact).any(|(a, b)| (a - b).abs() > 1e3));
        // Below three members nothing is hidden: refused.
        assert_eq!(
            redo.without(&[true, false, true, false]),
            Err(SecAggError::GroupTooSmall(2))
        );
        assert_eq!(
            GroupContext::new([0; 32], 1, redo.members[..2].to_vec()),
            Err(SecAggError::GroupTooSmall(2))
        );
    }

    #[test]
    fn weights_beyond_the_fixed_point_range_are_refused() {
        let g = group(3, 4);
        let ctx = context(&g);
        let huge = [0.0, f32::MAX, 0.0, 0.0];
        let e = masked_upload(&ctx, 0, &huge, 1.0, |_| [1; 32]).unwrap_err();
        assert!(matches!(e, SecAggError::OutOfRange { index: 1, .. }), "{e}");
        let nan = [f32::NAN; 4];
        assert!(masked_upload(&ctx, 0, &nan, 1.0, |_| [1; 32]).is_err());
        assert_eq!(
            unmask_mean(&[&[1, 2], &[3]], 1.0),
            Err(SecAggError::Length {
                got: 1,
                expected: 2
            })
        );
    }
}
