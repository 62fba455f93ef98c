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
    }
}
