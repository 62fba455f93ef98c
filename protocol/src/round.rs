//! The round engine: for round `r` of an experiment, who exchanges with whom, and how a
//! site combines the models it received. The node and the simulator both call these
//! functions, and neither keeps a copy of any part of them, so what the simulator predicts
//! is what the nodes do.
//!
//! * Every site computes a round's graph alone, from the manifest seed, the round number and
//!   the number of node members (sites are indices into the roster's node members sorted by
//!   key). So all sites agree on it without a coordinator, and each talks to a few peers a
//!   round, however large the consortium.
//! * Every exchange is a *pull*: a site fetches the models of its round's [`RoundGraph::sources`].
//!   A push (push-sum, epidemic) is the receiver pulling from the sender the graph names, so
//!   nothing arrives uninvited and a receiver bounds its own memory.
//! * A site carries a *mass* besides its model: its sample count, or under push-sum its
//!   push-sum weight. Pairwise gossip, Metropolis-Hastings and push-sum preserve
//!   `Σ mass_i · x_i / Σ mass_i`, the sample-weighted mean of all sites' models, in every
//!   round without failures.
//! * After the training rounds, when the rules allow it, a few averaging-only rounds reduce
//!   the sites' models to that exact mean (recursive doubling over the sorted members), so
//!   every site exports the same model. See [`RoundRules::reduce_steps`].
//!
//! ```
//! use medmesh_protocol::manifest::{Manifest, Scheme};
//! use medmesh_protocol::round::{Overlay, RoundRules};
//! # let mut m = Manifest::parse(include_str!("../../examples/synthetic-quickstart.toml")).unwrap();
//! m.averaging.scheme = Scheme::PairwiseGossip;
//! let rules = RoundRules::from_manifest(&m);
//! let graph = rules.graph(3, Overlay::Complete(8));
//! // Round 3's matching, the same at every site: site 0 and its partner pull each other.
//! let partner = graph.sources(0)[0];
//! assert_eq!(graph.sources(partner), &[0]);
//! ```

use std::borrow::Cow;

use crate::averaging::{AveragingError, weighted_mean};
use crate::manifest::{Aggregation, Manifest, Scheme};
use crate::rng::Rng;
use crate::robust::{clip_towards, coordinate_median, trim_count, trimmed_mean};

/// Random matchings per round of `metropolis-hastings` when the manifest names no fanout.
pub const DEFAULT_MIXING_DEGREE: usize = 2;

/// Members of a `group-average` group when the manifest names no `group_size`.
pub const DEFAULT_GROUP_SIZE: usize = 4;

/// The random stream the round graphs are drawn from (apart from every other use of the
/// seed, such as weight initialization and data shuffling).
const GRAPH_STREAM: u64 = 0x6055_1900_0000_0000;

/// What an experiment's rounds do, from its manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundRules {
    /// The averaging scheme of the training rounds.
    pub scheme: Scheme,
    /// The manifest seed (round graphs derive from it).
    pub seed: u64,
    /// Peers a round: pushes per site (epidemic), or random matchings in the union (MH; a
    /// fanout of at least the overlay's largest degree takes the whole overlay every round).
    pub fanout: usize,
    /// Members per group (`group-average`).
    pub group_size: usize,
    /// How received models combine where the scheme aggregates (MH, epidemic).
    pub aggregation: Aggregation,
    /// Fraction trimmed at each end by the trimmed mean.
    pub trim_fraction: f64,
    /// Centred clipping of received models, before combining.
    pub clip_norm: Option<f64>,
    /// The most samples a site counts ([`Self::site_mass`], [`Self::weight_bound`]).
    pub max_sample_weight: f64,
    /// Rounds that train.
    pub training_rounds: u64,
    /// Whether averaging-only rounds after training bring every site to the same model.
    /// Only under the plain mean: a robust rule or clipping exists to keep some inputs out,
    /// and an exact reduce would let them back in; with privacy noise on, a site's exact
    /// model never leaves it; under secure aggregation, no site's model leaves it unmasked.
    pub final_reduce: bool,
}

/// Which part of the experiment a round belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Train locally, then exchange by the scheme.
    Train,
    /// Exchange only: step `step` (0-based) of the final reduce.
    Reduce {
        /// Step within the reduce.
        step: u64,
    },
}

/// The graph a round's edges are drawn from.
#[derive(Debug, Clone, Copy)]
pub enum Overlay<'a> {
    /// Any of `n` members can reach any other (the nodes: peers are found through the DHT).
    Complete(usize),
    /// Edges come from this undirected graph only (the simulator's topologies).
    Restricted(&'a [Vec<usize>]),
}

