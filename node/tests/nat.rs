//! NAT traversal on real network stacks. The test builds, in Linux network namespaces of its
//! own (veth pairs, a bridge as the internet, nftables NATs):
//!
//! * `pub`: one member with a public address;
//! * `a`, `b`: two clinics, each behind its own NAT (address- and port-preserving
//!   masquerade that drops unsolicited inbound packets, as home and office routers do);
//! * `c`: a clinic behind a NAT that picks a random port for every connection (a
//!   symmetric NAT: hole punching cannot work through it);
//! * `out`: an outsider on the internet.
//!
//! Then it runs a four-site experiment across them as separate `medmesh run` processes and
//! checks, from the nodes' logs: AutoNAT's verdicts (the public member reachable, the
//! clinics not), relay reservations on the public member, a hole-punched direct connection
//! between `a` and `b` that carries their model transfers, relayed connections (and no
//! direct one) between `c` and the other clinics, and every site completing every round.
//! The outsider, without the network key, cannot reach a clinic through the relay; with the
//! key, a member can. Needs root (CI runs as root) and fails, loudly, without it. No
//! packet leaves the namespaces it creates.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use medmesh_crypto::NetworkKey;
use medmesh_node::keystore;
use medmesh_node::local::{self, LocalConsortium, Nodes};
use medmesh_protocol::manifest::Scheme;
use medmesh_protocol::round::RoundRules;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_medmesh");
const PORT: u16 = 4001;
/// Enough rounds (about half a second each) for a hole punch that needs another go (see
/// `EventLoop::repunch`: a few seconds) to still carry most of a and b's transfers.
const ROUNDS: u32 = 20;

/// Runs `program args`, panicking with its output if it fails.
fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `program args` inside namespace `ns`, feeding `stdin`; returns (success, stdout,
/// stderr).
fn run_in(ns: &str, program: &str, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run ip netns exec: {e}"));
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The namespaces, deleted on drop.
struct Testbed {
    prefix: String,
    made: Vec<String>,
}

impl Testbed {
    fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn add(&mut self, name: &str) -> String {
        let ns = self.ns(name);
        let out = Command::new("ip")
            .args(["netns", "add", &ns])
            .output()
            .expect("`ip` (iproute2) must be installed: this test builds network namespaces");
        assert!(
            out.status.success(),
            "THIS TEST NEEDS ROOT AND LINUX NETWORK NAMESPACES, and could not create one \
             (`ip netns add {ns}`: {}). It does not skip: NAT traversal is untested on this \
             machine until it runs.",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        self.made.push(ns.clone());
        run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// Builds the topology: a bridge `br0` in `wan` for 10.100.0.0/24, the public member at
    /// .1, the outsider at .50, and three gateways at .11, .12, .13 with clinic LANs
    /// 192.168.{1,2,3}.0/24 behind them. Returns nothing; namespaces are `self.ns(name)`.
    fn build(&mut self) {
        let nft = Command::new("nft").arg("--version").output();
        assert!(
            nft.is_ok_and(|o| o.status.success()),
            "this test needs nftables (`nft`): apt-get install nftables"
        );
        let wan = self.add("wan");
        run("ip", &["-n", &wan, "link", "add", "br0", "type", "bridge"]);
        run("ip", &["-n", &wan, "link", "set", "br0", "up"]);
        let attach = |this: &mut Self, name: &str, ip: &str| -> String {
            let ns = this.add(name);
            let port = format!("v-{name}");
            run(
                "ip",
                &[
                    "-n", &wan, "link", "add", &port, "type", "veth", "peer", "name", "wan0",
                    "netns", &ns,
                ],
            );
            run(
                "ip",
                &["-n", &wan, "link", "set", &port, "master", "br0", "up"],
            );
            run("ip", &["-n", &ns, "addr", "add", ip, "dev", "wan0"]);
            run("ip", &["-n", &ns, "link", "set", "wan0", "up"]);
            ns
        };
        attach(self, "pub", "10.100.0.1/24");
        attach(self, "out", "10.100.0.50/24");
        for (i, site, symmetric) in [(1, "a", false), (2, "b", false), (3, "c", true)] {
            let gw = attach(self, &format!("gw{site}"), &format!("10.100.0.1{i}/24"));
            let host = self.add(site);
            run(
                "ip",
                &[
                    "-n", &gw, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0",
                    "netns", &host,
                ],
            );
            run(
                "ip",
                &[
                    "-n",
                    &gw,
                    "addr",
                    "add",
                    &format!("192.168.{i}.1/24"),
                    "dev",
                    "lan0",
                ],
            );
            run("ip", &["-n", &gw, "link", "set", "lan0", "up"]);
            run(
                "ip",
                &[
                    "-n",
                    &host,
                    "addr",
                    "add",
                    &format!("192.168.{i}.2/24"),
                    "dev",
                    "eth0",
                ],
            );
            run("ip", &["-n", &host, "link", "set", "eth0", "up"]);
            run(
                "ip",
                &[
                    "-n",
                    &host,
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("192.168.{i}.1"),
                ],
            );
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &gw,
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv4.ip_forward=1",
                ],
            );
            // Outbound: masquerade (port-preserving, or a random port per connection).
            // Inbound: only replies to what went out; anything else is dropped silently.
            let masquerade = if symmetric {
                "masquerade fully-random"
            } else {
                "masquerade"
            };
            let rules = format!(
                "table ip nat {{
                   chain outbound {{
                     type nat hook postrouting priority 100;
                     oifname \"wan0\" {masquerade}
                   }}
                 }}
                 table inet filter {{
                   chain through {{
                     type filter hook forward priority 0; policy drop;
                     ct state established,related accept
                     iifname \"lan0\" accept
                   }}
                   chain to_gateway {{
                     type filter hook input priority 0; policy accept;
                     iifname \"wan0\" ct state established,related accept
                     iifname \"wan0\" drop
                   }}
                 }}
"
            );
            let (ok, _, err) = run_in(&gw, "nft", &["-f", "-"], &rules);
            assert!(ok, "nft rules for {gw}: {err}");
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for ns in self.made.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// One parsed JSON log line: its message and fields.
#[derive(Debug, Clone)]
struct Line {
    ms: f64,
    message: String,
    fields: BTreeMap<String, String>,
}

fn read_log(path: &Path) -> Vec<Line> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| {
            let fields: BTreeMap<String, String> = v["fields"]
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| {
                            let s = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                            (k.clone(), s)
                        })
                        .collect()
                })
                .unwrap_or_default();
            let ms = v["timestamp"]
                .as_str()
                .and_then(timestamp_ms)
                .unwrap_or_default();
            Line {
                ms,
                message: fields.get("message").cloned().unwrap_or_default(),
                fields,
            }
        })
        .collect()
}

