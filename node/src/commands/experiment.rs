//! `medmesh experiment check|plan|sign|verify`: the researcher's side of manifests.

use std::path::Path;

use anyhow::{Context, Result};
use medmesh_protocol::fingerprint::{self, SignedFingerprint};
use medmesh_protocol::{Manifest, SignedManifest};

use super::read_text;
use crate::keystore;

/// Validates a manifest and prints a summary with its digest.
pub fn check(path: &Path) -> Result<()> {
    let manifest = load_manifest(path)?;
    print_summary(&manifest);
    Ok(())
}

/// Verifies the sites' fingerprints against the roster, derives the plan, prints it with its
/// reasons, and writes the planned manifest to `out` when given.
pub fn plan(
    manifest: &Path,
    roster: &Path,
    fingerprints: &[std::path::PathBuf],
    out: Option<&Path>,
    force: bool,
) -> Result<()> {
    if let Some(out) = out {
        anyhow::ensure!(
            force || !out.exists(),
            "{} already exists; refusing to overwrite it (pass --force to replace it)",
            out.display()
        );
    }
    let mut m = load_manifest(manifest)?;
    let roster = keystore::load_roster(roster)?
        .into_genesis(None)
        .with_context(|| format!("roster {} is not trusted", roster.display()))?;
    let roster = roster.roster();
    let signed: Vec<SignedFingerprint> = fingerprints
        .iter()
        .map(|p| {
            serde_json::from_str(&read_text(p)?)
                .with_context(|| format!("{} is not a signed fingerprint", p.display()))
        })
        .collect::<Result<_>>()?;
    let mut verified = Vec::with_capacity(signed.len());
    for (s, path) in signed.iter().zip(fingerprints) {
        let f = s
            .verify(roster)
            .with_context(|| format!("{} does not verify", path.display()))?;
        verified.push(f);
    }
    let plan = fingerprint::plan(&m, &verified)?;
    println!(
        "plan for experiment {} from {} sites, {} cases:",
        m.id, plan.sites, plan.cases
    );
    println!(
        "  {:<16} {:>6} {:<10} {:>22} {:>12} {:>12}",
        "site", "cases", "modality", "median spacing (mm)", "fg mean", "fg std"
    );
    for f in &verified {
        let site = roster
            .member(&f.node)
            .map_or_else(|| f.node.to_string(), |m| m.site.clone());
        let median = |a: usize| {
            fingerprint::percentile(
                &f.cases.iter().map(|c| c.spacing[a]).collect::<Vec<_>>(),
                50.0,
            )
        };
        println!(
            "  {:<16} {:>6} {:<10} {:>22} {:>12.4} {:>12.4}",
            site,
            f.cases.len(),
            f.modalities.first().map_or("", String::as_str),
            format!("{:.2} x {:.2} x {:.2}", median(0), median(1), median(2)),
            f.foreground[0].mean,
            f.foreground[0].std
        );
    }
    for reason in &plan.reasons {
        println!("  {reason}");
    }
    plan.apply(&mut m);
    m.validate()
        .context("the planned manifest does not validate")?;
    #[derive(serde::Serialize)]
    struct TaskOnly<'a> {
        task: &'a medmesh_protocol::manifest::Task,
    }
    let task =
        toml::to_string(&TaskOnly { task: &m.task }).context("rendering the planned task")?;
    println!("planned:\n{}", task.trim_end());
    if let Some(out) = out {
        let text = toml::to_string(&m).context("rendering the planned manifest")?;
        keystore::write_atomic(out, text.as_bytes(), 0o644)?;
        println!(
            "wrote {} (digest {})",
            out.display(),
            hex::encode(m.digest())
        );
    }
    Ok(())
}

/// Signs a manifest with a researcher key and writes the signed manifest as TOML, refusing
/// to replace an existing file without `force`.
pub fn sign(manifest: &Path, key: &Path, out: &Path, force: bool) -> Result<()> {
    anyhow::ensure!(
        force || !out.exists(),
        "{} already exists; refusing to overwrite it (pass --force to replace it)",
        out.display()
    );
    let manifest = load_manifest(manifest)?;
    let researcher = keystore::load_identity(key)?;
    let signed = SignedManifest::sign(manifest, &researcher);
    let text = toml::to_string(&signed).context("rendering the signed manifest")?;
    keystore::write_atomic(out, text.as_bytes(), 0o644)?;
    println!(
        "wrote {} signed by {}",
        out.display(),
        researcher.public_key()
    );
    print_summary(&signed.manifest);
    Ok(())
}