impl Overlay<'_> {
    /// Members.
    pub fn len(&self) -> usize {
        match self {
            Self::Complete(n) => *n,
            Self::Restricted(adj) => adj.len(),
        }
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most members one member can reach.
    fn max_degree(&self) -> usize {
        match self {
            Self::Complete(n) => n.saturating_sub(1),
            Self::Restricted(adj) => adj.iter().map(Vec::len).max().unwrap_or(0),
        }
    }

    /// The members `i` can reach.
    fn neighbours_of(&self, i: usize) -> Vec<usize> {
        match self {
            Self::Complete(n) => (0..*n).filter(|&j| j != i).collect(),
            Self::Restricted(adj) => adj[i].iter().copied().filter(|&j| j != i).collect(),
        }
    }

    /// A uniformly random member that `i` can reach, other than `i`.
    fn random_neighbour(&self, i: usize, rng: &mut Rng) -> Option<usize> {
        match self {
            Self::Complete(n) if *n < 2 => None,
            Self::Complete(n) => {
                let j = rng.below(n - 1);
                Some(if j >= i { j + 1 } else { j })
            }
            Self::Restricted(adj) => {
                let ns: Vec<usize> = adj[i].iter().copied().filter(|&j| j != i).collect();
                (!ns.is_empty()).then(|| ns[rng.below(ns.len())])
            }
        }
    }

    /// Up to `k` distinct random members that `i` can reach, other than `i`.
    fn random_neighbours(&self, i: usize, k: usize, rng: &mut Rng) -> Vec<usize> {
        let mut pool: Vec<usize> = match self {
            Self::Complete(n) if k * 4 < *n => {
                // Few out of many: rejection sampling, no O(n) pool.
                let mut out = Vec::with_capacity(k);
                while out.len() < k {
                    if let Some(j) = self.random_neighbour(i, rng)
                        && !out.contains(&j)
                    {
                        out.push(j);
                    }
                }
                return out;
            }
            Self::Complete(n) => (0..*n).filter(|&j| j != i).collect(),
            Self::Restricted(adj) => adj[i].iter().copied().filter(|&j| j != i).collect(),
        };
        let k = k.min(pool.len());
        for t in 0..k {
            let pick = t + rng.below(pool.len() - t);
            pool.swap(t, pick);
        }
        pool.truncate(k);
        pool
    }
}

/// How the sites of a round combine what they pulled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Matched pairs average, weighted by mass; both ends must confirm the exchange, or both
    /// keep their models. In the reduce, masses add up.
    Pairs {
        /// Part of the final reduce (masses accumulate).
        reduce: bool,
    },
    /// Neighbour averaging with sample-weighted Metropolis-Hastings weights.
    Mixing,
    /// Push-sum: each site keeps half its mass and pushes half, with its model, to one site.
    PushSum,
    /// Epidemic: each site pushes to `fanout` sites; receivers aggregate by the rule.
    Spread,
    /// Random groups: every member pulls every other member of its group, and all take the
    /// group's weighted mean (or its robust aggregate).
    Group,
    /// First reduce step: sites beyond the largest power of two hand their model and mass in.
    Fold,
    /// Last reduce step: those sites take the result back.
    Unfold,
}

impl Shape {
    /// Whether both ends of an exchange must confirm it before either uses it.
    pub fn needs_confirmation(self) -> bool {
        matches!(self, Self::Pairs { .. })
    }
}

/// One round's communication graph, the same at every site.
#[derive(Debug, Clone)]
pub struct RoundGraph {
    round: u64,
    shape: Shape,
    sources: Vec<Vec<usize>>,
    sinks: Vec<Vec<usize>>,
}

impl RoundGraph {
    fn empty(round: u64, shape: Shape, n: usize) -> Self {
        Self {
            round,
            shape,
            sources: vec![Vec::new(); n],
            sinks: vec![Vec::new(); n],
        }
    }

    fn add_edge(&mut self, from: usize, to: usize) {
        self.sources[to].push(from);
        self.sinks[from].push(to);
    }

    fn finish(mut self) -> Self {
        for list in self.sources.iter_mut().chain(self.sinks.iter_mut()) {
            list.sort_unstable();
            list.dedup();
        }
        self
    }

    /// The round.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// How its sites combine.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// Members.
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// Members whose model `i` pulls this round, ascending.
    pub fn sources(&self, i: usize) -> &[usize] {
        &self.sources[i]
    }

    /// Members that pull `i`'s model this round, ascending.
    pub fn sinks(&self, i: usize) -> &[usize] {
        &self.sinks[i]
    }

    /// Everyone `i` talks to this round (sources and sinks), ascending.
    pub fn neighbours(&self, i: usize) -> Vec<usize> {
        let mut all: Vec<usize> = self.sources[i]
            .iter()
            .chain(&self.sinks[i])
            .copied()
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// `i`'s degree in the round's undirected graph (Metropolis-Hastings weights use it).
    pub fn degree(&self, i: usize) -> usize {
        self.sources[i].len()
    }
}

/// A model a site received this round (or, for push-sum, a share that arrived late).
#[derive(Debug, Clone)]
pub struct Incoming<'a> {
    /// The sender's member index.
    pub member: usize,
    /// Its model (clipped in place when the rules clip).
    pub values: Cow<'a, [f32]>,
    /// The mass it carries: the sender's sample count, or its push-sum share.
    pub weight: f64,
}

/// What [`RoundRules::combine`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Merged {
    /// The site's mass after the round.
    pub weight: f64,
    /// Received models that went into the result.
    pub combined: usize,
}

/// The largest power of two `p <= n` (for `n >= 1`) and `n - p`.
fn split_pow2(n: usize) -> (usize, usize) {
    let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
    (p, n - p)
}

