//! The node's metrics, kept with `prometheus-client` and served as OpenMetrics text on
//! `GET /metrics` by the [`crate::dashboard`]. Per-experiment series carry an
//! `experiment` label, so two experiments on one node never overwrite each other.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A gauge of real values.
type RealGauge = Gauge<f64, AtomicU64>;

/// A histogram family whose buckets a plain function makes.
type Histograms = Family<ExperimentLabel, Histogram, fn() -> Histogram>;

/// The `experiment` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExperimentLabel {
    experiment: String,
}

/// The labels of a model transfer: its experiment, and whether it came directly or
/// through a relay.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransferLabel {
    experiment: String,
    path: &'static str,
}

/// The `reason` label of dropped messages.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

/// The `result` label of hole punches.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Round durations: half a second to about 17 minutes.
fn round_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.5, 2.0, 12))
}

/// Transfer durations: 10 ms to about 80 s.
fn transfer_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 14))
}

/// Everything a node reports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Connected roster members.
    pub peers_connected: Gauge,
    /// Peers in the Kademlia routing table.
    pub routing_table_peers: Gauge,
    /// Bytes of protocol messages sent.
    pub bytes_sent: Counter,
    /// Bytes of protocol messages received.
    pub bytes_received: Counter,
    /// Connections refused because the peer is not on the roster.
    pub refused_not_member: Counter,
    /// Connection attempts that failed in the handshake (wrong network key, garbage, ...).
    pub failed_handshakes: Counter,
    /// Checkpoint or state writes that failed (full disk, I/O errors); the previous
    /// checkpoint stays in place.
    pub checkpoint_failures: Counter,
    /// Training rounds started with fewer reachable neighbours than `averaging.min_peers`
    /// asks, after waiting the round timeout for them.
    pub rounds_short_of_peers: Counter,
    /// HTTP requests the dashboard refused (bad token, bad host, bad method).
    pub http_refused: Counter,
    /// Connected members with a direct connection.
    pub peers_direct: Gauge,
    /// Connected members reached only through a relay.
    pub peers_relayed: Gauge,
    /// AutoNAT's verdict on this node: 1 reachable, -1 not reachable, 0 not yet known.
    pub reachable: Gauge,
    /// Relays this node holds a reservation on.
    pub relay_reservations: Gauge,
    /// Relayed connections passing through this node now.
    pub relayed_circuits: Gauge,
    /// Hole punches, by result.
    hole_punches: Family<ResultLabel, Counter>,
    round: Family<ExperimentLabel, Gauge>,
    dice: Family<ExperimentLabel, RealGauge>,
    loss: Family<ExperimentLabel, RealGauge>,
    peers_averaged: Family<ExperimentLabel, Gauge>,
    rounds_completed: Family<ExperimentLabel, Counter>,
    round_seconds: Histograms,
    transfer_seconds: Family<TransferLabel, Histogram, fn() -> Histogram>,
    rejected: Family<ReasonLabel, Counter>,
    /// The reasons counted so far, in order of first use (for the dashboard).
    reasons: Mutex<Vec<&'static str>>,
}

