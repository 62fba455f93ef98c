//! medmesh's consortium simulator. It reuses the averaging rules of `medmesh-protocol`
//! (never a copy of them) so what it predicts is what the nodes do.
//!
//! * [`topology`]: communication graphs.
//! * [`consensus`]: consensus-only neighbour averaging in a two-arena layout.
//! * [`spectral`]: the spectral gap that predicts its convergence rate.

pub mod consensus;
pub mod spectral;
pub mod topology;