impl RoundRules {
    /// The rules `m` sets.
    pub fn from_manifest(m: &Manifest) -> Self {
        let av = &m.averaging;
        let fanout = match av.scheme {
            Scheme::PairwiseGossip | Scheme::PushSum => 1,
            Scheme::MetropolisHastings => av.fanout.map_or(DEFAULT_MIXING_DEGREE, |f| f as usize),
            Scheme::Epidemic => av.fanout.map_or(1, |f| f as usize),
            Scheme::GroupAverage => 1,
        };
        Self {
            scheme: av.scheme,
            seed: m.training.seed,
            fanout,
            group_size: av.group_size.map_or(DEFAULT_GROUP_SIZE, |k| k as usize),
            aggregation: av.aggregation,
            trim_fraction: av.trim_fraction.unwrap_or(0.0),
            clip_norm: av.clip_norm,
            max_sample_weight: av
                .max_sample_weight
                .unwrap_or(crate::manifest::DEFAULT_MAX_SAMPLE_WEIGHT)
                as f64,
            training_rounds: u64::from(av.rounds),
            final_reduce: av.aggregation == Aggregation::Mean
                && av.clip_norm.is_none()
                && m.privacy.noise_multiplier.is_none()
                && !av.secure_aggregation,
        }
    }

    /// The mass a site with `samples` training samples starts with: its count, at most the
    /// manifest's `max_sample_weight`.
    pub fn site_mass(&self, samples: usize) -> f64 {
        (samples as f64).min(self.max_sample_weight)
    }

    /// The largest mass an update in a round of `shape` may carry among `members` sites.
    /// Where a site sends its own sample count (pairs, neighbour mixing, epidemic pushes) that
    /// is `max_sample_weight`; where masses move and add up (push-sum, the final reduce) it is
    /// every member's together, since each step conserves the total.
    pub fn weight_bound(&self, shape: Shape, members: usize) -> f64 {
        match shape {
            Shape::Pairs { reduce: false } | Shape::Mixing | Shape::Spread | Shape::Group => {
                self.max_sample_weight
            }
            Shape::Pairs { reduce: true } | Shape::PushSum | Shape::Fold | Shape::Unfold => {
                self.max_sample_weight * members.max(1) as f64
            }
        }
    }

    /// Averaging-only rounds after training: recursive doubling over the sorted members.
    /// With `p` the largest power of two not above `members`, the sites beyond `p` first
    /// hand their model to site `i - p` (fold), then `log2 p` rounds of pairs `i`, `i xor 2^k`
    /// average with accumulated masses, then the folded sites take the result back (unfold).
    /// Without failures every site then holds `Σ mass_i · x_i / Σ mass_i` exactly, after
    /// about `log2(members)` model transfers per site. Zero when the rules have no reduce.
    pub fn reduce_steps(&self, members: usize) -> u64 {
        if !self.final_reduce || members < 2 {
            return 0;
        }
        let (p, extra) = split_pow2(members);
        u64::from(p.trailing_zeros()) + if extra > 0 { 2 } else { 0 }
    }

    /// Whether every training round mixes by Metropolis-Hastings weights on the whole of
    /// `overlay` (a fanout of at least its largest degree): a fixed mixing matrix, whose
    /// spectral gap then predicts the rate of consensus.
    pub fn mixes_on_the_whole_overlay(&self, overlay: Overlay<'_>) -> bool {
        self.scheme == Scheme::MetropolisHastings
            && self.aggregation == Aggregation::Mean
            && overlay.max_degree() <= self.fanout
    }

    /// Training rounds plus reduce steps.
    pub fn total_rounds(&self, members: usize) -> u64 {
        self.training_rounds + self.reduce_steps(members)
    }

    /// Which phase round `round` (1-based) is in.
    pub fn phase(&self, round: u64) -> Phase {
        if round <= self.training_rounds {
            Phase::Train
        } else {
            Phase::Reduce {
                step: round - self.training_rounds - 1,
            }
        }
    }

    /// Round `round`'s graph over `overlay`'s members.
    pub fn graph(&self, round: u64, overlay: Overlay<'_>) -> RoundGraph {
        let n = overlay.len();
        match self.phase(round) {
            Phase::Train => self.training_graph(round, overlay),
            Phase::Reduce { step } => reduce_graph(round, step, self.reduce_steps(n), n),
        }
    }

