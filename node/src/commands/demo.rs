//! `medmesh demo`: a throwaway consortium on this machine. It creates the network key, one
//! identity per site plus a researcher, and a roster; writes each site's data (or takes
//! yours); starts N real `medmesh run` processes on 127.0.0.1 (only the first is anyone's
//! bootnode, the rest find each other through the DHT); submits the experiment as the
//! researcher; shows progress; computes the baselines beside it (local-only, pooled, and the
//! unseen site); and writes `report.json`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use medmesh_protocol::accounting::noise_multiplier_for;
use medmesh_protocol::manifest::{Aggregation, DEFAULT_DELTA, Scheme};
use medmesh_protocol::{Manifest, SignedManifest, SignedProgress};
use medmesh_training::DeviceSpec;
use medmesh_training::baselines::{self, Site};
use medmesh_training::params::Selection;
use serde::Serialize;

use super::data;
use crate::cli::TaskArg;
use crate::keystore;
use crate::local::{self, LocalConsortium, Nodes};
use crate::metrics::parse_value;

/// The seed the demo's node and researcher keys derive from.
const DEMO_KEY_SEED: u64 = 1;

/// Options of `medmesh demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// The built-in task, when --data is not given: synthetic lesions (sites skewed by
    /// scanner and lesion kind) or brain extraction (needs Debian's mricron-data).
    #[arg(long, value_enum, default_value_t = TaskArg::Synthetic)]
    pub task: TaskArg,
    /// How the generated sites differ: iid, feature-shift, label-skew, realistic, skewed.
    /// Default: skewed for the synthetic task, feature-shift for brain.
    #[arg(long, conflicts_with = "data")]
    pub preset: Option<String>,
    /// Your own data instead: one folder per site, DIR/site-1, DIR/site-2, ... (MSD layout
    /// or images/ + masks/ PNG pairs), to rehearse an experiment before sending it.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The experiment manifest (TOML or JSON). Default: the task's built-in demo manifest.
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Number of sites, 2 to 16. Default: 4, or every site folder in --data.
    #[arg(long, alias = "nodes")]
    pub sites: Option<usize>,
    /// Override the manifest's training rounds.
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Override the manifest's local work per round with this many steps (a quick rehearsal).
    #[arg(long)]
    pub local_steps: Option<u32>,
    /// Override the manifest's averaging scheme: pairwise-gossip, push-sum,
    /// metropolis-hastings, epidemic or group-average.
    #[arg(long)]
    pub scheme: Option<Scheme>,
    /// Train with differential privacy: the noise with which each site's releases over the
    /// run's rounds spend at most this epsilon (at the manifest's delta, default 1e-5).
    #[arg(long)]
    pub epsilon: Option<f64>,
    /// With --epsilon: the L2 bound on how far one release moves from the last (default:
    /// the manifest's privacy.clip_norm, else 1).
    #[arg(long, requires = "epsilon")]
    pub clip_norm: Option<f64>,
    /// The site the unseen-site baseline leaves out (1-based); 0 skips that baseline.
    #[arg(long, default_value_t = 1)]
    pub held_out: usize,
    /// Working directory (keys, data, node states, report.json).
    #[arg(long, default_value = "medmesh-demo")]
    pub out: PathBuf,
    /// First TCP port; node i listens on port + i and serves its dashboard on port + 100 + i.
    /// Below Linux's ephemeral range (32768-60999), where outgoing connections take theirs.
    #[arg(long, default_value_t = 17100)]
    pub port: u16,
    /// Keep the nodes (and their dashboards) running after the report, until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
}

/// Written into the working directory so a rerun may clear it.
const MARKER: &str = ".medmesh-demo";

/// One site's line of the report. Scores are the manifest's `evaluation.metric` on the
/// site's validation cases (named `dice_*`, as Dice is the default; see `Report::metric`).
#[derive(Debug, Clone, Serialize)]
pub struct NodeReport {
    /// libp2p peer id.
    pub peer_id: String,
    /// Site name on the roster.
    pub site: String,
    /// The initial model.
    pub dice_initial: f64,
    /// The consortium's model after the federated run.
    pub dice_final: f64,
    /// That model fine-tuned on the site's own data (the manifest's `personalize_steps`).
    pub dice_personalized: Option<f64>,
    /// The site trained alone with the same rounds and steps.
    pub dice_local_only: f64,
    /// One model trained on every site's training cases together, same total steps.
    pub dice_pooled: f64,
    /// For the held-out site only: the federation of the other sites, scored here.
    pub dice_unseen: Option<f64>,
    /// The epsilon the site's privacy releases spent (with privacy noise on).
    pub privacy_epsilon: Option<f64>,
    /// Rounds the node completed.
    pub rounds_completed: u32,
    /// Protocol bytes sent.
    pub bytes_sent: u64,
    /// Protocol bytes received.
    pub bytes_received: u64,
}

