//! medmesh's consortium simulator. It reuses the averaging rules of `medmesh-protocol`
//! (never a copy of them) so what it predicts is what the nodes do.
//!
//! * [`topology`]: communication graphs.
//! * [`consensus`]: consensus-only neighbour averaging in a two-arena layout.

pub mod consensus;
pub mod topology;