    fn training_graph(&self, round: u64, overlay: Overlay<'_>) -> RoundGraph {
        let n = overlay.len();
        let mut rng = Rng::derive(self.seed, GRAPH_STREAM ^ round);
        match self.scheme {
            Scheme::PairwiseGossip => {
                let mut g = RoundGraph::empty(round, Shape::Pairs { reduce: false }, n);
                for (i, partner) in matching(overlay, &mut rng).into_iter().enumerate() {
                    if let Some(j) = partner {
                        g.add_edge(j, i);
                    }
                }
                g.finish()
            }
            Scheme::MetropolisHastings => {
                let mut g = RoundGraph::empty(round, Shape::Mixing, n);
                if overlay.max_degree() <= self.fanout {
                    // Every site has at most `fanout` edges: the whole overlay, every round
                    // (classic D-PSGD on a fixed graph). Robust rules use it too.
                    for i in 0..n {
                        for j in overlay.neighbours_of(i) {
                            g.add_edge(j, i);
                        }
                    }
                } else {
                    for _ in 0..self.fanout {
                        for (i, partner) in matching(overlay, &mut rng).into_iter().enumerate() {
                            if let Some(j) = partner {
                                g.add_edge(j, i);
                            }
                        }
                    }
                }
                g.finish()
            }
            Scheme::PushSum => {
                let mut g = RoundGraph::empty(round, Shape::PushSum, n);
                for i in 0..n {
                    if let Some(j) = overlay.random_neighbour(i, &mut rng) {
                        g.add_edge(i, j);
                    }
                }
                g.finish()
            }
            Scheme::Epidemic => {
                let mut g = RoundGraph::empty(round, Shape::Spread, n);
                for i in 0..n {
                    for j in overlay.random_neighbours(i, self.fanout, &mut rng) {
                        g.add_edge(i, j);
                    }
                }
                g.finish()
            }
            Scheme::GroupAverage => {
                let mut g = RoundGraph::empty(round, Shape::Group, n);
                for group in groups(overlay, self.group_size, &mut rng) {
                    for &i in &group {
                        for &j in &group {
                            if i != j {
                                g.add_edge(j, i);
                            }
                        }
                    }
                }
                g.finish()
            }
        }
    }

    /// `me`'s group in a `group-average` round (its sources and itself), in ascending member
    /// order: the same list at every member of the group.
    pub fn group_of(&self, graph: &RoundGraph, me: usize) -> Vec<usize> {
        let mut group = graph.sources(me).to_vec();
        group.push(me);
        group.sort_unstable();
        group
    }

    /// The mass `me` keeps and the mass each share it serves carries, from its mass before
    /// the round. Push-sum splits it evenly between the site and its pushes; every other
    /// shape sends the whole mass along with the model and keeps it too.
    pub fn split_mass(&self, graph: &RoundGraph, me: usize, mass: f64) -> (f64, f64) {
        match graph.shape {
            Shape::PushSum => {
                let share = mass / (graph.sinks(me).len() as f64 + 1.0);
                (share, share)
            }
            _ => (mass, mass),
        }
    }