/// `report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The experiment.
    pub experiment: String,
    /// The metric every score is: "dice" or "iou".
    pub metric: String,
    /// Per site.
    pub nodes: Vec<NodeReport>,
    /// Means over sites of the federated, local-only and pooled scores.
    pub mean: Means,
    /// max_i ||w_i - mean w|| / ||mean w|| over the shared weights of the exported models.
    pub consensus_distance: f64,
    /// The delta of the sites' privacy guarantees (with privacy noise on).
    pub privacy_delta: Option<f64>,
    /// The experiment's manifest digest (hex).
    pub manifest_hash: String,
    /// Seconds from start to report.
    pub wall_seconds: f64,
}

/// Means over sites.
#[derive(Debug, Clone, Serialize)]
pub struct Means {
    /// Federated.
    pub federated: f64,
    /// Personalized, where the manifest asks for it.
    pub personalized: Option<f64>,
    /// Local-only.
    pub local_only: f64,
    /// Pooled.
    pub pooled: f64,
}

/// The built-in manifest of a task.
fn builtin_manifest(task: TaskArg) -> Result<Manifest> {
    Ok(Manifest::parse(match task {
        TaskArg::Synthetic => include_str!("../../../examples/synthetic-skewed.toml"),
        TaskArg::Brain => include_str!("../../../examples/brain-extraction.toml"),
    })?)
}

/// The manifest the demo runs: given or built in, with the command line's overrides.
fn demo_manifest(o: &DemoOptions) -> Result<Manifest> {
    let mut m = match &o.manifest {
        Some(path) => Manifest::parse(&super::read_text(path)?)
            .with_context(|| format!("manifest {}", path.display()))?,
        None => builtin_manifest(o.task)?,
    };
    if let Some(r) = o.rounds {
        m.averaging.rounds = r;
    }
    if let Some(steps) = o.local_steps {
        m.training.local_steps = Some(steps);
        m.training.local_epochs = None;
    }
    if let Some(s) = o.scheme {
        m.averaging.scheme = s;
        // Two peers a round where the scheme takes a fanout (epidemic needs one).
        m.averaging.fanout = s.takes_fanout().then(|| m.averaging.fanout.unwrap_or(2));
        if !s.takes_aggregation() {
            m.averaging.aggregation = Aggregation::Mean;
            m.averaging.trim_fraction = None;
        }
    }
    if let Some(target) = o.epsilon {
        let p = &mut m.privacy;
        let delta = p.delta.unwrap_or(DEFAULT_DELTA);
        let rounds = u64::from(m.averaging.rounds);
        let z = noise_multiplier_for(target, rounds, delta)
            .with_context(|| format!("--epsilon {target}: no noise gives that at delta {delta}"))?;
        p.clip_norm = Some(o.clip_norm.or(p.clip_norm).unwrap_or(1.0));
        p.noise_multiplier = Some(z);
        p.target_epsilon = Some(target);
    }
    m.validate()
        .context("the manifest with the command line's overrides")?;
    Ok(m)
}

/// Site folders `DIR/site-1 .. DIR/site-N` of `--data`: how many there are, in order.
fn count_sites(dir: &Path) -> Result<usize> {
    anyhow::ensure!(dir.is_dir(), "--data {} is not a directory", dir.display());
    let n = (1..)
        .take_while(|i| dir.join(format!("site-{i}")).is_dir())
        .count();
    anyhow::ensure!(
        n > 0,
        "--data {} has no site folders; expected {0}/site-1, {0}/site-2, ...",
        dir.display()
    );
    Ok(n)
}

