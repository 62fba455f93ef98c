//! Prometheus metrics: lock-free counters and gauges, served as text on `GET /metrics`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// The current count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (stored as f64 bits).
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// Everything a node reports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Connected roster members.
    pub peers_connected: Gauge,
    /// Peers in the Kademlia routing table.
    pub routing_table_peers: Gauge,
    /// Bytes of protocol messages sent.
    pub bytes_sent: Counter,
    /// Bytes of protocol messages received.
    pub bytes_received: Counter,
    /// Rounds completed by this node.
    pub rounds_completed: Counter,
    /// The current experiment round.
    pub round: Gauge,
    /// Validation Dice after the last round.
    pub dice: Gauge,
    /// Training loss of the last round.
    pub loss: Gauge,
    /// Peer updates averaged in the last round.
    pub peers_averaged: Gauge,
    /// Connections refused because the peer is not on the roster.
    pub refused_not_member: Counter,
    /// Connection attempts that failed in the handshake (wrong network key, garbage, ...).
    pub failed_handshakes: Counter,
    /// Model transfers completed, and their total seconds.
    pub transfers: Counter,
    /// Sum of transfer durations, in microseconds.
    pub transfer_micros: Counter,
    /// Checkpoint or state writes that failed (full disk, I/O errors); the previous
    /// checkpoint stays in place.
    pub checkpoint_failures: Counter,
    /// Training rounds started with fewer reachable neighbours than `averaging.min_peers`
    /// asks, after waiting the round timeout for them.
    pub rounds_short_of_peers: Counter,
    /// Messages and updates dropped, by reason.
    rejected: Mutex<Vec<(&'static str, u64)>>,
}

impl Metrics {
    /// Counts a dropped message or update under `reason` (a short snake_case label).
    pub fn rejected(&self, reason: &'static str) {
        let mut r = self.rejected.lock().unwrap_or_else(|p| p.into_inner());
        match r.iter_mut().find(|(k, _)| *k == reason) {
            Some((_, n)) => *n += 1,
            None => r.push((reason, 1)),
        }
    }

    /// Drops counted under `reason`.
    pub fn rejected_count(&self, reason: &str) -> u64 {
        let r = self.rejected.lock().unwrap_or_else(|p| p.into_inner());
        r.iter().find(|(k, _)| *k == reason).map_or(0, |(_, n)| *n)
    }

    /// Records one finished transfer.
    pub fn transfer_done(&self, elapsed: std::time::Duration) {
        self.transfers.inc();
        self.transfer_micros.add(elapsed.as_micros() as u64);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        metric(
            "medmesh_peers_connected",
            "gauge",
            "Connected roster members.",
            self.peers_connected.get().to_string(),
        );
        metric(
            "medmesh_routing_table_peers",
            "gauge",
            "Peers in the Kademlia routing table.",
            self.routing_table_peers.get().to_string(),
        );
        metric(
            "medmesh_bytes_sent_total",
            "counter",
            "Protocol bytes sent.",
            self.bytes_sent.get().to_string(),
        );
        metric(
            "medmesh_bytes_received_total",
            "counter",
            "Protocol bytes received.",
            self.bytes_received.get().to_string(),
        );
        metric(
            "medmesh_rounds_completed_total",
            "counter",
            "Experiment rounds completed.",
            self.rounds_completed.get().to_string(),
        );
        metric(
            "medmesh_round",
            "gauge",
            "Current experiment round.",
            self.round.get().to_string(),
        );
        metric(
            "medmesh_dice",
            "gauge",
            "Validation Dice after the last round.",
            self.dice.get().to_string(),
        );
        metric(
            "medmesh_loss",
            "gauge",
            "Training loss of the last round.",
            self.loss.get().to_string(),
        );
        metric(
            "medmesh_peers_averaged",
            "gauge",
            "Peer updates averaged in the last round.",
            self.peers_averaged.get().to_string(),
        );
        metric(
            "medmesh_connections_refused_total",
            "counter",
            "Connections refused: peer not on the roster.",
            self.refused_not_member.get().to_string(),
        );
        metric(
            "medmesh_handshakes_failed_total",
            "counter",
            "Connection attempts that failed in the handshake.",
            self.failed_handshakes.get().to_string(),
        );
        metric(
            "medmesh_transfers_total",
            "counter",
            "Model updates received.",
            self.transfers.get().to_string(),
        );
        metric(
            "medmesh_transfer_seconds_total",
            "counter",
            "Seconds spent receiving model updates.",
            (self.transfer_micros.get() as f64 / 1e6).to_string(),
        );
        metric(
            "medmesh_checkpoint_failures_total",
            "counter",
            "Checkpoint writes that failed (the previous checkpoint was kept).",
            self.checkpoint_failures.get().to_string(),
        );
        metric(
            "medmesh_rounds_short_of_peers_total",
            "counter",
            "Training rounds started with fewer reachable neighbours than min_peers asks.",
            self.rounds_short_of_peers.get().to_string(),
        );
        let _ = writeln!(
            out,
            "# HELP medmesh_rejected_total Messages and updates dropped, by reason.\n# TYPE medmesh_rejected_total counter"
        );
        let r = self.rejected.lock().unwrap_or_else(|p| p.into_inner());
        for (reason, n) in r.iter() {
            let _ = writeln!(out, "medmesh_rejected_total{{reason=\"{reason}\"}} {n}");
        }
        out
    }

    /// Serves `GET /metrics` on `addr` until the task is dropped. Returns the bound address.
    pub async fn serve(
        self: std::sync::Arc<Self>,
        addr: &str,
    ) -> std::io::Result<(SocketAddr, impl Future<Output = ()> + use<>)> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let serve = async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    continue;
                };
                let metrics = self.clone();
                tokio::spawn(async move {
                    let mut request = [0u8; 1024];
                    let n = match tokio::time::timeout(
                        std::time::Duration::from_secs(5),
                        socket.read(&mut request),
                    )
                    .await
                    {
                        Ok(Ok(n)) => n,
                        _ => return,
                    };
                    let (status, body) = if request[..n].starts_with(b"GET /metrics") {
                        ("200 OK", metrics.render())
                    } else {
                        ("404 Not Found", "try GET /metrics\n".to_string())
                    };
                    let response = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(response.as_bytes()).await;
                });
            }
        };
        Ok((local, serve))
    }
}

/// Reads one metric's value out of a text exposition (for the demo and tests).
pub fn parse_value(exposition: &str, name: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let value = rest.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_round_trips_values() {
        let m = Metrics::default();
        m.bytes_sent.add(42);
        m.dice.set(0.875);
        m.rejected("nan_weights");
        m.rejected("nan_weights");
        let text = m.render();
        assert_eq!(parse_value(&text, "medmesh_bytes_sent_total"), Some(42.0));
        assert_eq!(parse_value(&text, "medmesh_dice"), Some(0.875));
        assert!(text.contains("medmesh_rejected_total{reason=\"nan_weights\"} 2"));
        assert_eq!(m.rejected_count("nan_weights"), 2);
    }
}
