//! The `medmesh` binary. Errors reach the user here, with their full chain of causes.

use std::process::ExitCode;

use clap::Parser;
use medmesh_node::cli::{Cli, Command, DataCommand, ExperimentCommand, LogFormat};
use medmesh_node::commands::{data, experiment, keys, roster, train};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Data {
            command:
                DataCommand::Prepare {
                    task,
                    sites,
                    out,
                    preset,
                    seed,
                    cases,
                    size,
                    slices,
                },
        } => data::prepare(&data::Prepare {
            task,
            sites,
            out: &out,
            preset: &preset,
            seed,
            cases,
            size,
            slices,
        }),
        Command::TrainLocal {
            data,
            manifest,
            out,
            device,
            checkpoint,
        } => train::train_local(&data, &manifest, &out, &device, checkpoint.as_deref()),
        Command::Evaluate {
            model,
            data,
            manifest,
            device,
        } => train::evaluate(&model, &data, manifest.as_deref(), &device),
        Command::Keygen { out, force } => keys::keygen(&out, force),
        Command::Whoami { key } => keys::whoami(&key),
        Command::Init { out } => init(&out),
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

/// Writes the example configuration, refusing to replace an existing file.
fn init(out: &std::path::Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        !out.exists(),
        "{} already exists; refusing to overwrite it",
        out.display()
    );
    std::fs::write(out, medmesh_node::config::EXAMPLE)
        .map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    println!(
        "wrote {}; edit the paths, listen address and bootnodes",
        out.display()
    );
    Ok(())
}

/// Logs go to standard error (stdout carries results), filtered by `RUST_LOG` (default `info`).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
