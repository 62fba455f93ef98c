//! Per-site links and hardware drawn from the scenario's ranges, and how long transfers take
//! on them.

use medmesh_training::rng::Rng;

use crate::scenario::{Network, Range};

/// One site's link and compute.
#[derive(Debug, Clone, Copy)]
pub struct Site {
    /// Uplink, bit/s.
    pub up_bps: f64,
    /// Downlink, bit/s.
    pub down_bps: f64,
    /// One-way latency to the backbone, seconds.
    pub latency_s: f64,
    /// Compute speed relative to the reference machine.
    pub speed: f64,
}

fn draw(r: Range, rng: &mut Rng) -> f64 {
    if r.max <= r.min {
        r.min
    } else if r.log {
        (r.min.ln() + rng.uniform() * (r.max.ln() - r.min.ln())).exp()
    } else {
        rng.range(r.min, r.max)
    }
}

/// Draws every site's link and compute, deterministically in `seed`.
pub fn draw_sites(n: usize, net: &Network, seed: u64) -> Vec<Site> {
    let mut rng = Rng::derive(seed, 0x11_4C5);
    (0..n)
        .map(|_| Site {
            up_bps: draw(net.uplink_mbps, &mut rng) * 1e6,
            down_bps: draw(net.downlink_mbps, &mut rng) * 1e6,
            latency_s: draw(net.latency_ms, &mut rng) / 1e3,
            speed: draw(net.compute_speed, &mut rng),
        })
        .collect()
}

/// A round's transfers (sender, receiver), each one model, and when each site is done.
#[derive(Debug, Default, Clone)]
pub struct Transfers {
    /// (from, to) pairs.
    pub pairs: Vec<(usize, usize)>,
}

/// Seconds for one model of `bytes` from `from` to `to`, when `from` uploads to `uploads`
/// sites and `to` downloads from `downloads` at the same time (links shared evenly), with
/// retransmissions for `loss`.
pub fn transfer_seconds(
    sites: &[Site],
    bytes: u64,
    from: usize,
    to: usize,
    uploads: usize,
    downloads: usize,
    loss: f64,
) -> f64 {
    let (a, b) = (&sites[from], &sites[to]);
    let rate = (a.up_bps / uploads.max(1) as f64).min(b.down_bps / downloads.max(1) as f64);
    a.latency_s + b.latency_s + bytes as f64 * 8.0 / rate / (1.0 - loss)
}

/// Advances `clock` for a round of peer-to-peer `transfers` that start when each site is
/// `ready`: a site is done when its own uploads and the downloads it waits for are.
pub fn settle_peer_round(
    sites: &[Site],
    bytes: u64,
    loss: f64,
    ready: &[f64],
    transfers: &Transfers,
    clock: &mut [f64],
) {
    let n = sites.len();
    let (mut up, mut down) = (vec![0usize; n], vec![0usize; n]);
    for &(f, t) in &transfers.pairs {
        up[f] += 1;
        down[t] += 1;
    }
    clock.copy_from_slice(ready);
    for &(f, t) in &transfers.pairs {
        let done =
            ready[f].max(ready[t]) + transfer_seconds(sites, bytes, f, t, up[f], down[t], loss);
        clock[f] = clock[f].max(done);
        clock[t] = clock[t].max(done);
    }
}

/// Advances `clock` for a FedAvg round: every client uploads to `server`, which then sends
/// the average back to every client.
pub fn settle_star_round(
    sites: &[Site],
    bytes: u64,
    loss: f64,
    ready: &[f64],
    server: usize,
    clients: &[usize],
    clock: &mut [f64],
) {
    clock.copy_from_slice(ready);
    let k = clients.len();
    let gathered = clients
        .iter()
        .map(|&c| {
            ready[c].max(ready[server]) + transfer_seconds(sites, bytes, c, server, 1, k, loss)
        })
        .fold(ready[server], f64::max);
    clock[server] = gathered;
    for &c in clients {
        let done = gathered + transfer_seconds(sites, bytes, server, c, k, 1, loss);
        clock[c] = done;
        clock[server] = clock[server].max(done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(mbps: f64, ms: f64) -> Site {
        Site {
            up_bps: mbps * 1e6,
            down_bps: mbps * 1e6,
            latency_s: ms / 1e3,
            speed: 1.0,
        }
    }

    #[test]
    fn transfers_share_the_slower_link() {
        let sites = [site(100.0, 10.0), site(50.0, 20.0)];
        // 50 Mbit/s bottleneck: 6.25 MB take 1 s, plus 30 ms.
        let t = transfer_seconds(&sites, 6_250_000, 0, 1, 1, 1, 0.0);
        assert!((t - 1.03).abs() < 1e-9, "{t}");
        // Three uploads at once leave the sender 33 Mbit/s each: now the bottleneck.
        let t2 = transfer_seconds(&sites, 6_250_000, 0, 1, 3, 1, 0.0);
        assert!(t2 > t);
        let lossy = transfer_seconds(&sites, 6_250_000, 0, 1, 1, 1, 0.5);
        assert!((lossy - (0.03 + 2.0)).abs() < 1e-9);
    }

    #[test]
    fn a_star_round_waits_for_the_slowest_client() {
        let sites = [site(1000.0, 0.0), site(100.0, 0.0), site(10.0, 0.0)];
        let mut clock = vec![0.0; 3];
        settle_star_round(
            &sites,
            1_250_000,
            0.0,
            &[0.0, 0.0, 0.0],
            0,
            &[1, 2],
            &mut clock,
        );
        // Site 2 uploads 10 Mbit in 1 s; the broadcast back takes another second for it.
        assert!((clock[2] - 2.0).abs() < 1e-9, "{clock:?}");
        assert!(clock[1] < clock[2]);
    }
}