/// Runs the demo.
pub fn run(o: &DemoOptions) -> Result<()> {
    let started = Instant::now();
    let manifest = demo_manifest(o)?;
    let available = o.data.as_deref().map(count_sites).transpose()?;
    let n = o.sites.or(available).unwrap_or(4);
    anyhow::ensure!((2..=16).contains(&n), "--sites must be 2 to 16");
    if let Some(found) = available {
        anyhow::ensure!(
            n <= found,
            "--sites {n}, but --data has only {found} site folders"
        );
    }
    anyhow::ensure!(
        (manifest.averaging.min_peers as usize) < n,
        "the manifest's averaging.min_peers = {} needs at least {} sites",
        manifest.averaging.min_peers,
        manifest.averaging.min_peers + 1
    );
    anyhow::ensure!(
        o.held_out <= n,
        "--held-out {} names no site (there are {n}); 0 skips the unseen-site baseline",
        o.held_out
    );
    prepare_dir(&o.out)?;

    println!(
        "1/5 creating consortium {:?}: {n} sites and a researcher in {}",
        manifest.consortium,
        o.out.display()
    );
    let data_root = o.data.clone().unwrap_or_else(|| o.out.join("data"));
    // Keys from a fixed seed: the same sites pair the same way every run, so a demo is
    // repeatable (its training and data are seeded too).
    let consortium = LocalConsortium::create_with(
        &o.out,
        n,
        o.port,
        &manifest.consortium,
        &manifest.task.dataset,
        &data_root,
        Some(DEMO_KEY_SEED),
    )?;

    if o.data.is_none() {
        let preset = o.preset.clone().unwrap_or_else(|| {
            match o.task {
                TaskArg::Synthetic => "skewed",
                TaskArg::Brain => "feature-shift",
            }
            .into()
        });
        println!(
            "2/5 generating {:?} data, preset {preset}: one scanner per site",
            o.task
        );
        let [h, w] = manifest.task.input_size;
        data::prepare(&data::PrepareArgs {
            task: o.task,
            sites: n,
            out: data_root.clone(),
            preset,
            seed: 1,
            cases: 10,
            size: h.max(w) as usize,
            // A 3D model's patches span `input_depth` slices.
            slices: manifest.task.input_depth.map_or(8, |d| d as usize),
        })?;
    } else {
        println!("2/5 using the site folders in {}", data_root.display());
    }
    let sites: Vec<Site> = (0..n)
        .map(|i| {
            let d = crate::site_data::load(&consortium.site_data(i), &manifest, None)?;
            Ok(Site {
                train: d.train,
                validation: d.validation,
            })
        })
        .collect::<Result<_>>()?;

    println!("3/5 starting {n} nodes on 127.0.0.1");
    let threads = (std::thread::available_parallelism().map_or(2, |p| p.get()) / n).max(1);
    let exe = std::env::current_exe().context("locating the medmesh binary")?;
    let mut children = Nodes(Vec::new());
    for i in 0..n {
        children.0.push(consortium.spawn_node(&exe, i, threads)?);
    }
    let metrics_addrs: Vec<String> = (0..n).map(|i| consortium.metrics_addr(i)).collect();
    let rt = super::network::runtime()?;
    local::wait_for_mesh(&rt, &metrics_addrs, &mut children, n)?;
    println!("    every node found the other {} through the DHT", n - 1);
    println!(
        "    dashboard: http://{}/ (each node serves its own: ports {} to {})",
        metrics_addrs[0],
        o.port + 100,
        o.port + 100 + n as u16 - 1
    );

    let id = manifest.id.clone();
    let digest = hex::encode(manifest.digest());
    let signed = SignedManifest::sign(manifest.clone(), &consortium.researcher);
    println!(
        "4/5 submitting experiment {id} as the researcher; training ({} rounds, {})",
        manifest.averaging.rounds,
        manifest.averaging.scheme.as_str()
    );
    let client = rt.block_on(consortium.researcher_client(0))?;
    rt.block_on(client.submit(signed))?;

    // The baselines train beside the federation, on the same slices, from the same start.
    let baseline = {
        let m = manifest.clone();
        let held_out = o.held_out.checked_sub(1);
        std::thread::spawn(move || compute_baselines(&m, &sites, held_out))
    };

    let deadline = Instant::now()
        + Duration::from_secs(
            u64::from(manifest.averaging.rounds) * u64::from(manifest.averaging.round_timeout_secs)
                + 300,
        );
    let mut shown = String::new();
    let records = loop {
        std::thread::sleep(Duration::from_secs(3));
        local::check_alive(&mut children)?;
        let records = rt.block_on(client.status(Some(&id)))?;
        let line: Vec<String> = records
            .iter()
            .map(|p| {
                format!(
                    "{} r{} {:.3}",
                    client.site(&p.record.node),
                    p.record.round,
                    p.record.metric
                )
            })
            .collect();
        let line = line.join(" | ");
        // One line per change: a poll that learns nothing new prints nothing.
        if line != shown {
            println!("    {line}");
            shown = line;
        }
        if records.len() == n && records.iter().all(|p| p.record.finished) {
            break records;
        }
        if Instant::now() > deadline {
            bail!(
                "the experiment did not finish in time; logs are in {}/nodes/*/node.log",
                o.out.display()
            );
        }
    };

    println!("5/5 fetching the models; baselines: local-only, pooled, unseen site");
    let mut models = Vec::new();
    let mut finished = Vec::new();
    for (i, s) in consortium.sites.iter().enumerate() {
        let c = rt.block_on(consortium.researcher_client(i))?;
        let (model, provenance) = rt.block_on(c.export(&id))?;
        let path = o.out.join(format!("models/site-{}.safetensors", i + 1));
        keystore::write_atomic(&path, &model, 0o644)?;
        models.push(path);
        let metrics = rt.block_on(local::scrape(&metrics_addrs[i]))?;
        let record: &SignedProgress = records
            .iter()
            .find(|p| p.record.node == s.public_key())
            .context("a site reported no progress")?;
        finished.push((
            record.record.clone(),
            provenance.provenance.rounds_completed as u32,
            parse_value(&metrics, "medmesh_bytes_sent_total").unwrap_or(0.0) as u64,
            parse_value(&metrics, "medmesh_bytes_received_total").unwrap_or(0.0) as u64,
        ));
    }
    let children = if o.keep_running {
        Some(children)
    } else {
        drop(children);
        None
    };
    let b = baseline
        .join()
        .map_err(|_| anyhow::anyhow!("the baselines panicked"))??;
    let nodes: Vec<NodeReport> = finished
        .into_iter()
        .enumerate()
        .map(|(i, (record, rounds, sent, received))| NodeReport {
            peer_id: consortium.sites[i].peer_id().to_string(),
            site: format!("site-{}", i + 1),
            dice_initial: b.initial[i],
            dice_final: f64::from(record.metric),
            dice_personalized: record.personalized_metric.map(f64::from),
            dice_local_only: b.local_only[i],
            dice_pooled: b.pooled[i],
            dice_unseen: b.unseen.filter(|(k, _)| *k == i).map(|(_, v)| v),
            privacy_epsilon: record.privacy_epsilon,
            rounds_completed: rounds,
            bytes_sent: sent,
            bytes_received: received,
        })
        .collect();
    let mean = |f: &dyn Fn(&NodeReport) -> f64| nodes.iter().map(f).sum::<f64>() / n as f64;
    let personalized: Option<Vec<f64>> = nodes.iter().map(|r| r.dice_personalized).collect();
    let report = Report {
        experiment: id,
        metric: manifest.evaluation.metric.as_str().into(),
        mean: Means {
            federated: mean(&|r| r.dice_final),
            personalized: personalized.map(|p| p.iter().sum::<f64>() / n as f64),
            local_only: mean(&|r| r.dice_local_only),
            pooled: mean(&|r| r.dice_pooled),
        },
        consensus_distance: local::consensus_distance(
            &models,
            Selection::for_manifest(manifest.averaging.keep_normalization_local),
        )?,
        nodes,
        privacy_delta: medmesh_protocol::accounting::Budget::for_manifest(&manifest)
            .map(|b| b.delta),
        manifest_hash: digest,
        wall_seconds: started.elapsed().as_secs_f64(),
    };
    let path = o.out.join("report.json");
    keystore::write_atomic(&path, &serde_json::to_vec_pretty(&report)?, 0o644)?;
    print!("{}", table(&report));
    println!("report: {}", path.display());
    if let Some(children) = children {
        keep_running(&rt, children, &metrics_addrs[0])?;
    }
    Ok(())
}