/// Verifies a signed manifest against a trusted roster, as a node would.
pub fn verify(signed: &Path, roster: &Path) -> Result<()> {
    let signed: SignedManifest = toml::from_str(&read_text(signed)?)
        .with_context(|| format!("{} is not a signed manifest", signed.display()))?;
    let roster = keystore::load_roster(roster)?
        .into_genesis(None)
        .with_context(|| format!("roster {} is not trusted", roster.display()))?;
    let manifest = signed.verify(roster.roster())?;
    println!("valid: signed by researcher {}", signed.signer);
    print_summary(manifest);
    Ok(())
}

fn load_manifest(path: &Path) -> Result<Manifest> {
    Manifest::parse(&read_text(path)?)
        .with_context(|| format!("{} is not a valid manifest", path.display()))
}

fn print_summary(m: &Manifest) {
    println!(
        "experiment {} ({:?}) in consortium {}",
        m.id, m.title, m.consortium
    );
    let input = match m.task.input_depth {
        Some(d) => format!(
            "{d}x{}x{} patches",
            m.task.input_size[0], m.task.input_size[1]
        ),
        None => format!("{}x{} slices", m.task.input_size[0], m.task.input_size[1]),
    };
    println!(
        "  task {} {} channel(s), {input} -> {} classes; {}D UNet depth {} base {}",
        m.task.dataset,
        m.task.channels,
        m.task.classes,
        m.model.dims,
        m.model.depth,
        m.model.base_channels
    );
    println!(
        "  {:?} for {} rounds, aggregation {:?}, encoding {:?}",
        m.averaging.scheme, m.averaging.rounds, m.averaging.aggregation, m.averaging.encoding
    );
    let mut methods = Vec::new();
    if m.averaging.keep_normalization_local {
        methods.push("FedBN (normalization layers stay at each site)".to_owned());
    }
    if let Some(mu) = m.training.proximal_mu {
        methods.push(format!("FedProx (mu {mu})"));
    }
    if let Some(k) = m.training.swa_rounds {
        methods.push(format!(
            "SWA (each site's models averaged over the last {k} rounds)"
        ));
    }
    if let Some(steps) = m.training.personalize_steps {
        methods.push(format!("personalization ({steps} local fine-tuning steps)"));
    }
    if !methods.is_empty() {
        println!("  non-IID methods: {}", methods.join(", "));
    }
    if let Some(a) = &m.training.augmentation {
        let mut transforms = Vec::new();
        if let Some(d) = a.rotate_degrees {
            transforms.push(format!("rotation ±{d}°"));
        }
        if a.elastic.is_some() {
            transforms.push("elastic".to_owned());
        }
        for (name, range) in [
            ("scale", a.scale),
            ("gamma", a.gamma),
            ("brightness", a.brightness),
            ("shift", a.shift),
            ("blur", a.blur),
        ] {
            if let Some([lo, hi]) = range {
                transforms.push(format!("{name} {lo}-{hi}"));
            }
        }
        if let Some(n) = a.noise {
            transforms.push(format!("noise up to {n}"));
        }
        println!(
            "  augmentation, each with probability {}: {}",
            a.probability,
            transforms.join(", ")
        );
    }
    if let Some(b) = medmesh_protocol::accounting::Budget::for_manifest(m) {
        let rounds = u64::from(m.averaging.rounds);
        println!(
            "  differential privacy: clip norm {}, noise multiplier {}; {rounds} rounds spend epsilon {:.3} at delta {:e} per site{}",
            m.privacy.clip_norm.unwrap_or_default(),
            b.noise_multiplier,
            b.spent(rounds),
            b.delta,
            b.target_epsilon
                .map(|t| format!(" (target {t})"))
                .unwrap_or_default()
        );
    }
    println!("  digest {}", hex::encode(m.digest()));
}
