//! The commands that talk to the network: `run`, `experiment submit|status`, `export`.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use libp2p::Multiaddr;
use medmesh_protocol::{Manifest, SignedManifest, SignedProgress};

use super::read_text;
use crate::cli::Connect;
use crate::client::Client;
use crate::config::NodeConfig;
use crate::keystore;

/// A multi-threaded runtime for one command.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `medmesh run`.
pub fn run(config: NodeConfig) -> Result<()> {
    runtime()?.block_on(crate::service::run(config))
}

/// Connects as a researcher (or node) per `c`.
pub async fn connect(c: &Connect) -> Result<Client> {
    let identity = keystore::load_identity(&c.key)?;
    let network_key = keystore::load_network_key(&c.network_key)?;
    let roster = keystore::load_roster(&c.roster)?
        .into_genesis(None)
        .with_context(|| format!("roster {}", c.roster.display()))?;
    let addr: Multiaddr = c
        .node
        .parse()
        .with_context(|| format!("--node {:?} is not a multiaddress", c.node))?;
    Client::connect(&identity, &network_key, roster.roster().clone(), addr).await
}

/// `medmesh experiment submit`.
pub fn submit(c: &Connect, manifest: Option<&Path>, signed: Option<&Path>) -> Result<()> {
    let signed = match (manifest, signed) {
        (Some(path), _) => {
            let m = Manifest::parse(&read_text(path)?)
                .with_context(|| format!("{} is not a valid manifest", path.display()))?;
            SignedManifest::sign(m, &keystore::load_identity(&c.key)?)
        }
        (None, Some(path)) => toml::from_str(&read_text(path)?)
            .with_context(|| format!("{} is not a signed manifest", path.display()))?,
        (None, None) => anyhow::bail!("give --manifest or --signed"),
    };
    let id = signed.manifest.id.clone();
    let digest = hex::encode(signed.manifest.digest());
    runtime()?.block_on(async {
        let client = connect(c).await?;
        client.submit(signed).await?;
        println!(
            "experiment {id} (manifest {digest}) accepted by {}; it spreads to the other members",
            client.peer()
        );
        Ok(())
    })
}

/// `medmesh experiment status`.
pub fn status(c: &Connect, experiment: Option<&str>, json: bool) -> Result<()> {
    runtime()?.block_on(async {
        let client = connect(c).await?;
        let records = client.status(experiment).await?;
        if json {
            let rows: Vec<serde_json::Value> =
                records.iter().map(|p| progress_json(&client, p)).collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            print!("{}", status_table(&client, &records));
        }
        Ok(())
    })
}

fn progress_json(client: &Client, p: &SignedProgress) -> serde_json::Value {
    let r = &p.record;
    serde_json::json!({
        "experiment": r.experiment_id,
        "site": client.site(&r.node),
        "peer_id": r.node.peer_id().to_string(),
        "round": r.round,
        "loss": if r.loss.is_finite() { Some(r.loss) } else { None },
        "metric": r.metric,
        "contribution_weight": r.contribution_weight,
        "peers_averaged": r.peers_averaged,
        "finished": r.finished,
        "stop_after": r.stop_after,
        "privacy_epsilon": r.privacy_epsilon,
        "device": r.device,
        "bytes_sent": r.bytes_sent,
        "bytes_received": r.bytes_received,
        "averaging_shift": r.averaging_shift,
        "failure": r.failure,
        "unix_ms": r.unix_ms,
    })
}

/// The status table: one line per site.
pub fn status_table(client: &Client, records: &[SignedProgress]) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    // The privacy column, where a site reports what its releases spent.
    let private = records.iter().any(|p| p.record.privacy_epsilon.is_some());
    let epsilon = |e: Option<f64>| match (private, e) {
        (false, _) => String::new(),
        (true, Some(e)) => format!(" {e:>7.3}"),
        (true, None) => format!(" {:>7}", "-"),
    };
    let mut out = format!(
        "{:<24} {:<18} {:>5} {:>8} {:>6} {:>6}{}  {}\n",
        "experiment",
        "site",
        "round",
        "loss",
        "metric",
        "peers",
        if private {
            format!(" {:>7}", "epsilon")
        } else {
            String::new()
        },
        "last seen"
    );
    for p in records {
        let r = &p.record;
        let loss = if r.loss.is_finite() {
            format!("{:.4}", r.loss)
        } else {
            "-".into()
        };
        let seen = now.saturating_sub(r.unix_ms) / 1000;
        let state = match &r.failure {
            Some(why) => format!(" (failed: {why})"),
            None if r.finished => " (finished)".into(),
            None => String::new(),
        };
        out.push_str(&format!(
            "{:<24} {:<18} {:>5} {:>8} {:>6.3} {:>6}{}  {seen} s ago{state}\n",
            r.experiment_id,
            client.site(&r.node),
            r.round,
            loss,
            r.metric,
            r.peers_averaged,
            epsilon(r.privacy_epsilon),
        ));
    }
    if records.is_empty() {
        out.push_str("(no progress reported yet)\n");
    }
    out
}

/// `medmesh export`.
pub fn export(c: &Connect, experiment: &str, out: &Path) -> Result<()> {
    runtime()?.block_on(async {
        let client = connect(c).await?;
        let (model, provenance) = client.export(experiment).await?;
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let model_path = out.join("model.safetensors");
        keystore::write_atomic(&model_path, &model, 0o644)?;
        keystore::write_atomic(
            &out.join("provenance.json"),
            &serde_json::to_vec_pretty(&provenance)?,
            0o644,
        )?;
        let p = &provenance.provenance;
        println!(
            "wrote {} ({} bytes): {} rounds, {} contributing sites, final Dice {:.3}, provenance signed by {}",
            model_path.display(),
            model.len(),
            p.rounds_completed,
            p.contributors.len(),
            p.final_metric,
            p.node
        );
        if let Some(dp) = p.privacy {
            println!(
                "the exporting site's {} privacy releases spent epsilon {:.3} at delta {:e} (noise multiplier {}, clip norm {})",
                dp.releases, dp.epsilon, dp.delta, dp.noise_multiplier, dp.clip_norm
            );
        }
        Ok(())
    })
}
