//! Consortium communication graphs as adjacency lists (undirected, no self-loops).

/// Why a topology cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopologyError {
    /// Too few nodes or impossible dimensions for the shape asked for.
    #[error("cannot build a {shape} with {nodes} nodes: {reason}")]
    Impossible {
        /// The shape.
        shape: &'static str,
        /// Nodes asked for.
        nodes: usize,
        /// Why not.
        reason: String,
    },
}

/// Every node connected to every other.
pub fn complete(n: usize) -> Vec<Vec<usize>> {
    (0..n)
        .map(|i| (0..n).filter(|&j| j != i).collect())
        .collect()
}

/// A cycle: node `i` talks to `i - 1` and `i + 1`.
pub fn ring(n: usize) -> Result<Vec<Vec<usize>>, TopologyError> {
    if n < 3 {
        return Err(TopologyError::Impossible {
            shape: "ring",
            nodes: n,
            reason: "a ring needs at least 3 nodes".into(),
        });
    }
    Ok((0..n).map(|i| vec![(i + n - 1) % n, (i + 1) % n]).collect())
}

/// A `rows x cols` grid with wrap-around (each node has 4 neighbours).
pub fn torus(rows: usize, cols: usize) -> Result<Vec<Vec<usize>>, TopologyError> {
    if rows < 3 || cols < 3 {
        return Err(TopologyError::Impossible {
            shape: "2D torus",
            nodes: rows * cols,
            reason: format!("{rows}x{cols}: both sides must be at least 3"),
        });
    }
    let id = |r: usize, c: usize| r * cols + c;
    Ok((0..rows * cols)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            vec![
                id((r + rows - 1) % rows, c),
                id((r + 1) % rows, c),
                id(r, (c + cols - 1) % cols),
                id(r, (c + 1) % cols),
            ]
        })
        .collect())
}

/// Node `i` linked to `i +- 2^k (mod n)` for every power of two below `n`: logarithmic
/// degree and a large spectral gap (the "exponential graph" of decentralized SGD papers).
pub fn exponential(n: usize) -> Result<Vec<Vec<usize>>, TopologyError> {
    if n < 3 {
        return Err(TopologyError::Impossible {
            shape: "exponential graph",
            nodes: n,
            reason: "needs at least 3 nodes".into(),
        });
    }
    let mut adj = vec![std::collections::BTreeSet::new(); n];
    let mut hop = 1;
    while hop < n {
        for (i, neighbours) in adj.iter_mut().enumerate() {
            for j in [(i + hop) % n, (i + n - hop % n) % n] {
                if j != i {
                    neighbours.insert(j);
                }
            }
        }
        hop *= 2;
    }
    Ok(adj.into_iter().map(|s| s.into_iter().collect()).collect())
}

/// A random `d`-regular graph (configuration model with restarts), deterministic in `seed`.
pub fn random_regular(n: usize, d: usize, seed: u64) -> Result<Vec<Vec<usize>>, TopologyError> {
    if d == 0 || d >= n || (n * d) % 2 == 1 {
        return Err(TopologyError::Impossible {
            shape: "random regular graph",
            nodes: n,
            reason: format!("degree {d} needs 0 < d < n and n*d even"),
        });
    }
    let mut rng = medmesh_training::rng::Rng::derive(seed, 0x2E6);
    for _attempt in 0..1000 {
        let mut stubs: Vec<usize> = (0..n).flat_map(|i| std::iter::repeat_n(i, d)).collect();
        rng.shuffle(&mut stubs);
        let mut adj = vec![std::collections::BTreeSet::new(); n];
        let ok = stubs.chunks(2).all(|pair| {
            let (a, b) = (pair[0], pair[1]);
            a != b && adj[a].insert(b) && adj[b].insert(a)
        });
        if ok {
            return Ok(adj.into_iter().map(|s| s.into_iter().collect()).collect());
        }
    }
    Err(TopologyError::Impossible {
        shape: "random regular graph",
        nodes: n,
        reason: format!("no simple {d}-regular pairing found in 1000 tries"),
    })
}

fn from_sets(adj: Vec<std::collections::BTreeSet<usize>>) -> Vec<Vec<usize>> {
    adj.into_iter().map(|s| s.into_iter().collect()).collect()
}

fn connect(adj: &mut [std::collections::BTreeSet<usize>], a: usize, b: usize) {
    if a != b {
        adj[a].insert(b);
        adj[b].insert(a);
    }
}

/// Erdős–Rényi G(n, p): every pair linked with probability `p`; a ring is laid under it so the
/// graph is connected (a disconnected consortium cannot reach consensus at all).
pub fn erdos_renyi(n: usize, p: f64, seed: u64) -> Result<Vec<Vec<usize>>, TopologyError> {
    if !(0.0..=1.0).contains(&p) {
        return Err(TopologyError::Impossible {
            shape: "Erdős–Rényi graph",
            nodes: n,
            reason: format!("edge probability {p} is not in [0, 1]"),
        });
    }
    let mut adj = vec![std::collections::BTreeSet::new(); n];
    for (i, ns) in ring(n)?.into_iter().enumerate() {
        for j in ns {
            connect(&mut adj, i, j);
        }
    }
    let mut rng = medmesh_training::rng::Rng::derive(seed, 0xE7);
    for i in 0..n {
        for j in i + 1..n {
            if rng.uniform() < p {
                connect(&mut adj, i, j);
            }
        }
    }
    Ok(from_sets(adj))
}

