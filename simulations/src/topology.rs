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
        assert!(ring(2).is_err());
        assert!(torus(2, 5).is_err());
    }
}