/// One finished round of one experiment, as the metrics record it.
#[derive(Debug, Clone, Copy)]
pub struct RoundDone {
    /// The round.
    pub round: u64,
    /// Validation Dice after it.
    pub dice: f32,
    /// Training loss of it.
    pub loss: f32,
    /// Peers averaged, for a training round; `None` for a step of the final reduce.
    pub peers_averaged: Option<usize>,
    /// How long the round took.
    pub elapsed: Duration,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("medmesh");
        let this = Self {
            peers_connected: Gauge::default(),
            routing_table_peers: Gauge::default(),
            bytes_sent: Counter::default(),
            bytes_received: Counter::default(),
            refused_not_member: Counter::default(),
            failed_handshakes: Counter::default(),
            checkpoint_failures: Counter::default(),
            rounds_short_of_peers: Counter::default(),
            http_refused: Counter::default(),
            peers_direct: Gauge::default(),
            peers_relayed: Gauge::default(),
            reachable: Gauge::default(),
            relay_reservations: Gauge::default(),
            relayed_circuits: Gauge::default(),
            hole_punches: Family::default(),
            round: Family::default(),
            dice: Family::default(),
            loss: Family::default(),
            peers_averaged: Family::default(),
            rounds_completed: Family::default(),
            round_seconds: Family::new_with_constructor(round_buckets),
            transfer_seconds: Family::new_with_constructor(transfer_buckets),
            rejected: Family::default(),
            reasons: Mutex::new(Vec::new()),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "peers_connected",
            "Connected roster members",
            this.peers_connected.clone(),
        );
        r.register(
            "routing_table_peers",
            "Peers in the Kademlia routing table",
            this.routing_table_peers.clone(),
        );
        r.register("bytes_sent", "Protocol bytes sent", this.bytes_sent.clone());
        r.register(
            "bytes_received",
            "Protocol bytes received",
            this.bytes_received.clone(),
        );
        r.register(
            "connections_refused",
            "Connections refused: peer not on the roster",
            this.refused_not_member.clone(),
        );
        r.register(
            "handshakes_failed",
            "Connection attempts that failed in the handshake",
            this.failed_handshakes.clone(),
        );
        r.register(
            "checkpoint_failures",
            "Checkpoint writes that failed (the previous checkpoint was kept)",
            this.checkpoint_failures.clone(),
        );
        r.register(
            "rounds_short_of_peers",
            "Training rounds started with fewer reachable neighbours than min_peers asks",
            this.rounds_short_of_peers.clone(),
        );
        r.register(
            "http_refused",
            "Dashboard requests refused (token, host or method)",
            this.http_refused.clone(),
        );
        r.register(
            "peers_direct",
            "Connected members with a direct connection",
            this.peers_direct.clone(),
        );
        r.register(
            "peers_relayed",
            "Connected members reached only through a relay",
            this.peers_relayed.clone(),
        );
        r.register(
            "reachable",
            "AutoNAT verdict: 1 reachable from outside, -1 not reachable, 0 not yet known",
            this.reachable.clone(),
        );
        r.register(
            "relay_reservations",
            "Relays this node holds a reservation on",
            this.relay_reservations.clone(),
        );
        r.register(
            "relayed_circuits",
            "Relayed connections between other members passing through this node",
            this.relayed_circuits.clone(),
        );
        r.register(
            "hole_punches",
            "Hole punches (relayed connections upgraded to direct), by result",
            this.hole_punches.clone(),
        );
        r.register("round", "Current round, per experiment", this.round.clone());
        r.register(
            "dice",
            "Validation Dice after the last round, per experiment",
            this.dice.clone(),
        );
        r.register(
            "loss",
            "Training loss of the last round, per experiment",
            this.loss.clone(),
        );
        r.register(
            "peers_averaged",
            "Peer updates averaged in the last training round, per experiment",
            this.peers_averaged.clone(),
        );
        r.register(
            "rounds_completed",
            "Training rounds completed, per experiment",
            this.rounds_completed.clone(),
        );
        r.register(
            "round_duration_seconds",
            "Wall-clock seconds per round (train, exchange, average, validate), per experiment",
            this.round_seconds.clone(),
        );
        r.register(
            "transfer_seconds",
            "Seconds to receive one model update, per experiment and path (direct or relayed)",
            this.transfer_seconds.clone(),
        );
        r.register(
            "rejected",
            "Messages and updates dropped, by reason",
            this.rejected.clone(),
        );
        Self { registry, ..this }
    }
}

impl Metrics {
    /// Counts a dropped message or update under `reason` (a short snake_case label).
    pub fn rejected(&self, reason: &'static str) {
        self.rejected
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
        let mut reasons = self.reasons.lock().unwrap_or_else(|p| p.into_inner());
        if !reasons.contains(&reason) {
            reasons.push(reason);
        }
    }