/// Waits for Ctrl-C (or SIGTERM) while the nodes run on, then stops them.
fn keep_running(rt: &tokio::runtime::Runtime, mut children: Nodes, dashboard: &str) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Listening before saying so: a Ctrl-C right after the line is caught, not fatal.
    let _runtime = rt.enter();
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    println!("the nodes keep running: look around at http://{dashboard}/ ; Ctrl-C stops them");
    rt.block_on(async {
        loop {
            tokio::select! {
                _ = interrupt.recv() => return Ok(()),
                _ = terminate.recv() => return Ok(()),
                () = tokio::time::sleep(Duration::from_secs(2)) => local::check_alive(&mut children)?,
            }
        }
    })
}

fn prepare_dir(out: &Path) -> Result<()> {
    if out.exists() {
        let empty = std::fs::read_dir(out)?.next().is_none();
        if !empty && !out.join(MARKER).exists() {
            bail!(
                "{} exists and is not a previous demo directory; choose another --out",
                out.display()
            );
        }
        std::fs::remove_dir_all(out).with_context(|| format!("clearing {}", out.display()))?;
    }
    std::fs::create_dir_all(out)?;
    std::fs::write(
        out.join(MARKER),
        "created by medmesh demo; removed by the next run\n",
    )?;
    Ok(())
}

