//! The `medmesh` command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// medmesh: train one segmentation model across a consortium of clinics, without moving an
/// image and without a central server.
#[derive(Debug, Parser)]
#[command(name = "medmesh", version, about, long_about = None)]
pub struct Cli {
    /// Log format on standard error.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a node or researcher identity (an ed25519 key, saved with mode 0600).
    Keygen {
        /// Where to write the key file.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Write a commented example node configuration.
    Init {
        /// Where to write it.
        #[arg(long, default_value = "node.toml")]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Print the public key and peer id of an identity file.
    Whoami {
        /// The key file.
        #[arg(long)]
        key: PathBuf,
    },
    /// Generate the consortium's pre-shared network key (libp2p swarm.key format).
    NetworkKey {
        /// Where to write the key file.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Create, edit, endorse and inspect the consortium roster.
    Roster {
        /// The roster operation.
        #[command(subcommand)]
        command: RosterCommand,
    },
    /// Prepare datasets: synthetic multi-site data or the brain-extraction task.
    Data {
        /// The data operation.
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Train one site alone (the local-only baseline) and export the model as safetensors.
    TrainLocal {
        /// Dataset directory (MSD layout with dataset.json, or images/ + masks/ PNG pairs).
        #[arg(long)]
        data: PathBuf,
        /// Experiment manifest (TOML or JSON): model, training, rounds, validation split.
        #[arg(long)]
        manifest: PathBuf,
        /// Where to write the trained model.
        #[arg(long)]
        out: PathBuf,
        /// Compute device: auto (the first of cuda:0, a wgpu GPU and flex that this build has and
        /// that works here), flex (CPU), cpu, cuda:N, wgpu, wgpu:discrete, wgpu:integrated, wgpu:cpu.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Checkpoint file: resumed from if present, rewritten after every round.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Slice an MSD dataset one case at a time into this directory, so a dataset larger
        /// than memory trains (slices beyond --memory-mib are read from here per batch).
        #[arg(long)]
        cache: Option<PathBuf>,
        /// MiB of slices kept in memory with --cache.
        #[arg(long, default_value_t = 1024, requires = "cache")]
        memory_mib: u64,
    },
    /// Evaluate a model on a dataset; prints JSON with per-case Dice and the mean.
    Evaluate {
        /// The model (safetensors written by medmesh).
        #[arg(long)]
        model: PathBuf,
        /// Dataset directory.
        #[arg(long)]
        data: PathBuf,
        /// Manifest giving the input size (defaults to the size recorded in the model).
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Compute device (as for train-local).
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Check, sign, verify, submit and follow experiments.
    Experiment {
        /// The experiment operation.
        #[command(subcommand)]
        command: ExperimentCommand,
    },
    /// Run this clinic's node until interrupted.
    Run {
        /// The node configuration (see `medmesh init`).
        #[arg(long)]
        config: PathBuf,
    },
    /// Fetch a finished experiment's consensus model and signed provenance from a node.
    Export {
        /// Whom to ask, and as whom.
        #[command(flatten)]
        connect: Connect,
        /// The experiment id.
        #[arg(long)]
        experiment: String,
        /// Directory for model.safetensors and provenance.json.
        #[arg(long)]
        out: PathBuf,
    },
    /// Replay a consortium in virtual time and compare averaging schemes (see
    /// simulations/scenarios/); writes report.json, CSV series and PNG plots.
    Simulate(crate::commands::simulate::Options),
    /// A throwaway consortium on this machine: N real nodes on 127.0.0.1, synthetic sites,
    /// one experiment, and a report comparing federated and local-only training.
    Demo(crate::commands::demo::DemoOptions),
}

/// How a researcher's command reaches a node.
#[derive(Debug, Clone, clap::Args)]
pub struct Connect {
    /// The node's address, e.g. /ip4/10.1.2.3/tcp/4001 (optionally ending in /p2p/<peer id>).
    #[arg(long)]
    pub node: String,
    /// Your identity file (a researcher or node key on the roster).
    #[arg(long)]
    pub key: PathBuf,
    /// The consortium's network key.
    #[arg(long, default_value = "swarm.key")]
    pub network_key: PathBuf,
    /// The consortium roster (names the consortium; checks what nodes report).
    #[arg(long, default_value = "roster.toml")]
    pub roster: PathBuf,
}

/// Tasks `medmesh data prepare` can build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TaskArg {
    /// Synthetic lesion segmentation with per-site scanner and annotator effects.
    Synthetic,
    /// Brain extraction from the MNI ch2 template (Debian package mricron-data).
    Brain,
}

/// Dataset operations.
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Write one MSD-layout dataset per site: DIR/site-1, DIR/site-2, ...
    Prepare(crate::commands::data::PrepareArgs),
    /// Convert a folder of DICOM series (and a label NIfTI beside each) into a site dataset
    /// in the MSD layout: slices sorted along the normal, rescale slope and intercept
    /// applied, volumes in RAS with their spacing.
    Import(crate::commands::data::ImportArgs),
    /// Compute this site's dataset fingerprint (case sizes and spacings, foreground intensity
    /// statistics; no voxel, label or case name), signed by the node, for `experiment plan`.
    Fingerprint(crate::commands::data::FingerprintArgs),
}

/// Member roles, as accepted on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RoleArg {
    /// A clinic's node.
    Node,
    /// A researcher who signs manifests.
    Researcher,
}

/// Roster operations. Editing an endorsed roster starts the next version.
#[derive(Debug, Subcommand)]
pub enum RosterCommand {
    /// Start a new consortium roster (version 1, no members, no endorsements).
    Create {
        /// Consortium name (a-z, 0-9, '-').
        #[arg(long)]
        consortium: String,
        /// A steward's public key (hex) or key file; repeat for each steward.
        #[arg(long = "steward", required = true)]
        stewards: Vec<String>,
        /// Distinct steward endorsements needed for each roster version.
        #[arg(long, default_value_t = 1)]
        threshold: u32,
        /// Where to write the roster.
        #[arg(long)]
        out: PathBuf,
    },
    /// Add a member, or change a member's role or site.
    Add {
        /// The roster file (edited in place).
        #[arg(long)]
        roster: PathBuf,
        /// The member's public key (hex) or key file.
        #[arg(long)]
        member: String,
        /// The member's role.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// The member's site name.
        #[arg(long)]
        site: String,
    },
    /// Revoke a key for good.
    Revoke {
        /// The roster file (edited in place).
        #[arg(long)]
        roster: PathBuf,
        /// The public key (hex) or key file to revoke.
        #[arg(long)]
        member: String,
        /// Why, for the audit trail.
        #[arg(long)]
        reason: String,
    },
    /// Endorse the roster as a steward.
    Endorse {
        /// The roster file (edited in place).
        #[arg(long)]
        roster: PathBuf,
        /// The steward's identity file.
        #[arg(long)]
        key: PathBuf,
    },
    /// Verify a roster and print it. With --previous, verify it as an update of that roster.
    Show {
        /// The roster file.
        #[arg(long)]
        roster: PathBuf,
        /// The roster currently trusted; the shown one must be a valid successor.
        #[arg(long)]
        previous: Option<PathBuf>,
    },
}

/// Experiment manifest operations.
#[derive(Debug, Subcommand)]
pub enum ExperimentCommand {
    /// Validate a manifest (TOML or JSON) and print its digest; lists every invalid field.
    Check {
        /// The manifest file.
        #[arg(long)]
        manifest: PathBuf,
    },
    /// Derive target spacing, intensity normalization and input size from the sites' signed
    /// dataset fingerprints (`medmesh data fingerprint`), show the plan and why, and write the
    /// planned manifest with --out.
    Plan {
        /// The manifest (TOML or JSON) to plan.
        #[arg(long)]
        manifest: PathBuf,
        /// The roster the fingerprints' signers must be active nodes of.
        #[arg(long)]
        roster: PathBuf,
        /// One signed fingerprint per site.
        #[arg(long, required = true, num_args = 1..)]
        fingerprints: Vec<PathBuf>,
        /// Where to write the manifest with the plan applied (TOML).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace an existing --out file.
        #[arg(long)]
        force: bool,
    },
    /// Sign a manifest with a researcher key.
    Sign {
        /// The manifest file (TOML or JSON).
        #[arg(long)]
        manifest: PathBuf,
        /// The researcher's identity file.
        #[arg(long)]
        key: PathBuf,
        /// Where to write the signed manifest (TOML).
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Verify a signed manifest against a roster, as a node does before it starts training.
    Verify {
        /// The signed manifest file.
        #[arg(long)]
        signed: PathBuf,
        /// The roster file.
        #[arg(long)]
        roster: PathBuf,
    },
    /// Sign a manifest with your key (--connect's --key) and hand it to a node, which
    /// verifies it, spreads it to the other members and starts; or submit an already signed
    /// manifest with --signed.
    Submit {
        /// Whom to hand it to, and as whom.
        #[command(flatten)]
        connect: Connect,
        /// The manifest (TOML or JSON), signed here with --key.
        #[arg(long, conflicts_with = "signed", required_unless_present = "signed")]
        manifest: Option<PathBuf>,
        /// A manifest signed before (`medmesh experiment sign`).
        #[arg(long)]
        signed: Option<PathBuf>,
    },
    /// Show every site's progress (round, loss, Dice, last seen) as a node knows it.
    Status {
        /// Whom to ask, and as whom.
        #[command(flatten)]
        connect: Connect,
        /// One experiment (default: all).
        #[arg(long)]
        experiment: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}