    /// Drops counted under `reason`.
    pub fn rejected_count(&self, reason: &str) -> u64 {
        self.rejected
            .get(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .map_or(0, |c| c.get())
    }

    /// Every reason counted so far, with its count.
    pub fn rejected_counts(&self) -> Vec<(&'static str, u64)> {
        let reasons = self.reasons.lock().unwrap_or_else(|p| p.into_inner());
        reasons
            .iter()
            .map(|r| (*r, self.rejected_count(r)))
            .collect()
    }

    /// Counts one hole punch: `ok` or `failed`.
    pub fn hole_punch(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.hole_punches
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Records one received model update of `experiment`.
    /// `path` is `direct` or `relayed`.
    pub fn transfer_done(&self, experiment: &str, path: &'static str, elapsed: Duration) {
        self.transfer_seconds
            .get_or_create(&TransferLabel {
                experiment: experiment.to_owned(),
                path,
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Records one finished round of `experiment`.
    pub fn round_done(&self, experiment: &str, r: RoundDone) {
        let l = label(experiment);
        self.round.get_or_create(&l).set(r.round as i64);
        self.dice.get_or_create(&l).set(f64::from(r.dice));
        self.loss.get_or_create(&l).set(f64::from(r.loss));
        if let Some(peers) = r.peers_averaged {
            self.rounds_completed.get_or_create(&l).inc();
            self.peers_averaged.get_or_create(&l).set(peers as i64);
        }
        self.round_seconds
            .get_or_create(&l)
            .observe(r.elapsed.as_secs_f64());
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .unwrap_or_else(|e| unreachable!("writing into a String cannot fail: {e}"));
        out
    }
}

fn label(experiment: &str) -> ExperimentLabel {
    ExperimentLabel {
        experiment: experiment.to_owned(),
    }
}

/// Reads one metric's value out of a text exposition (for the demo and tests): the first
/// sample named `name`, with or without labels.
pub fn parse_value(exposition: &str, name: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let value = match rest.strip_prefix('{') {
            Some(labelled) => labelled.split_once("} ")?.1,
            None => rest.strip_prefix(' ')?,
        };
        value.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_round_trips_values_per_experiment() {
        let m = Metrics::default();
        m.bytes_sent.inc_by(42);
        let round = |round, dice| RoundDone {
            round,
            dice,
            loss: 0.5,
            peers_averaged: Some(2),
            elapsed: Duration::from_millis(1500),
        };
        m.round_done("a", round(3, 0.875));
        m.round_done("b", round(5, 0.5));
        m.transfer_done("a", "relayed", Duration::from_millis(20));
        m.rejected("nan_weights");
        m.rejected("nan_weights");
        let text = m.render();
        assert_eq!(parse_value(&text, "medmesh_bytes_sent_total"), Some(42.0));
        assert!(
            text.contains("medmesh_dice{experiment=\"a\"} 0.875"),
            "{text}"
        );
        assert!(
            text.contains("medmesh_dice{experiment=\"b\"} 0.5"),
            "{text}"
        );
        assert!(text.contains("medmesh_round{experiment=\"b\"} 5"), "{text}");
        assert!(
            text.contains("medmesh_round_duration_seconds_bucket{le=\"2.0\",experiment=\"a\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("medmesh_transfer_seconds_count{experiment=\"a\",path=\"relayed\"} 1"),
            "{text}"
        );
        assert!(text.contains("medmesh_rejected_total{reason=\"nan_weights\"} 2"));
        assert_eq!(m.rejected_count("nan_weights"), 2);
        assert_eq!(m.rejected_counts(), vec![("nan_weights", 2)]);
        // `medmesh_round` is not read off `medmesh_rounds_completed_total` (1 for either
        // experiment) or the histogram; series of one family come in no fixed order.
        let round = parse_value(&text, "medmesh_round");
        assert!(round == Some(3.0) || round == Some(5.0), "{round:?}");
        assert_eq!(
            parse_value(&text, "medmesh_round{experiment=\"b\"}"),
            Some(5.0)
        );
    }
}