/// Watts–Strogatz small world: a ring lattice where each node links to its `k` nearest
/// neighbours (`k` even), each edge rewired to a random node with probability `beta`.
pub fn watts_strogatz(
    n: usize,
    k: usize,
    beta: f64,
    seed: u64,
) -> Result<Vec<Vec<usize>>, TopologyError> {
    if k < 2 || k % 2 == 1 || k >= n || !(0.0..=1.0).contains(&beta) {
        return Err(TopologyError::Impossible {
            shape: "Watts–Strogatz graph",
            nodes: n,
            reason: format!("needs an even k in 2..n (got {k}) and beta in [0, 1] (got {beta})"),
        });
    }
    let mut rng = medmesh_training::rng::Rng::derive(seed, 0x5A11);
    let mut adj = vec![std::collections::BTreeSet::new(); n];
    for i in 0..n {
        for step in 1..=k / 2 {
            connect(&mut adj, i, (i + step) % n);
        }
    }
    for i in 0..n {
        for step in 1..=k / 2 {
            let j = (i + step) % n;
            // Keep the lattice edge to i+1 so the graph stays connected.
            if step > 1 && rng.uniform() < beta {
                let target = rng.below(n);
                if target != i && !adj[i].contains(&target) {
                    adj[i].remove(&j);
                    adj[j].remove(&i);
                    connect(&mut adj, i, target);
                }
            }
        }
    }
    Ok(from_sets(adj))
}

/// The peers a Kademlia routing table gives: random 64-bit ids; each node keeps up to
/// `bucket_size` peers per XOR-distance bucket (the closest ones, as a table that has seen
/// everyone would), and links are used in both directions.
pub fn kademlia(n: usize, bucket_size: usize, seed: u64) -> Result<Vec<Vec<usize>>, TopologyError> {
    if n < 2 || bucket_size == 0 {
        return Err(TopologyError::Impossible {
            shape: "Kademlia graph",
            nodes: n,
            reason: "needs 2 or more nodes and a bucket size of 1 or more".into(),
        });
    }
    let mut rng = medmesh_training::rng::Rng::derive(seed, 0xCAD);
    let ids: Vec<u64> = (0..n).map(|_| rng.next_u64()).collect();
    let mut adj = vec![std::collections::BTreeSet::new(); n];
    for i in 0..n {
        let mut buckets: Vec<Vec<(u64, usize)>> = vec![Vec::new(); 65];
        for j in 0..n {
            if j != i {
                let d = ids[i] ^ ids[j];
                buckets[64 - d.leading_zeros() as usize].push((d, j));
            }
        }
        for bucket in &mut buckets {
            bucket.sort_unstable();
            for &(_, j) in bucket.iter().take(bucket_size) {
                connect(&mut adj, i, j);
            }
        }
    }
    Ok(from_sets(adj))
}

/// A star around `center`: the FedAvg server and its clients.
pub fn star(n: usize, center: usize) -> Result<Vec<Vec<usize>>, TopologyError> {
    if n < 2 || center >= n {
        return Err(TopologyError::Impossible {
            shape: "star",
            nodes: n,
            reason: format!("needs 2 or more nodes and a center below {n}"),
        });
    }
    Ok((0..n)
        .map(|i| {
            if i == center {
                (0..n).filter(|&j| j != center).collect()
            } else {
                vec![center]
            }
        })
        .collect())
}

/// Whether every node can reach every other.
pub fn is_connected(adj: &[Vec<usize>]) -> bool {
    if adj.is_empty() {
        return true;
    }
    let mut seen = vec![false; adj.len()];
    let mut stack = vec![0];
    seen[0] = true;
    while let Some(i) = stack.pop() {
        for &j in &adj[i] {
            if !seen[j] {
                seen[j] = true;
                stack.push(j);
            }
        }
    }
    seen.into_iter().all(|s| s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn symmetric(adj: &[Vec<usize>]) -> bool {
        adj.iter()
            .enumerate()
            .all(|(i, ns)| ns.iter().all(|&j| j != i && adj[j].contains(&i)))
    }

    #[test]
    fn shapes_are_undirected_with_expected_degrees() {
        assert!(symmetric(&complete(6)) && complete(6).iter().all(|n| n.len() == 5));
        assert!(symmetric(&ring(7).unwrap()) && ring(7).unwrap().iter().all(|n| n.len() == 2));
        let t = torus(3, 4).unwrap();
        assert!(symmetric(&t) && t.iter().all(|n| n.len() == 4));
        let r = random_regular(20, 4, 1).unwrap();
        assert!(symmetric(&r) && r.iter().all(|n| n.len() == 4));
        assert_eq!(
            r,
            random_regular(20, 4, 1).unwrap(),
            "deterministic in the seed"
        );
        assert!(random_regular(5, 3, 1).is_err(), "n*d odd");
        let e = exponential(16).unwrap();
        assert!(
            symmetric(&e) && e.iter().all(|n| n.len() == 7),
            "{:?}",
            e[0]
        );
        assert!(ring(2).is_err());
        assert!(torus(2, 5).is_err());
        for g in [
            erdos_renyi(30, 0.1, 3).unwrap(),
            watts_strogatz(30, 4, 0.3, 3).unwrap(),
            kademlia(64, 2, 3).unwrap(),
            star(10, 0).unwrap(),
        ] {
            assert!(symmetric(&g) && is_connected(&g));
        }
        assert_eq!(kademlia(64, 2, 3).unwrap(), kademlia(64, 2, 3).unwrap());
        let k = kademlia(256, 3, 1).unwrap();
        let mean = k.iter().map(Vec::len).sum::<usize>() as f64 / 256.0;
        assert!(
            (8.0..60.0).contains(&mean),
            "a routing table holds O(k log n) peers: {mean}"
        );
        assert_eq!(star(5, 2).unwrap()[2], vec![0, 1, 3, 4]);
        assert!(watts_strogatz(10, 3, 0.1, 1).is_err());
    }
}