    /// Combines `own` (with `own_weight`, the mass [`Self::split_mass`] kept) and what `me`
    /// received this round into `out`. `incoming` must hold accepted models only (checked,
    /// and for pairs confirmed by both ends); it is sorted by member, so every site that
    /// combines the same inputs computes the same bits.
    pub fn combine(
        &self,
        graph: &RoundGraph,
        me: usize,
        own: &[f32],
        own_weight: f64,
        incoming: &mut [Incoming<'_>],
        out: &mut [f32],
    ) -> Result<Merged, AveragingError> {
        incoming.sort_by_key(|x| x.member);
        if incoming.is_empty() {
            if out.len() != own.len() {
                return Err(AveragingError::LengthMismatch {
                    index: 0,
                    len: own.len(),
                    expected: out.len(),
                });
            }
            out.copy_from_slice(own);
            return Ok(Merged {
                weight: own_weight,
                combined: 0,
            });
        }
        let received: f64 = incoming.iter().map(|x| x.weight).sum();
        if graph.shape == Shape::Unfold {
            let from = &incoming[0];
            weighted_mean(&[(from.values.as_ref(), 1.0)], out)?;
            return Ok(Merged {
                weight: from.weight,
                combined: 1,
            });
        }
        if let Some(bound) = self.clip_norm {
            for x in incoming.iter_mut() {
                clip_towards(x.values.to_mut(), own, bound);
            }
        }
        let combined = incoming.len();
        let (weights, new_weight) = match graph.shape {
            Shape::Pairs { reduce: false } => (Weights::Mass, own_weight),
            Shape::Pairs { reduce: true } | Shape::Fold | Shape::PushSum => {
                (Weights::Mass, own_weight + received)
            }
            Shape::Mixing if self.aggregation == Aggregation::Mean => {
                (Weights::Metropolis, own_weight)
            }
            Shape::Mixing | Shape::Spread => (Weights::Rule, own_weight),
            Shape::Group if self.aggregation == Aggregation::Mean => (Weights::Mass, own_weight),
            Shape::Group => (Weights::Rule, own_weight),
            Shape::Unfold => unreachable!("handled above"),
        };
        let mut inputs: Vec<(&[f32], f64)> = Vec::with_capacity(incoming.len() + 1);
        let own_at = incoming.partition_point(|x| x.member < me);
        for (k, x) in incoming.iter().enumerate() {
            if k == own_at {
                inputs.push((own, own_weight));
            }
            inputs.push((x.values.as_ref(), x.weight));
        }
        if own_at == incoming.len() {
            inputs.push((own, own_weight));
        }
        match weights {
            Weights::Mass => weighted_mean(&inputs, out)?,
            Weights::Metropolis => {
                // W_ij = min(n_i, n_j) / (1 + max(d_i, d_j)) / n_i, the rest stays with i:
                // row-stochastic, and Σ_i n_i W_ij = n_j, so Σ n_i x_i is preserved. With
                // equal sample counts it is the classic Metropolis-Hastings matrix. A
                // neighbour that did not answer leaves its weight with the site.
                let d_me = graph.degree(me);
                let mut own_share = 1.0;
                let mut k = 0;
                for (pos, input) in inputs.iter_mut().enumerate() {
                    if pos == own_at {
                        continue;
                    }
                    let x = &incoming[k];
                    k += 1;
                    let flow = own_weight.min(x.weight)
                        / (1.0 + d_me.max(graph.degree(x.member)) as f64)
                        / own_weight;
                    input.1 = flow;
                    own_share -= flow;
                }
                inputs[own_at].1 = own_share.max(0.0);
                weighted_mean(&inputs, out)?;
            }
            Weights::Rule => aggregate(self.aggregation, self.trim_fraction, &inputs, out)?,
        }
        Ok(Merged {
            weight: new_weight,
            combined,
        })
    }
}

/// Which weights [`RoundRules::combine`] uses.
enum Weights {
    /// The masses the inputs carry.
    Mass,
    /// Sample-weighted Metropolis-Hastings.
    Metropolis,
    /// The aggregation rule over the inputs (sample-weighted where it weighs).
    Rule,
}

/// Combines `inputs` (models with sample weights) into `out` by `rule`: the weighted mean,
/// the coordinate-wise median, or the trimmed mean (`trim_fraction` at each end).
pub fn aggregate(
    rule: Aggregation,
    trim_fraction: f64,
    inputs: &[(&[f32], f64)],
    out: &mut [f32],
) -> Result<(), AveragingError> {
    match rule {
        Aggregation::Mean => weighted_mean(inputs, out),
        Aggregation::Median => {
            let rows: Vec<&[f32]> = inputs.iter().map(|(x, _)| *x).collect();
            coordinate_median(&rows, out)
        }
        Aggregation::TrimmedMean => {
            let rows: Vec<&[f32]> = inputs.iter().map(|(x, _)| *x).collect();
            trimmed_mean(&rows, trim_count(rows.len(), trim_fraction), out)
        }
    }
}

/// A random partition of `overlay`'s members into groups of up to `k` whose members can all
/// reach each other. On the complete overlay: shuffled, cut into groups of `k`, and a
/// remainder below `min(k, 3)` joins the last full group (so no group is smaller than the
/// smallest that secure aggregation takes, when there are enough members). On a restricted
/// overlay: greedily, each unassigned member in random order taking random unassigned
/// neighbours that reach every member taken so far.
fn groups(overlay: Overlay<'_>, k: usize, rng: &mut Rng) -> Vec<Vec<usize>> {
    let n = overlay.len();
    let k = k.max(2);
    let mut order: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut order);
    let mut out: Vec<Vec<usize>> = Vec::new();
    match overlay {
        Overlay::Complete(_) => {
            for chunk in order.chunks(k) {
                out.push(chunk.to_vec());
            }
            if out.len() > 1 && out.last().is_some_and(|g| g.len() < k.min(3)) {
                let rest = out.pop().unwrap_or_default();
                if let Some(last) = out.last_mut() {
                    last.extend(rest);
                }
            }
        }
        Overlay::Restricted(adj) => {
            let mut taken = vec![false; n];
            for &i in &order {
                if taken[i] {
                    continue;
                }
                taken[i] = true;
                let mut group = vec![i];
                let mut free: Vec<usize> = adj[i]
                    .iter()
                    .copied()
                    .filter(|&j| j != i && !taken[j])
                    .collect();
                rng.shuffle(&mut free);
                for j in free {
                    if group.len() == k {
                        break;
                    }
                    if group.iter().all(|&g| adj[j].contains(&g)) {
                        taken[j] = true;
                        group.push(j);
                    }
                }
                out.push(group);
            }
        }
    }
    for g in &mut out {
        g.sort_unstable();
    }
    out
}

/// A random maximal matching of `overlay`: `partner[i]`.
fn matching(overlay: Overlay<'_>, rng: &mut Rng) -> Vec<Option<usize>> {
    let n = overlay.len();
    let mut order: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut order);
    let mut partner = vec![None; n];
    match overlay {
        Overlay::Complete(_) => {
            for pair in order.chunks_exact(2) {
                partner[pair[0]] = Some(pair[1]);
                partner[pair[1]] = Some(pair[0]);
            }
        }
        Overlay::Restricted(adj) => {
            for &i in &order {
                if partner[i].is_some() {
                    continue;
                }
                let free: Vec<usize> = adj[i]
                    .iter()
                    .copied()
                    .filter(|&j| j != i && partner[j].is_none())
                    .collect();
                if free.is_empty() {
                    continue;
                }
                let j = free[rng.below(free.len())];
                partner[i] = Some(j);
                partner[j] = Some(i);
            }
        }
    }
    partner
}

