//! The medmesh node: the `medmesh` command each clinic runs, as a library so tests and the
//! simulator can drive its parts.

pub mod cli;
pub mod client;
pub mod commands;
pub mod config;
pub mod dashboard;
pub mod keystore;
pub mod local;
pub mod metrics;
pub mod net;
pub mod service;
pub mod site_data;
