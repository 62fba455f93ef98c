//! The medmesh node: the `medmesh` command each clinic runs, as a library so tests and the
//! simulator can drive its parts.

pub mod cli;
pub mod commands;
pub mod config;
pub mod keystore;
