//! Methods for sites that differ, in real `medmesh run` processes: FedBN (normalization layers
//! never leave a site, checked on the wire), FedProx (the proximal term in every node's local
//! training), personalization (each site fine-tunes the consensus model and reports both
//! scores) and SWA (each site averages its last rounds' models before the final reduce).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use medmesh_node::local::{self, LocalConsortium, Nodes};
use medmesh_protocol::SignedManifest;
use medmesh_protocol::manifest::Scheme;
use medmesh_training::params::{self, Selection};
use medmesh_training::{DeviceSpec, Trainer};

const BIN: &str = env!("CARGO_BIN_EXE_medmesh");

fn find(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()? {
        let path = entry.ok()?.path();
        if path.is_dir() {
            if let Some(found) = find(&path, name) {
                return Some(found);
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
    }
    None
}

#[test]
fn fedbn_fedprox_and_personalization_work_in_real_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let n = 2;
    let mut m = local::test_manifest(3, Scheme::PairwiseGossip).unwrap();
    m.id = "non-iid".into();
    m.task.input_size = [32, 32];
    m.training.batch_size = 4;
    m.averaging.round_timeout_secs = 30;
    m.averaging.keep_normalization_local = true;
    m.training.proximal_mu = Some(0.5);
    m.training.personalize_steps = Some(4);
    m.training.swa_rounds = Some(2);
    m.validate().unwrap();

    let c = LocalConsortium::create(dir.path(), n, 21300).unwrap();
    c.prepare_data(6, 32, 4).unwrap();
    let mut nodes = Nodes(Vec::new());
    for i in 0..n {
        nodes.0.push(c.spawn_node(Path::new(BIN), i, 1).unwrap());
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let metrics: Vec<String> = (0..n).map(|i| c.metrics_addr(i)).collect();
    local::wait_for_mesh(&rt, &metrics, &mut nodes, n).unwrap();
    let client = rt.block_on(c.researcher_client(0)).unwrap();
    rt.block_on(client.submit(SignedManifest::sign(m.clone(), &c.researcher)))
        .unwrap();
    let log =
        |i: usize| std::fs::read_to_string(c.node_dir(i).join("node.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(300);
    let records = loop {
        let records = rt.block_on(client.status(Some(&m.id))).unwrap();
        if records.len() == n && records.iter().all(|p| p.record.finished) {
            break records;
        }
        assert!(
            Instant::now() < deadline,
            "{records:?}\n{}\n{}",
            log(0),
            log(1)
        );
        std::thread::sleep(Duration::from_millis(200));
    };

    // FedBN, on the wire: what site 1 offers its peers (fetched here with site 2's key, as a
    // peer fetches it) is the layout without normalization layers, and nothing more.
    let device = "flex".parse::<DeviceSpec>().unwrap().device().unwrap();
    let model = Trainer::new(&m, device).model();
    let shared = params::layout(&model, Selection::WithoutNormalization);
    let all = params::layout(&model, Selection::All);
    assert!(shared.num_params() < all.num_params());
    assert!(shared.tensors.iter().all(|t| !t.name.contains("norm")));
    let (envelope, values) = rt.block_on(c.fetch_offered_update(&m, 0, 1, 2)).unwrap();
    assert_eq!(envelope.header.num_params, shared.num_params());
    assert_eq!(envelope.header.layout_digest, shared.digest());
    assert_eq!(envelope.header.payload_len, 4 * shared.num_params());
    assert_eq!(values.len() as u64, shared.num_params());
    // ... and the exported models agree on the shared weights but keep their own
    // normalization layers.
    let models: Vec<PathBuf> = (0..n)
        .map(|i| find(&c.node_dir(i), "model.safetensors").expect("an exported model"))
        .collect();
    assert!(local::consensus_distance(&models, Selection::WithoutNormalization).unwrap() < 1e-6);
    assert!(local::consensus_distance(&models, Selection::All).unwrap() > 1e-4);
    // Each node sliced its dataset through its slice cache and removed it when it finished.
    for i in 0..n {
        assert!(log(i).contains("slice cache"), "{}", log(i));
        assert!(
            find(&c.node_dir(i), "labels.u8").is_none(),
            "slice cache left behind"
        );
    }

    // SWA: each node folded its last two training rounds' models into the average it kept
    // beside its checkpoint (the shared weights: FedBN's selection), and took it before the
    // reduce, after which the models agree (above).
    for i in 0..n {
        let progress: serde_json::Value = serde_json::from_slice(
            &std::fs::read(find(&c.node_dir(i), "progress.json").unwrap()).unwrap(),
        )
        .unwrap();
        assert_eq!(progress["swa_count"], 2, "{progress}");
        assert_eq!(progress["swa_applied"], true, "{progress}");
        let mean = std::fs::read(find(&c.node_dir(i), "swa.f32").unwrap()).unwrap();
        assert_eq!(mean.len() as u64, 4 * shared.num_params());
    }

    // FedProx: every node trained with the proximal term.
    for i in 0..n {
        assert!(log(i).contains("FedProx"), "{}", log(i));
    }

    // Personalization: each site fine-tuned the consensus model, kept it, and reports both.
    for (i, p) in records.iter().enumerate() {
        let personalized = p.record.personalized_metric.expect("a personalized score");
        assert!((0.0..=1.0).contains(&personalized), "{personalized}");
        assert!((0.0..=1.0).contains(&p.record.metric));
        let path =
            find(&c.node_dir(i), "personalized.safetensors").expect("the personalized model");
        assert_ne!(
            std::fs::read(&path).unwrap(),
            std::fs::read(&models[i]).unwrap()
        );
    }
    drop(nodes);
}
