//! The `medmesh` binary. Errors reach the user here, with their full chain of causes.

use std::process::ExitCode;

use clap::Parser;
use medmesh_node::cli::{Cli, Command, DataCommand, ExperimentCommand, LogFormat};
use medmesh_node::commands::{data, demo, experiment, keys, network, roster, simulate, train};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `run` logs as its configuration says, unless JSON was asked for on the command line.
    let mut node_config = None;
    if let Command::Run { config } = &cli.command {
        let loaded = medmesh_node::config::NodeConfig::load(config, None)
            .and_then(|c| c.check_datasets(config).map(|()| c));
        match loaded {
            Ok(c) => node_config = Some(c),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let format = match (&node_config, cli.log_format) {
        (Some(c), LogFormat::Text) => c.log.format.into(),
        (_, f) => f,
    };
    // The demo prints its own progress; its nodes log to files.
    let quiet = matches!(cli.command, Command::Demo(_));
    init_logging(format, if quiet { "warn" } else { "info" });
    let result = match cli.command {
        Command::Data {
            command: DataCommand::Prepare(args),
        } => data::prepare(&args),
        Command::Data {
            command: DataCommand::Import(args),
        } => data::import(&args),
        Command::Data {
            command: DataCommand::Fingerprint(args),
        } => data::fingerprint(&args),
        Command::TrainLocal {
            data,
            manifest,
            out,
            device,
            checkpoint,
            cache,
            memory_mib,
        } => {
            let cache = cache.as_deref().map(|dir| medmesh_node::site_data::Cache {
                dir,
                memory_budget: memory_mib * 1024 * 1024,
            });
            train::train_local(
                &data,
                &manifest,
                &out,
                &device,
                checkpoint.as_deref(),
                cache,
            )
        }
        Command::Evaluate {
            model,
            data,
            manifest,
            device,
        } => train::evaluate(&model, &data, manifest.as_deref(), &device),
        Command::Keygen { out, force } => keys::keygen(&out, force),
        Command::Whoami { key } => keys::whoami(&key),
        Command::Init { out, force } => init(&out, force),
        Command::NetworkKey { out, force } => keys::network_key(&out, force),
        Command::Roster { command } => roster::run(command),
        Command::Experiment { command } => match command {
            ExperimentCommand::Check { manifest } => experiment::check(&manifest),
            ExperimentCommand::Plan {
                manifest,
                roster,
                fingerprints,
                out,
                force,
            } => experiment::plan(&manifest, &roster, &fingerprints, out.as_deref(), force),
            ExperimentCommand::Sign {
                manifest,
                key,
                out,
                force,
            } => experiment::sign(&manifest, &key, &out, force),
            ExperimentCommand::Verify { signed, roster } => experiment::verify(&signed, &roster),
            ExperimentCommand::Submit {
                connect,
                manifest,
                signed,
            } => network::submit(&connect, manifest.as_deref(), signed.as_deref()),
            ExperimentCommand::Status {
                connect,
                experiment,
                json,
            } => network::status(&connect, experiment.as_deref(), json),
        },
        Command::Run { .. } => match node_config {
            Some(config) => network::run(config),
            None => unreachable!("loaded above"),
        },
        Command::Export {
            connect,
            experiment,
            out,
        } => network::export(&connect, &experiment, &out),
        Command::Simulate(options) => simulate::run(&options),
        Command::Demo(options) => demo::run(&options),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes the example configuration, refusing to replace an existing file without `force`.
fn init(out: &std::path::Path, force: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        force || !out.exists(),
        "{} already exists; refusing to overwrite it (pass --force to replace it)",
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

/// Logs go to standard error (stdout carries results), filtered by `RUST_LOG` (default
/// `default_level`).
fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colour only on a terminal: a log file or journald gets plain text to grep.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