/// Milliseconds into the day of an RFC 3339 timestamp (the test runs for minutes).
fn timestamp_ms(t: &str) -> Option<f64> {
    let time = t.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(((h * 60.0 + m) * 60.0 + s) * 1000.0)
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

struct Site {
    name: &'static str,
    ns: String,
    peer: PeerId,
    log: PathBuf,
}

impl Site {
    fn lines(&self) -> Vec<Line> {
        read_log(&self.log)
    }

    fn said(&self, message: &str) -> bool {
        self.lines().iter().any(|l| l.message.starts_with(message))
    }

    /// Lines with `message` about `peer` (field `peer`).
    fn about(&self, message: &str, peer: &PeerId) -> Vec<Line> {
        let id = peer.to_string();
        self.lines()
            .into_iter()
            .filter(|l| l.message.starts_with(message) && l.fields.get("peer") == Some(&id))
            .collect()
    }

    /// The paths of the connections this site opened with `peer`.
    fn paths_to(&self, peer: &PeerId) -> Vec<String> {
        let mut out = Vec::new();
        for m in ["member connected", "another connection to a member"] {
            out.extend(
                self.about(m, peer)
                    .into_iter()
                    .filter_map(|l| l.fields.get("path").cloned()),
            );
        }
        out
    }
}

/// What each site logged about connections, relays, hole punches, transfers and rounds
/// (peer ids named by site), for failure messages.
fn logs(sites: &[Site]) -> String {
    let names: Vec<(String, &str)> = sites.iter().map(|s| (s.peer.to_string(), s.name)).collect();
    let mut out = String::new();
    for s in sites {
        out += &format!("--- {} ---\n", s.name);
        for l in s.lines() {
            let m = &l.message;
            let keep = [
                "connect",
                "hole",
                "relay",
                "reach",
                "received",
                "round done",
                "fail",
            ]
            .iter()
            .any(|k| m.contains(k));
            if !keep {
                continue;
            }
            let mut line = format!("{:.3} {m}", l.ms / 1000.0);
            for (k, v) in &l.fields {
                if k != "message" {
                    line += &format!(" {k}={v}");
                }
            }
            for (id, name) in &names {
                line = line.replace(id.as_str(), name);
            }
            out += &line;
            out.push('\n');
        }
        if s.lines().is_empty() {
            out += &tail(&s.log);
        }
    }
    out
}

fn wait_for(sites: &[Site], nodes: &mut Nodes, what: &str, ok: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ok() {
        local::check_alive(nodes).unwrap_or_else(|e| panic!("{e}\n{}", logs(sites)));
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            logs(sites)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn clinics_behind_nats_train_through_relays_and_hole_punching() {
    let mut bed = Testbed {
        prefix: format!("mmnat{}", std::process::id()),
        made: Vec::new(),
    };
    bed.build();

    let dir = tempfile::tempdir().unwrap();
    let c = LocalConsortium::create(dir.path(), 4, PORT).unwrap();
    c.prepare_data(8, 32, 4).unwrap();
    let names = ["pub", "a", "b", "c"];
    let public_addr = format!("/ip4/10.100.0.1/tcp/{PORT}/p2p/{}", c.sites[0].peer_id());
    let mut sites = Vec::new();
    for (i, name) in names.into_iter().enumerate() {
        let node_dir = c.node_dir(i);
        let bootnodes = if i == 0 {
            String::new()
        } else {
            format!("\"{public_addr}\"")
        };
        let config = format!(
            "[node]\nidentity = \"node.key\"\nnetwork_key = \"../../swarm.key\"\n\
             roster = \"../../roster.toml\"\nstate_dir = \"state\"\ndevice = \"flex\"\n\n\
             [network]\nlisten = [\"/ip4/0.0.0.0/tcp/{PORT}\"]\nbootnodes = [{bootnodes}]\n\n\
             [nat]\nprobe_interval_secs = 5\n\n[dashboard]\nlisten = \"\"\n\n\
             [log]\nformat = \"json\"\n\n[datasets.{}]\npath = {}\n",
            c.dataset,
            toml::Value::String(c.site_data(i).display().to_string())
        );
        std::fs::write(node_dir.join("node.toml"), config).unwrap();
        sites.push(Site {
            name,
            ns: bed.ns(name),
            peer: medmesh_node::net::peer_id_of(&c.sites[i].public_key()),
            log: node_dir.join("node.log"),
        });
    }
    let mut nodes = Nodes(Vec::new());
    for (i, site) in sites.iter().enumerate() {
        let log = std::fs::File::create(&site.log).unwrap();
        nodes.0.push(
            Command::new("ip")
                .args(["netns", "exec", &site.ns, BIN, "run", "--config"])
                .arg(c.node_dir(i).join("node.toml"))
                .env("RAYON_NUM_THREADS", "1")
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
                )
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }
    let (p, a, b, cc) = (&sites[0], &sites[1], &sites[2], &sites[3]);

    // Roles follow the network: AutoNAT finds the public member reachable and the clinics
    // not; the clinics then reserve on the public member, which relays once it knows it is
    // reachable.
    wait_for(&sites, &mut nodes, "AutoNAT's verdicts", || {
        p.said("reachable from other members")
            && [a, b, cc]
                .iter()
                .all(|s| s.said("not reachable from other members"))
    });
    wait_for(&sites, &mut nodes, "relay reservations", || {
        [a, b, cc]
            .iter()
            .all(|s| s.said("relay reservation accepted"))
    });
    assert!(
        !p.said("not reachable from other members"),
        "{}",
        logs(&sites)
    );

    // The experiment, submitted at the public member.
    let mut m = local::test_manifest(ROUNDS, Scheme::Epidemic).unwrap();
    m.id = "nat-test".into();
    m.task.input_size = [32, 32];
    m.training.batch_size = 4;
    // Every site pushes to the three others each round: every pair talks.
    m.averaging.fanout = Some(3);
    m.averaging.round_timeout_secs = 60;
    m.validate().unwrap();
    let manifest = dir.path().join("manifest.json");
    std::fs::write(&manifest, serde_json::to_string(&m).unwrap()).unwrap();
    let key = dir.path().join("researcher.key");
    let network_key = dir.path().join("swarm.key");
    let roster = dir.path().join("roster.toml");
    let connect = |node: &str, network_key: &Path| -> Vec<String> {
        [
            "--node",
            node,
            "--key",
            key.to_str().unwrap(),
            "--network-key",
            network_key.to_str().unwrap(),
            "--roster",
            roster.to_str().unwrap(),
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let args = |v: &[String], extra: &[&str]| -> Vec<String> {
        v.iter()
            .cloned()
            .chain(extra.iter().map(|s| (*s).to_owned()))
            .collect()
    };
    let submit = args(
        &connect(&public_addr, &network_key),
        &["--manifest", manifest.to_str().unwrap()],
    );
    let mut submit_args = vec!["experiment".to_owned(), "submit".to_owned()];
    submit_args.extend(submit);
    let refs: Vec<&str> = submit_args.iter().map(String::as_str).collect();
    let (ok, out, err) = run_in(&p.ns, BIN, &refs, "");
    assert!(ok, "submit: {out}{err}\n{}", logs(&sites));

    let status_args: Vec<String> = ["experiment", "status"]
        .map(str::to_owned)
        .into_iter()
        .chain(connect(&public_addr, &network_key))
        .chain(["--experiment", "nat-test", "--json"].map(str::to_owned))
        .collect();
    let status_refs: Vec<&str> = status_args.iter().map(String::as_str).collect();
    let total = RoundRules::from_manifest(&m).total_rounds(4);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(420);
    let records = loop {
        local::check_alive(&mut nodes).unwrap_or_else(|e| panic!("{e}\n{}", logs(&sites)));
        let (ok, out, _) = run_in(&p.ns, BIN, &status_refs, "");
        let records: Vec<Value> = if ok {
            serde_json::from_str(&out).unwrap_or_default()
        } else {
            Vec::new()
        };
        if records.len() == 4 && records.iter().all(|r| r["finished"] == true) {
            break records;
        }
        assert!(
            Instant::now() < deadline,
            "the experiment did not finish: {out}\n{}",
            logs(&sites)
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    let elapsed = started.elapsed();
    for r in &records {
        assert!(r["failure"].is_null(), "{r}");
        assert_eq!(r["round"].as_u64(), Some(u64::from(ROUNDS)), "{r}");
    }

    // a and b: relayed at first, then a hole-punched direct connection, which replaced the
    // relayed one and carried model transfers.
    let punched = |x: &Site, y: &Site| {
        !x.about("hole punch succeeded", &y.peer).is_empty()
            || !y.about("hole punch succeeded", &x.peer).is_empty()
    };
    assert!(punched(a, b), "a and b should hole-punch\n{}", logs(&sites));
    assert!(
        a.paths_to(&b.peer).iter().any(|p| p == "direct")
            && b.paths_to(&a.peer).iter().any(|p| p == "direct"),
        "a–b direct: {:?} / {:?}",
        a.paths_to(&b.peer),
        b.paths_to(&a.peer)
    );
    let transfers = |x: &Site, from: &Site, path: &str| -> Vec<f64> {
        x.about("received a model update", &from.peer)
            .into_iter()
            .filter(|l| l.fields.get("path").map(String::as_str) == Some(path))
            .filter_map(|l| l.fields.get("ms").and_then(|v| v.parse().ok()))
            .collect()
    };
    let ab_direct: Vec<f64> = [transfers(a, b, "direct"), transfers(b, a, "direct")].concat();
    assert!(
        !ab_direct.is_empty(),
        "a and b should exchange models directly\n{}",
        logs(&sites)
    );
    // Hole punching takes a moment (and a retransmitted SYN when the NATs' timing is
    // unlucky), so early transfers may be relayed; every one that starts once the direct
    // connection is up goes direct.
    let punched_at = [
        a.about("hole punch succeeded", &b.peer),
        b.about("hole punch succeeded", &a.peer),
    ]
    .concat()
    .iter()
    .map(|l| l.ms)
    .fold(f64::INFINITY, f64::min);
    for (x, y) in [(a, b), (b, a)] {
        for l in x.about("received a model update", &y.peer) {
            let ms: f64 = l
                .fields
                .get("ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            if l.ms - ms > punched_at + 100.0 {
                assert_eq!(
                    l.fields.get("path").map(String::as_str),
                    Some("direct"),
                    "{} got a relayed update from {} after the hole punch\n{}",
                    x.name,
                    y.name,
                    logs(&sites)
                );
            }
        }
    }

    // c, behind the symmetric NAT: never direct with a or b, every transfer relayed.
    for x in [a, b] {
        assert!(!punched(x, cc), "{} and c cannot hole-punch", x.name);
        assert!(
            !cc.paths_to(&x.peer).iter().any(|p| p == "direct")
                && !x.paths_to(&cc.peer).iter().any(|p| p == "direct"),
            "{}–c must stay relayed: {:?} / {:?}",
            x.name,
            cc.paths_to(&x.peer),
            x.paths_to(&cc.peer)
        );
        assert!(
            cc.paths_to(&x.peer).iter().any(|p| p == "relayed")
                || x.paths_to(&cc.peer).iter().any(|p| p == "relayed"),
            "{}–c connected through the relay",
            x.name
        );
    }
    let relayed: Vec<f64> = [
        transfers(cc, a, "relayed"),
        transfers(cc, b, "relayed"),
        transfers(a, cc, "relayed"),
        transfers(b, cc, "relayed"),
    ]
    .concat();
    assert!(!relayed.is_empty(), "c's transfers go through the relay");
    assert!(
        transfers(cc, a, "direct").is_empty() && transfers(cc, b, "direct").is_empty(),
        "c received nothing directly from a or b"
    );
    assert!(
        p.said("relaying a connection between members"),
        "the public member relays"
    );

    // The outsider: without the network key, no connection to the public member, nor to a
    // clinic through it; with the key, a member's client reaches the clinic via the relay.
    let via_relay = format!("{public_addr}/p2p-circuit/p2p/{}", a.peer);
    let wrong = dir.path().join("wrong.key");
    keystore::save_network_key(&wrong, &NetworkKey::generate().unwrap(), true).unwrap();
    let out_ns = bed.ns("out");
    // Both attempts at once: each waits out the handshake timeout.
    std::thread::scope(|scope| {
        for target in [&public_addr, &via_relay] {
            let a: Vec<String> = ["experiment", "status"]
                .map(str::to_owned)
                .into_iter()
                .chain(connect(target, &wrong))
                .collect();
            let out_ns = &out_ns;
            scope.spawn(move || {
                let refs: Vec<&str> = a.iter().map(String::as_str).collect();
                let (ok, out, err) = run_in(out_ns, BIN, &refs, "");
                assert!(!ok, "a wrong network key reached {target}: {out}");
                assert!(err.contains("cannot connect"), "{err}");
            });
        }
    });
    let with_key: Vec<String> = ["experiment", "status", "--experiment", "nat-test", "--json"]
        .map(str::to_owned)
        .into_iter()
        .chain(connect(&via_relay, &network_key))
        .collect();
    let refs: Vec<&str> = with_key.iter().map(String::as_str).collect();
    let (ok, out, err) = run_in(&out_ns, BIN, &refs, "");
    assert!(ok, "the right key reaches a through the relay: {err}");
    assert!(out.contains("nat-test"), "{out}");

    // Figures for the README: model transfers by path, and round times per site.
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    println!(
        "experiment: {total} rounds in {:.1} s; model transfer a<->b direct: {:.0} ms mean over {}; \
         relayed through pub (c<->a, c<->b): {:.0} ms mean over {}",
        elapsed.as_secs_f64(),
        mean(&ab_direct),
        ab_direct.len(),
        mean(&relayed),
        relayed.len()
    );
    let repunched: usize = sites
        .iter()
        .map(|s| {
            s.lines()
                .iter()
                .filter(|l| l.message.starts_with("still relayed; reconnecting"))
                .count()
        })
        .sum();
    println!("reconnections for another hole punch (all sites): {repunched}");
    for s in &sites {
        let done: Vec<f64> = s
            .lines()
            .into_iter()
            .filter(|l| l.message == "round done")
            .map(|l| l.ms)
            .collect();
        let gaps: Vec<f64> = done.windows(2).map(|w| w[1] - w[0]).collect();
        println!(
            "site {}: {} rounds, {:.2} s per round after the first",
            s.name,
            done.len(),
            mean(&gaps) / 1000.0
        );
    }
    drop(nodes);
}
