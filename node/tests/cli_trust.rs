//! The trust set-up a consortium does by hand, through the real `medmesh` binary: keys,
//! network key, roster, endorsement, manifest signing and verification, and the experiment
//! plan from the sites' signed dataset fingerprints.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use medmesh_protocol::rng::Rng;
use medmesh_training::data::msd;
use medmesh_training::data::{Case, LabelVolume, Volume};

struct Consortium {
    dir: tempfile::TempDir,
}

impl Consortium {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn medmesh(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_medmesh"))
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.medmesh(args);
        assert!(
            out.status.success(),
            "medmesh {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.medmesh(args);
        assert!(
            !out.status.success(),
            "medmesh {args:?} unexpectedly succeeded"
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// Signs the quickstart manifest with `key` into `out`.
    fn sign(&self, key: &str, out: &str) {
        let manifest = manifest();
        self.ok(&[
            "experiment",
            "sign",
            "--manifest",
            &manifest,
            "--key",
            key,
            "--out",
            out,
        ]);
    }

    /// Steward, two nodes, a researcher, an endorsed roster.
    fn set_up(&self) {
        for k in ["steward", "node-a", "node-b", "researcher"] {
            self.ok(&["keygen", "--out", &format!("{k}.key")]);
        }
        self.ok(&["network-key", "--out", "swarm.key"]);
        self.ok(&[
            "roster",
            "create",
            "--consortium",
            "demo",
            "--steward",
            "steward.key",
            "--out",
            "roster.toml",
        ]);
        self.ok(&[
            "roster",
            "add",
            "--roster",
            "roster.toml",
            "--member",
            "node-a.key",
            "--role",
            "node",
            "--site",
            "clinic-a",
        ]);
        self.ok(&[
            "roster",
            "add",
            "--roster",
            "roster.toml",
            "--member",
            "node-b.key",
            "--role",
            "node",
            "--site",
            "clinic-b",
        ]);
        self.ok(&[
            "roster",
            "add",
            "--roster",
            "roster.toml",
            "--member",
            "researcher.key",
            "--role",
            "researcher",
            "--site",
            "lab",
        ]);
        self.ok(&[
            "roster",
            "endorse",
            "--roster",
            "roster.toml",
            "--key",
            "steward.key",
        ]);
    }
}

fn manifest() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/synthetic-quickstart.toml")
        .display()
        .to_string()
}

#[test]
fn keys_are_private_and_not_overwritten() {
    let c = Consortium::new();
    let out = c.ok(&["keygen", "--out", "n.key"]);
    assert!(out.contains("12D3KooW"), "{out}");
    let err = c.fails(&["keygen", "--out", "n.key"]);
    assert!(err.contains("already exists"), "{err}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let p = c.path("n.key");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o604)).unwrap();
        let err = c.fails(&["whoami", "--key", "n.key"]);
        assert!(err.contains("too open"), "{err}");
    }
}

#[test]
fn roster_needs_endorsement_then_verifies_manifests() {
    let c = Consortium::new();
    c.set_up();
    let shown = c.ok(&["roster", "show", "--roster", "roster.toml"]);
    assert!(
        shown.contains("status: valid") && shown.contains("clinic-b"),
        "{shown}"
    );

    c.sign("researcher.key", "signed.toml");
    let verified = c.ok(&[
        "experiment",
        "verify",
        "--signed",
        "signed.toml",
        "--roster",
        "roster.toml",
    ]);
    assert!(
        verified.contains("valid: signed by researcher"),
        "{verified}"
    );

    c.sign("node-a.key", "by-node.toml");
    let err = c.fails(&[
        "experiment",
        "verify",
        "--signed",
        "by-node.toml",
        "--roster",
        "roster.toml",
    ]);
    assert!(
        err.contains("is a node, but a researcher is required"),
        "{err}"
    );

    let tampered = std::fs::read_to_string(c.path("signed.toml"))
        .unwrap()
        .replace("rounds = 10", "rounds = 11");
    std::fs::write(c.path("tampered.toml"), tampered).unwrap();
    let err = c.fails(&[
        "experiment",
        "verify",
        "--signed",
        "tampered.toml",
        "--roster",
        "roster.toml",
    ]);
    assert!(err.contains("tampered or forged"), "{err}");
}

#[test]
fn editing_an_endorsed_roster_starts_a_new_version() {
    let c = Consortium::new();
    c.set_up();
    std::fs::copy(c.path("roster.toml"), c.path("roster-v1.toml")).unwrap();
    let out = c.ok(&[
        "roster",
        "revoke",
        "--roster",
        "roster.toml",
        "--member",
        "researcher.key",
        "--reason",
        "left",
    ]);
    assert!(
        out.contains("v2") && out.contains("collect endorsements"),
        "{out}"
    );
    let err = c.fails(&[
        "roster",
        "show",
        "--roster",
        "roster.toml",
        "--previous",
        "roster-v1.toml",
    ]);
    assert!(err.contains("0 valid steward endorsement"), "{err}");
    c.ok(&[
        "roster",
        "endorse",
        "--roster",
        "roster.toml",
        "--key",
        "steward.key",
    ]);
    let out = c.ok(&[
        "roster",
        "show",
        "--roster",
        "roster.toml",
        "--previous",
        "roster-v1.toml",
    ]);
    assert!(out.contains("valid successor"), "{out}");

    c.sign("researcher.key", "signed.toml");
    let err = c.fails(&[
        "experiment",
        "verify",
        "--signed",
        "signed.toml",
        "--roster",
        "roster.toml",
    ]);
    assert!(err.contains("was revoked: left"), "{err}");
}

#[test]
fn invalid_manifests_list_every_field() {
    let c = Consortium::new();
    let text = std::fs::read_to_string(manifest())
        .unwrap()
        .replace("depth = 3", "depth = 7")
        .replace("learning_rate = 0.003", "learning_rate = -1.0");
    std::fs::write(c.path("bad.toml"), text).unwrap();
    let err = c.fails(&["experiment", "check", "--manifest", "bad.toml"]);
    assert!(
        err.contains("model.depth") && err.contains("training.learning_rate"),
        "{err}"
    );
    assert!(err.contains("bad.toml"), "names the file: {err}");
}

#[test]
fn init_writes_a_config_once() {
    let c = Consortium::new();
    let out = c.ok(&["init", "--out", "node.toml"]);
    assert!(out.contains("wrote node.toml"), "{out}");
    let text = std::fs::read_to_string(c.path("node.toml")).unwrap();
    assert!(text.contains("[network]") && text.contains("MEDMESH_"));
    let err = c.fails(&["init", "--out", "node.toml"]);
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    std::fs::write(c.path("node.toml"), "edited").unwrap();
    c.ok(&["init", "--out", "node.toml", "--force"]);
    let text = std::fs::read_to_string(c.path("node.toml")).unwrap();
    assert!(text.contains("[network]"), "{text}");
}

#[test]
fn signing_does_not_overwrite_a_file_without_force() {
    let c = Consortium::new();
    c.set_up();
    c.sign("researcher.key", "signed.toml");
    let manifest = manifest();
    let args = [
        "experiment",
        "sign",
        "--manifest",
        &manifest,
        "--key",
        "researcher.key",
        "--out",
        "signed.toml",
    ];
    let err = c.fails(&args);
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    let mut forced = args.to_vec();
    forced.push("--force");
    c.ok(&forced);
}

/// Two CT sites, with different spacings, grids and intensity ranges: a body of air (-1000)
/// around a box of tissue labelled 1, whose intensities are `mean + std * N(0, 1)`.
fn ct_cases(spacing: [f64; 3], dims: [usize; 3], mean: f64, std: f64, seed: u64) -> Vec<Case> {
    let mut rng = Rng::new(seed);
    (0..3)
        .map(|k| {
            let voxels = dims.iter().product::<usize>();
            let (mut image, mut label) = (vec![-1000.0f32; voxels], vec![0u8; voxels]);
            for z in dims[2] / 4..dims[2] * 3 / 4 {
                for y in dims[1] / 4..dims[1] * 3 / 4 {
                    for x in dims[0] / 3..dims[0] * 2 / 3 {
                        let i = x + dims[0] * (y + dims[1] * z);
                        image[i] = (mean + std * rng.normal()) as f32;
                        label[i] = 1;
                    }
                }
            }
            Case {
                name: format!("patient-{seed}-{k}"),
                image: Volume {
                    dims,
                    spacing,
                    channels: 1,
                    data: image,
                },
                label: LabelVolume { dims, data: label },
            }
        })
        .collect()
}

fn exact_percentile(sorted: &[f64], pct: f64) -> f64 {
    let pos = pct / 100.0 * (sorted.len() - 1) as f64;
    let (i, frac) = (pos.floor() as usize, pos.fract());
    sorted[i] + (sorted[(i + 1).min(sorted.len() - 1)] - sorted[i]) * frac
}

/// Sites fingerprint their datasets and sign them; the researcher plans from the signed
/// records alone. The plan is checked against values computed here from the raw voxels of
/// both sites, which the plan never saw; then the planned manifest trains.
#[test]
fn experiment_plan_comes_from_signed_fingerprints_not_images() {
    let c = Consortium::new();
    c.set_up();
    let sites = [
        ("a", [0.8, 0.8, 2.5], [120, 110, 20], 40.0, 30.0),
        ("b", [1.0, 1.0, 2.0], [96, 100, 24], 60.0, 50.0),
    ];
    let mut foreground = Vec::new();
    for (site, spacing, dims, mean, std) in sites {
        let cases = ct_cases(spacing, dims, mean, std, u64::from(site.as_bytes()[0]));
        for case in &cases {
            foreground.extend(
                case.image
                    .data
                    .iter()
                    .zip(&case.label.data)
                    .filter(|(_, l)| **l > 0)
                    .map(|(v, _)| f64::from(*v)),
            );
        }
        let dir = c.path(&format!("site-{site}"));
        msd::write_dataset_of(&dir, "ct", "test", "CT", &["background", "organ"], &cases).unwrap();
        let config = format!(
            "[node]\nidentity = \"node-{site}.key\"\nnetwork_key = \"swarm.key\"\n\
             roster = \"roster.toml\"\nstate_dir = \"state-{site}\"\n\
             [network]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\n\
             [datasets.ct]\npath = \"site-{site}\"\n"
        );
        std::fs::write(c.path(&format!("node-{site}.toml")), config).unwrap();
        let out = c.ok(&[
            "data",
            "fingerprint",
            "--config",
            &format!("node-{site}.toml"),
            "--dataset",
            "ct",
            "--out",
            &format!("fp-{site}.json"),
        ]);
        assert!(out.contains("3 cases; modality CT"), "{out}");
        let text = std::fs::read_to_string(c.path(&format!("fp-{site}.json"))).unwrap();
        assert!(
            !text.contains("patient-"),
            "case names stay at the site: {text}"
        );
    }
    let err = c.fails(&[
        "data",
        "fingerprint",
        "--config",
        "node-a.toml",
        "--dataset",
        "ct",
        "--out",
        "fp-a.json",
    ]);
    assert!(err.contains("--force"), "{err}");
    let err = c.fails(&[
        "data",
        "fingerprint",
        "--config",
        "node-a.toml",
        "--dataset",
        "mri",
        "--out",
        "x.json",
    ]);
    assert!(
        err.contains("[datasets.mri]") && err.contains("ct"),
        "{err}"
    );

    // A short run of the quickstart manifest, on dataset "ct".
    let base = std::fs::read_to_string(manifest())
        .unwrap()
        .replace("dataset = \"synthetic\"", "dataset = \"ct\"")
        .replace("rounds = 10", "rounds = 1")
        .replace("local_epochs = 1", "local_steps = 2");
    std::fs::write(c.path("draft.toml"), base).unwrap();
    let plan = [
        "experiment",
        "plan",
        "--manifest",
        "draft.toml",
        "--roster",
        "roster.toml",
        "--fingerprints",
        "fp-a.json",
        "fp-b.json",
        "--out",
        "planned.toml",
    ];
    let out = c.ok(&plan);
    println!("{out}");
    assert!(out.contains("from 2 sites, 6 cases"), "{out}");
    assert!(
        out.contains("clinic-a") && out.contains("clinic-b"),
        "{out}"
    );
    let planned = medmesh_protocol::Manifest::parse(
        &std::fs::read_to_string(c.path("planned.toml")).unwrap(),
    )
    .unwrap();
    // Spacings 0.8, 0.8, 0.8, 1, 1, 1 and 2.5, 2.5, 2.5, 2, 2, 2: medians 0.9 and 2.25 (not
    // anisotropic: 2.25 < 3 x 0.9).
    let spacing = planned.task.target_spacing.unwrap();
    assert_eq!(spacing, [0.9, 0.9, 2.25], "rounded to 0.1 µm");
    // Axial rows (y) at 0.9 mm: 110 x 0.8 / 0.9 = 97.8 (site a) and 100 / 0.9 = 111.1 (b),
    // median 104.4 -> 104; columns (x): 106.7 at both -> 108 (multiples of 4 for depth 3).
    assert_eq!(planned.task.input_size, [104, 108]);
    let (clip, mean, std) = planned.task.intensity.ct().expect("every site is CT");
    foreground.sort_by(f64::total_cmp);
    let n = foreground.len() as f64;
    let exact_mean = foreground.iter().sum::<f64>() / n;
    let exact_std = (foreground
        .iter()
        .map(|v| (v - exact_mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    assert!((mean - exact_mean).abs() <= 1e-3, "{mean} vs {exact_mean}");
    assert!((std - exact_std).abs() <= 1e-3, "{std} vs {exact_std}");
    for (got, pct) in clip.iter().zip([0.5, 99.5]) {
        let want = exact_percentile(&foreground, pct);
        println!("pooled {pct}th percentile: planned {got}, from the voxels {want:.3}");
        assert!(
            (got - want).abs() < 0.05 * exact_std,
            "pooled {pct}th percentile {got} vs {want} from the voxels"
        );
    }
    c.ok(&["experiment", "check", "--manifest", "planned.toml"]);
    c.ok(&[
        "train-local",
        "--data",
        "site-b",
        "--manifest",
        "planned.toml",
        "--out",
        "model.safetensors",
    ]);

    // A fingerprint changed after signing is refused, naming the file.
    let tampered = std::fs::read_to_string(c.path("fp-b.json"))
        .unwrap()
        .replacen("\"voxels\": ", "\"voxels\": 1", 1);
    std::fs::write(c.path("fp-b.json"), tampered).unwrap();
    let err = c.fails(&plan[..plan.len() - 2]);
    assert!(err.contains("fp-b.json does not verify"), "{err}");
}
