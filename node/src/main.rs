//! The `medmesh` binary. Errors reach the user here, with their full chain of causes.

use std::process::ExitCode;

use clap::Parser;
use medmesh_node::cli::{Cli, Command, ExperimentCommand};
use medmesh_node::commands::{experiment, keys, roster};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keygen { out, force } => keys::keygen(&out, force),
        Command::Whoami { key } => keys::whoami(&key),
        Command::NetworkKey { out, force } => keys::network_key(&out, force),
        Command::Roster { command } => roster::run(command),
        Command::Experiment { command } => match command {
            ExperimentCommand::Check { manifest } => experiment::check(&manifest),
            ExperimentCommand::Sign { manifest, key, out } => {
                experiment::sign(&manifest, &key, &out)
            }
            ExperimentCommand::Verify { signed, roster } => experiment::verify(&signed, &roster),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
