//! The trust set-up a consortium does by hand, through the real `medmesh` binary: keys,
//! network key, roster, endorsement, and manifest signing and verification.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