/// Step `step` of `steps` of the final reduce over `n` members (see
/// [`RoundRules::reduce_steps`]).
fn reduce_graph(round: u64, step: u64, steps: u64, n: usize) -> RoundGraph {
    if n < 2 || step >= steps {
        return RoundGraph::empty(round, Shape::Pairs { reduce: true }, n);
    }
    let (p, extra) = split_pow2(n);
    let folds = extra > 0;
    if folds && step == 0 {
        let mut g = RoundGraph::empty(round, Shape::Fold, n);
        for k in 0..extra {
            g.add_edge(p + k, k);
        }
        return g.finish();
    }
    if folds && step == steps - 1 {
        let mut g = RoundGraph::empty(round, Shape::Unfold, n);
        for k in 0..extra {
            g.add_edge(k, p + k);
        }
        return g.finish();
    }
    let dim = step - u64::from(folds);
    let mut g = RoundGraph::empty(round, Shape::Pairs { reduce: true }, n);
    for i in 0..p {
        g.add_edge(i ^ (1 << dim), i);
    }
    g.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use proptest::prelude::*;

    fn rules(scheme: Scheme, fanout: usize) -> RoundRules {
        RoundRules {
            scheme,
            seed: 11,
            fanout,
            group_size: 3,
            aggregation: Aggregation::Mean,
            trim_fraction: 0.0,
            clip_norm: None,
            max_sample_weight: 1e5,
            training_rounds: 30,
            final_reduce: true,
        }
    }

    /// One synchronous round at every site: each pulls its sources' models (all answer).
    fn step(r: &RoundRules, round: u64, xs: &mut [Vec<f32>], mass: &mut [f64]) {
        let g = r.graph(round, Overlay::Complete(xs.len()));
        let split: Vec<(f64, f64)> = (0..xs.len())
            .map(|i| r.split_mass(&g, i, mass[i]))
            .collect();
        let next: Vec<(Vec<f32>, f64)> = (0..xs.len())
            .map(|i| {
                let mut incoming: Vec<Incoming<'_>> = g
                    .sources(i)
                    .iter()
                    .map(|&j| Incoming {
                        member: j,
                        values: Cow::Borrowed(&xs[j]),
                        weight: split[j].1,
                    })
                    .collect();
                let mut out = vec![0.0; xs[i].len()];
                let merged = r
                    .combine(&g, i, &xs[i], split[i].0, &mut incoming, &mut out)
                    .unwrap();
                (out, merged.weight)
            })
            .collect();
        for (i, (x, w)) in next.into_iter().enumerate() {
            xs[i] = x;
            mass[i] = w;
        }
    }

    #[test]
    fn honest_masses_stay_within_the_sample_weight_bound() {
        let n = 7;
        for scheme in [
            Scheme::PairwiseGossip,
            Scheme::PushSum,
            Scheme::MetropolisHastings,
            Scheme::Epidemic,
        ] {
            let mut r = rules(scheme, 2);
            r.max_sample_weight = 50.0;
            r.training_rounds = 12;
            assert_eq!(r.site_mass(20), 20.0);
            assert_eq!(r.site_mass(500), 50.0, "a large site counts the bound");
            let mut xs: Vec<Vec<f32>> = (0..n).map(|i| vec![i as f32; 3]).collect();
            let mut mass: Vec<f64> = (0..n).map(|i| r.site_mass(30 + 10 * i)).collect();
            for round in 1..=r.total_rounds(n) {
                let g = r.graph(round, Overlay::Complete(n));
                let bound = r.weight_bound(g.shape(), n);
                for (i, &m) in mass.iter().enumerate() {
                    let (kept, sent) = r.split_mass(&g, i, m);
                    assert!(
                        kept <= bound && sent <= bound,
                        "{scheme:?} round {round}: site {i} sends {sent} above {bound}"
                    );
                }
                step(&r, round, &mut xs, &mut mass);
            }
            let single = r.weight_bound(Shape::Mixing, n);
            assert_eq!(
                single, 50.0,
                "a site's own count is bounded by the manifest"
            );
            assert!(1e12 > r.weight_bound(Shape::PushSum, n));
        }
    }

    fn weighted_sum(xs: &[Vec<f32>], mass: &[f64]) -> (Vec<f64>, f64) {
        let total: f64 = mass.iter().sum();
        let sum = (0..xs[0].len())
            .map(|c| xs.iter().zip(mass).map(|(x, w)| f64::from(x[c]) * w).sum())
            .collect();
        (sum, total)
    }

    fn spread(xs: &[Vec<f32>]) -> f64 {
        (0..xs[0].len())
            .map(|c| {
                let (lo, hi) = xs.iter().fold((f32::MAX, f32::MIN), |(lo, hi), x| {
                    (lo.min(x[c]), hi.max(x[c]))
                });
                f64::from(hi - lo)
            })
            .fold(0.0, f64::max)
    }

    proptest! {
        /// Without failures, each round preserves the mass-weighted mean of all sites.
        #[test]
        fn every_conservative_scheme_preserves_the_weighted_mean(
            n in 2usize..20,
            seed in any::<u64>(),
            scheme in prop_oneof![Just(Scheme::PairwiseGossip), Just(Scheme::MetropolisHastings), Just(Scheme::PushSum), Just(Scheme::GroupAverage)],
            fanout in 1usize..4,
        ) {
            let mut r = rules(scheme, if scheme == Scheme::MetropolisHastings { fanout } else { 1 });
            r.seed = seed;
            let mut rng = Rng::new(seed);
            let mut xs: Vec<Vec<f32>> = (0..n).map(|_| (0..6).map(|_| rng.range(-5.0, 5.0) as f32).collect()).collect();
            let mut mass: Vec<f64> = (0..n).map(|_| rng.range(1.0, 50.0).round()).collect();
            let (s0, w0) = weighted_sum(&xs, &mass);
            for round in 1..=12 {
                step(&r, round, &mut xs, &mut mass);
                let (s, w) = weighted_sum(&xs, &mass);
                prop_assert!((w - w0).abs() < 1e-9 * w0);
                for (a, b) in s.iter().zip(&s0) {
                    prop_assert!((a / w - b / w0).abs() < 1e-4, "round {round}: {} vs {}", a / w, b / w0);
                }
            }
        }

        /// The reduce ends every site at the exact weighted mean, for any consortium size.
        #[test]
        fn the_reduce_ends_at_the_exact_mean(n in 1usize..40, seed in any::<u64>()) {
            let r = rules(Scheme::PairwiseGossip, 1);
            let mut rng = Rng::new(seed);
            let mut xs: Vec<Vec<f32>> = (0..n).map(|_| (0..4).map(|_| rng.range(-5.0, 5.0) as f32).collect()).collect();
            let mut mass: Vec<f64> = (0..n).map(|_| rng.range(1.0, 50.0).round()).collect();
            let (s0, w0) = weighted_sum(&xs, &mass);
            let total = r.total_rounds(n);
            prop_assert_eq!(total - r.training_rounds, r.reduce_steps(n));
            prop_assert!(r.reduce_steps(n) <= 2 + (n as f64).log2().ceil() as u64);
            for round in r.training_rounds + 1..=total {
                step(&r, round, &mut xs, &mut mass);
            }
            for x in &xs {
                for (v, s) in x.iter().zip(&s0) {
                    prop_assert!((f64::from(*v) - s / w0).abs() < 1e-4, "{v} vs {}", s / w0);
                }
            }
            prop_assert_eq!(spread(&xs), 0.0);
        }
    }

    #[test]
    fn every_scheme_reaches_consensus_and_talks_to_few_peers() {
        for (scheme, fanout) in [
            (Scheme::PairwiseGossip, 1),
            (Scheme::MetropolisHastings, 2),
            (Scheme::PushSum, 1),
            (Scheme::Epidemic, 2),
            // Groups of three: two pulls each (a leftover member makes one group of four).
            (Scheme::GroupAverage, 3),
        ] {
            let r = rules(scheme, fanout);
            let n = 64;
            let mut rng = Rng::new(3);
            let mut xs: Vec<Vec<f32>> = (0..n)
                .map(|_| (0..3).map(|_| rng.range(-1.0, 1.0) as f32).collect())
                .collect();
            let mut mass = vec![1.0; n];
            for round in 1..=r.training_rounds {
                let g = r.graph(round, Overlay::Complete(n));
                // Pulls per site do not grow with the consortium: `fanout` on average.
                let pulls: usize = (0..n).map(|i| g.sources(i).len()).sum();
                assert!(pulls <= n * fanout, "{scheme:?}: {pulls} pulls");
                step(&r, round, &mut xs, &mut mass);
            }
            assert!(spread(&xs) < 0.05, "{scheme:?}: spread {}", spread(&xs));
            // The reduce then ends every site at the same bits.
            for round in r.training_rounds + 1..=r.total_rounds(n) {
                step(&r, round, &mut xs, &mut mass);
            }
            assert_eq!(spread(&xs), 0.0, "{scheme:?}");
        }
    }

    #[test]
    fn groups_partition_the_members_and_agree_on_their_mean() {
        for (n, k) in [
            (3, 3),
            (4, 3),
            (5, 3),
            (7, 4),
            (10, 4),
            (13, 5),
            (2, 4),
            (64, 8),
        ] {
            let mut r = rules(Scheme::GroupAverage, 1);
            r.group_size = k;
            for round in 1..6 {
                let g = r.graph(round, Overlay::Complete(n));
                assert_eq!(g.shape(), Shape::Group);
                let mut distinct: Vec<Vec<usize>> = Vec::new();
                for i in 0..n {
                    let group = r.group_of(&g, i);
                    // Every member of a group names the same group.
                    for &j in &group {
                        assert_eq!(r.group_of(&g, j), group, "n {n} k {k}: {i} vs {j}");
                    }
                    assert!(group.len() <= k + 2, "n {n} k {k}: {group:?}");
                    assert!(group.len() >= k.min(3).min(n), "n {n} k {k}: {group:?}");
                    if !distinct.contains(&group) {
                        distinct.push(group);
                    }
                }
                // A partition: the distinct groups hold every member once.
                let mut all: Vec<usize> = distinct.concat();
                all.sort_unstable();
                assert_eq!(all, (0..n).collect::<Vec<_>>());
                assert!(
                    (0..n).all(|i| g.sources(i) == g.sinks(i)),
                    "pulls go both ways"
                );
            }
        }
        // Every member of a group merges to the same bits.
        let r = rules(Scheme::GroupAverage, 1);
        let g = r.graph(1, Overlay::Complete(6));
        let xs: Vec<Vec<f32>> = (0..6)
            .map(|i| vec![i as f32, 1.0 / (i + 1) as f32])
            .collect();
        let group = r.group_of(&g, 0);
        let outs: Vec<Vec<f32>> = group
            .iter()
            .map(|&i| {
                let mut inc: Vec<Incoming<'_>> = group
                    .iter()
                    .filter(|&&j| j != i)
                    .map(|&j| Incoming {
                        member: j,
                        values: Cow::Borrowed(&xs[j]),
                        weight: 1.0 + j as f64,
                    })
                    .collect();
                let mut out = vec![0.0; 2];
                r.combine(&g, i, &xs[i], 1.0 + i as f64, &mut inc, &mut out)
                    .unwrap();
                out
            })
            .collect();
        assert!(outs.windows(2).all(|w| w[0] == w[1]), "{outs:?}");
        // On a restricted overlay a group is a clique of it.
        let adj: Vec<Vec<usize>> = (0..12)
            .map(|i| {
                (0..12)
                    .filter(|&j| j != i && (i / 4 == j / 4 || (i + j) % 5 == 0))
                    .collect()
            })
            .collect();
        let mut r = rules(Scheme::GroupAverage, 1);
        r.group_size = 4;
        for round in 1..8 {
            let g = r.graph(round, Overlay::Restricted(&adj));
            for i in 0..12 {
                let group = r.group_of(&g, i);
                for &a in &group {
                    for &b in &group {
                        assert!(a == b || adj[a].contains(&b), "{group:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn every_site_computes_the_same_graph() {
        let r = rules(Scheme::Epidemic, 3);
        let a = r.graph(5, Overlay::Complete(30));
        let b = r.graph(5, Overlay::Complete(30));
        for i in 0..30 {
            assert_eq!(a.sources(i), b.sources(i));
            assert_eq!(a.sinks(i).len(), 3);
        }
        let c = r.graph(6, Overlay::Complete(30));
        assert!((0..30).any(|i| a.sources(i) != c.sources(i)));
    }

    #[test]
    fn pairs_are_symmetric_and_both_ends_compute_the_same_bits() {
        let r = rules(Scheme::PairwiseGossip, 1);
        let g = r.graph(1, Overlay::Complete(9));
        let idle: Vec<usize> = (0..9).filter(|&i| g.sources(i).is_empty()).collect();
        assert_eq!(idle.len(), 1);
        let xs: Vec<Vec<f32>> = (0..9)
            .map(|i| vec![i as f32 * 0.37, 1.0 / (i + 1) as f32])
            .collect();
        for i in (0..9).filter(|i| !idle.contains(i)) {
            let j = g.sources(i)[0];
            assert_eq!(g.sources(j), &[i]);
            let mut out_i = vec![0.0; 2];
            let mut out_j = vec![0.0; 2];
            let mut from_j = [Incoming {
                member: j,
                values: Cow::Borrowed(&xs[j]),
                weight: 3.0,
            }];
            let mut from_i = [Incoming {
                member: i,
                values: Cow::Borrowed(&xs[i]),
                weight: 7.0,
            }];
            r.combine(&g, i, &xs[i], 7.0, &mut from_j, &mut out_i)
                .unwrap();
            r.combine(&g, j, &xs[j], 3.0, &mut from_i, &mut out_j)
                .unwrap();
            assert_eq!(out_i, out_j);
        }
    }

    #[test]
    fn a_restricted_overlay_only_uses_its_edges() {
        let ring: Vec<Vec<usize>> = (0..10).map(|i| vec![(i + 9) % 10, (i + 1) % 10]).collect();
        for scheme in Scheme::ALL {
            let r = rules(scheme, 2);
            for round in 1..5 {
                let g = r.graph(round, Overlay::Restricted(&ring));
                for (i, edges) in ring.iter().enumerate() {
                    for j in g.neighbours(i) {
                        assert!(edges.contains(&j), "{scheme:?}: {i}-{j}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_missing_neighbour_leaves_its_weight_with_the_site() {
        let r = rules(Scheme::MetropolisHastings, 2);
        let g = r.graph(2, Overlay::Complete(10));
        let me = 0;
        let own = vec![1.0f32; 3];
        let mut out = vec![0.0; 3];
        // Nothing arrived: the model stays.
        r.combine(&g, me, &own, 5.0, &mut [], &mut out).unwrap();
        assert_eq!(out, own);
        // One of its neighbours answered with the same model: still the same model.
        let j = g.sources(me)[0];
        let mut inc = [Incoming {
            member: j,
            values: Cow::Borrowed(&own),
            weight: 5.0,
        }];
        let merged = r.combine(&g, me, &own, 5.0, &mut inc, &mut out).unwrap();
        assert_eq!((merged.weight, merged.combined), (5.0, 1));
        for v in &out {
            assert!((v - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn robust_rules_and_clipping_have_no_exact_reduce() {
        let mut m =
            Manifest::parse(include_str!("../../examples/synthetic-quickstart.toml")).unwrap();
        m.averaging.scheme = Scheme::MetropolisHastings;
        assert!(RoundRules::from_manifest(&m).final_reduce);
        assert_eq!(RoundRules::from_manifest(&m).fanout, DEFAULT_MIXING_DEGREE);
        m.averaging.aggregation = Aggregation::Median;
        let r = RoundRules::from_manifest(&m);
        assert!(!r.final_reduce);
        assert_eq!(r.total_rounds(16), r.training_rounds);
    }
}
