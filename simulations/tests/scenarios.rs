//! The shipped scenarios, end to end at reduced sizes, and the simulator's promises:
//! determinism and agreement with the spectral-gap prediction.

use std::path::Path;

use medmesh_sim::Scenario;

fn shipped(name: &str) -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("scenarios/{name}.toml"));
    Scenario::from_toml(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn every_shipped_scenario_parses() {
    for name in ["kaapana36", "scale", "churn30", "byzantine", "noniid"] {
        let s = shipped(name);
        assert_eq!(s.name, name);
    }
}

#[test]
fn a_shipped_learning_scenario_runs_end_to_end() {
    let mut s = shipped("churn30");
    s.nodes = 6;
    s.rounds = 3;
    s.churn.events[0].round = 2;
    s.churn.events[1].round = 3;
    s.learning.local_steps = 2;
    s.schemes.truncate(2);
    let dir = tempfile::tempdir().unwrap();
    let report = medmesh_sim::run_to_dir(&s, dir.path(), true, &mut |_, _| {}).unwrap();
    assert_eq!(report.variants.len(), 2);
    for v in &report.variants {
        assert_eq!(v.final_dice.len(), 6);
        let dice = v.final_mean_dice.unwrap();
        assert!((0.0..=1.0).contains(&dice));
        assert!(v.bytes_per_node > 0.0 && v.total_time_s > 0.0);
    }
    for file in [
        "report.json",
        "pairwise-gossip_feature-shift.csv",
        "metropolis-hastings_mean_feature-shift.csv",
        "churn30-consensus-rounds.png",
        "churn30-dice-time.png",
    ] {
        assert!(dir.path().join(file).exists(), "{file}");
    }
    let csv =
        std::fs::read_to_string(dir.path().join("pairwise-gossip_feature-shift.csv")).unwrap();
    // Round 2 is the one where 30% left: fewer sites online. After the three training
    // rounds, the final reduce (as the nodes run it: fold, two pair steps, unfold for six
    // sites) brings the sites online to one model.
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    let online: Vec<&str> = rows.iter().map(|r| r[6]).collect();
    assert_eq!(online, ["6", "4", "5", "5", "5", "5", "5"], "{csv}");
    let last_error: f64 = rows.last().unwrap()[2].parse().unwrap();
    assert_eq!(last_error, 0.0, "{csv}");

    // SWA (`learning.swa_rounds`): each site takes the mean of its last two training rounds'
    // models into the reduce, as nodes do: the reduce starts from other models (its
    // consensus errors differ), and still ends with one model for all.
    s.learning.swa_rounds = Some(2);
    let swa_dir = tempfile::tempdir().unwrap();
    medmesh_sim::run_to_dir(&s, swa_dir.path(), true, &mut |_, _| {}).unwrap();
    let swa_csv =
        std::fs::read_to_string(swa_dir.path().join("pairwise-gossip_feature-shift.csv")).unwrap();
    let errors = |csv: &str| -> Vec<f64> {
        csv.lines()
            .skip(1)
            .map(|l| l.split(',').nth(2).unwrap().parse().unwrap())
            .collect()
    };
    let (plain, averaged) = (errors(&csv), errors(&swa_csv));
    assert_eq!(
        plain[..3],
        averaged[..3],
        "the training rounds are the same"
    );
    assert_ne!(
        plain[3], averaged[3],
        "the reduce starts from the averages: {swa_csv}"
    );
    assert_eq!(averaged.last(), Some(&0.0), "{swa_csv}");
}

fn small_consensus(topology: &str) -> Scenario {
    Scenario::from_toml(&format!(
        r#"
name = "t"
seed = 5
mode = "consensus"
nodes = 16
rounds = 40
schemes = ["metropolis-hastings"]
# At least the topology's largest degree: the whole topology every round (fixed-graph MH).
fanout = 4
[topology]
{topology}
[consensus]
dim = 8
target_error = 1e-4
"#
    ))
    .unwrap()
}

#[test]
fn measured_decay_matches_the_spectral_gap_within_20_percent() {
    for topology in ["kind = \"ring\"", "kind = \"random-regular\"\ndegree = 4"] {
        let (report, _) = medmesh_sim::run(&small_consensus(topology), &mut |_, _| {}).unwrap();
        let v = &report.variants[0];
        let (measured, predicted) = (v.measured_rate.unwrap(), v.predicted_rate.unwrap());
        assert!(
            (measured - predicted).abs() / predicted < 0.2,
            "{topology}: measured {measured}, predicted {predicted}"
        );
    }
}

#[test]
fn the_same_scenario_and_seed_give_a_byte_identical_report() {
    let mut s = shipped("scale");
    s.nodes = 300;
    s.rounds = 15;
    s.consensus.dim = 64;
    s.churn.leave_probability = 0.05;
    s.churn.rejoin_probability = 0.3;
    let run = || {
        let dir = tempfile::tempdir().unwrap();
        medmesh_sim::run_to_dir(&s, dir.path(), false, &mut |_, _| {}).unwrap();
        let read = |f: &str| std::fs::read(dir.path().join(f)).unwrap();
        (read("report.json"), read("push-sum.csv"))
    };
    assert_eq!(run(), run());
    let mut other = s.clone();
    other.seed += 1;
    let dir = tempfile::tempdir().unwrap();
    medmesh_sim::run_to_dir(&other, dir.path(), false, &mut |_, _| {}).unwrap();
    assert_ne!(
        std::fs::read(dir.path().join("report.json")).unwrap(),
        run().0
    );
}

#[test]
fn a_churn_trace_file_beside_the_scenario_drives_who_is_online() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("trace.csv"),
        "round,site,event\n2,0,crash\n2,1,leave\n4,0,join\n",
    )
    .unwrap();
    let scenario = dir.path().join("s.toml");
    std::fs::write(
        &scenario,
        r#"
name = "traced"
mode = "consensus"
nodes = 6
rounds = 5
schemes = ["pairwise-gossip"]
[topology]
kind = "complete"
[churn]
trace_file = "trace.csv"
[consensus]
dim = 4
"#,
    )
    .unwrap();
    let s = Scenario::from_file(&scenario).unwrap();
    assert_eq!(s.churn.trace.len(), 3);
    let (_, results) = medmesh_sim::run(&s, &mut |_, _| {}).unwrap();
    let online: Vec<usize> = results[0].rows.iter().map(|r| r.online).collect();
    assert_eq!(online, [6, 4, 4, 5, 5]);

    std::fs::write(dir.path().join("trace.csv"), "2,9,leave\n").unwrap();
    let err = Scenario::from_file(&scenario).unwrap_err().to_string();
    assert!(
        err.contains("churn.trace") && err.contains("site 9"),
        "{err}"
    );
}

#[test]
fn epidemic_pushes_to_fanout_sites_per_round() {
    // On the complete graph, as nodes reach each other: a ring has only two neighbours.
    let mut s = small_consensus("kind = \"complete\"");
    s.schemes = vec![medmesh_sim::scenario::Method::Gossip(
        medmesh_protocol::manifest::Scheme::Epidemic,
    )];
    s.nodes = 10;
    s.rounds = 2;
    s.fanout = 3;
    s.consensus.dim = 4;
    let (_, results) = medmesh_sim::run(&s, &mut |_, _| {}).unwrap();
    // 10 sites x 3 pushes x 16 bytes (4 f32 values) per round.
    let bytes: Vec<u64> = results[0].rows.iter().map(|r| r.bytes_total).collect();
    assert_eq!(bytes, [480, 960]);
    s.fanout = 10;
    assert!(s.validate().unwrap_err().to_string().contains("`fanout`"));
}