/// The baselines of every site.
struct Baselines {
    initial: Vec<f64>,
    local_only: Vec<f64>,
    pooled: Vec<f64>,
    /// The held-out site and its unseen-site score.
    unseen: Option<(usize, f64)>,
}

fn compute_baselines(m: &Manifest, sites: &[Site], held_out: Option<usize>) -> Result<Baselines> {
    /// One baseline computation; the longest first keeps both workers busy to the end.
    #[derive(Clone, Copy)]
    enum Job {
        Pooled,
        Unseen(usize),
        Local(usize),
    }
    enum Done {
        Pooled(Vec<f64>),
        Unseen(usize, f64),
        Local(usize, (f64, f64)),
    }
    let device = "flex".parse::<DeviceSpec>()?.device()?;
    let n = sites.len();
    let mut jobs = vec![Job::Pooled];
    jobs.extend(held_out.map(Job::Unseen));
    jobs.extend((0..n).map(Job::Local));
    // Two workers pull jobs in order (each job is seeded, so who runs it changes nothing):
    // beside the nodes, then on both cores once the federation is done.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<Done> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let (jobs, next, device) = (&jobs, &next, &device);
                scope.spawn(move || {
                    let mut done = Vec::new();
                    while let Some(&job) =
                        jobs.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                    {
                        done.push(match job {
                            Job::Pooled => Done::Pooled(baselines::pooled(m, sites, device)),
                            Job::Unseen(k) => {
                                Done::Unseen(k, baselines::unseen(m, sites, k, device))
                            }
                            Job::Local(i) => {
                                Done::Local(i, baselines::local_only(m, &sites[i], device))
                            }
                        });
                    }
                    done
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut b = Baselines {
        initial: vec![f64::NAN; n],
        local_only: vec![f64::NAN; n],
        pooled: Vec::new(),
        unseen: None,
    };
    for r in results {
        match r {
            Done::Pooled(p) => b.pooled = p,
            Done::Unseen(k, v) => b.unseen = Some((k, v)),
            Done::Local(i, (initial, alone)) => {
                b.initial[i] = initial;
                b.local_only[i] = alone;
            }
        }
    }
    anyhow::ensure!(
        b.pooled.len() == n && b.local_only.iter().all(|v| v.is_finite()),
        "a baseline computation panicked"
    );
    Ok(b)
}

fn table(r: &Report) -> String {
    let personalized = r.mean.personalized.is_some();
    let mut out = format!(
        "\n{} on each site's validation cases\n{:<8} {:>7} {:>10} {}{:>11} {:>7} {:>7} {:>7} {:>10} {:>10}\n",
        r.metric,
        "site",
        "before",
        "federated",
        if personalized {
            format!("{:>13} ", "personalized")
        } else {
            String::new()
        },
        "local-only",
        "pooled",
        "unseen",
        "rounds",
        "sent",
        "received"
    );
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"));
    for n in &r.nodes {
        out.push_str(&format!(
            "{:<8} {:>7.3} {:>10.3} {}{:>11.3} {:>7.3} {:>7} {:>7} {:>7.1} MB {:>7.1} MB\n",
            n.site,
            n.dice_initial,
            n.dice_final,
            if personalized {
                format!("{:>13} ", opt(n.dice_personalized))
            } else {
                String::new()
            },
            n.dice_local_only,
            n.dice_pooled,
            opt(n.dice_unseen),
            n.rounds_completed,
            n.bytes_sent as f64 / 1e6,
            n.bytes_received as f64 / 1e6
        ));
    }
    out.push_str(&format!(
        "{:<8} {:>7} {:>10.3} {}{:>11.3} {:>7.3}\n",
        "mean",
        "",
        r.mean.federated,
        if personalized {
            format!("{:>13} ", opt(r.mean.personalized))
        } else {
            String::new()
        },
        r.mean.local_only,
        r.mean.pooled,
    ));
    let spent: Vec<String> = r
        .nodes
        .iter()
        .filter_map(|n| n.privacy_epsilon.map(|e| format!("{} {e:.3}", n.site)))
        .collect();
    if !spent.is_empty() {
        out.push_str(&format!(
            "differential privacy: epsilon spent by each site's releases (delta {:e}): {}\n",
            r.privacy_delta.unwrap_or(DEFAULT_DELTA),
            spent.join(", ")
        ));
    }
    out.push_str(&format!(
        "consensus distance {:.2e}, {:.0} s\n",
        r.consensus_distance, r.wall_seconds
    ));
    out
}
