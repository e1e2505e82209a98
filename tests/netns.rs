//! Discovery across hosts, in network namespaces this test creates (and always removes):
//!
//! ```text
//!   h1 coordinator 10.77.0.1 ─┐
//!   h2 agent       10.77.0.2 ─┼─ br0 (namespace sw) ── r 10.77.0.14 ── 10.78.0.1 ── h3 agent 10.78.0.2
//!      + emulated Ollama :11434                      (router: forwards unicast, not multicast;
//!                                                     a web server on :11434 that is not Ollama)
//! ```
//!
//! Both agents start with only the cluster token. h2 finds the coordinator over mDNS; h3, behind the
//! router where multicast does not pass, through a seed given as a DNS name (`coordinator.test`, in
//! h3's own /etc/hosts: `ip netns exec` mounts /etc/netns/NS/hosts over it). A third agent on h2 has no
//! token: the coordinator lists it as discovered, not joined. The coordinator's range scan of
//! 10.77.0.0/28 finds the emulated Ollama on h2 and lists the router's web server as not Ollama.
//! All along, the router announces a thousand fake coordinators over mDNS (`agent/examples/mdns_flood.rs`:
//! half stall the handshake, half are closed ports): the coordinator's and the agent's peer tables hold
//! only a few of them, and the agent still joins the real coordinator.
//!
//! Needs root (to create namespaces) and `ip` from iproute2, `curl` and `python3`.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::SOLLOL;
use common::hosts::{Hosts, emulator};

/// The mDNS flood (an example of the sollol package, built by `cargo test` or `cargo build --examples`).
fn flood() -> PathBuf {
    let path = Path::new(SOLLOL)
        .with_file_name("examples")
        .join("mdns_flood");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p sollol --example mdns_flood`",
        path.display()
    );
    path
}

/// Builds the hosts, the bridge and the routed link.
fn network(hosts: &mut Hosts) {
    for host in ["sw", "h1", "h2", "h3", "r"] {
        hosts.add(host);
    }
    hosts.lan(&[
        ("h1", "10.77.0.1/24"),
        ("h2", "10.77.0.2/24"),
        ("r", "10.77.0.14/24"),
    ]);
    let h3 = hosts.ns("h3");
    hosts.run(
        "r",
        &[
            "ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", &h3,
        ],
    );
    hosts.run("r", &["ip", "addr", "add", "10.78.0.1/24", "dev", "eth1"]);
    hosts.run("r", &["ip", "link", "set", "eth1", "up"]);
    hosts.run("r", &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    hosts.run("h3", &["ip", "addr", "add", "10.78.0.2/24", "dev", "eth0"]);
    hosts.run("h3", &["ip", "link", "set", "eth0", "up"]);
    hosts.run("h3", &["ip", "route", "add", "default", "via", "10.78.0.1"]);
    for host in ["h1", "h2"] {
        hosts.run(
            host,
            &["ip", "route", "add", "10.78.0.0/24", "via", "10.77.0.14"],
        );
    }
    // h3 knows the coordinator by name.
    let etc = Path::new("/etc/netns").join(hosts.ns("h3"));
    std::fs::create_dir_all(&etc).expect("create /etc/netns/NS");
    std::fs::write(
        etc.join("hosts"),
        "127.0.0.1 localhost\n10.77.0.1 coordinator.test\n",
    )
    .expect("write the namespace's hosts file");
}

fn json(text: &str) -> Option<serde_json::Value> {
    serde_json::from_str(text).ok()
}

#[test]
fn agents_find_the_coordinator_by_mdns_or_seed_and_the_scan_finds_ollama() {
    let mut hosts = Hosts::new();
    network(&mut hosts);
    let data = tempfile::tempdir().expect("tempdir");
    let dir = |name: &str| data.path().join(name).display().to_string();
    let sollol_env = [
        ("SOLLOL_MDNS", "true"),
        ("SOLLOL_ENGINE", "off"),
        ("SOLLOL_HEARTBEAT_INTERVAL", "300ms"),
        ("SOLLOL_RECONNECT_MAX_BACKOFF", "500ms"),
        ("XDG_CONFIG_HOME", "/nonexistent"),
        ("RUST_LOG", "info"),
    ];

    // Services on the LAN: an emulated Ollama on h2, and a web server that is not Ollama on the router.
    let emulator = emulator();
    hosts.spawn(
        "h2",
        "ollama-emulator",
        &[],
        &[
            emulator.to_str().expect("utf-8 path"),
            "--bind",
            "10.77.0.2:11434",
        ],
    );
    hosts.spawn(
        "r",
        "web-server",
        &[],
        &[
            "python3",
            "-m",
            "http.server",
            "--bind",
            "10.77.0.14",
            "11434",
        ],
    );

    // A hostile host: a thousand fake coordinators, announced before any sollol process starts.
    let flood = flood();
    hosts.spawn(
        "r",
        "mdns-flood",
        &[],
        &[flood.to_str().expect("utf-8 path"), "10.77.0.14", "1000"],
    );

    let coordinator_dir = dir("coordinator");
    let mut coordinator_env = sollol_env.to_vec();
    coordinator_env.extend([
        ("SOLLOL_DISCOVERY_SCAN", "10.77.0.0/28"),
        ("SOLLOL_DISCOVERY_SCAN_INTERVAL", "2s"),
        ("SOLLOL_PROBE_INTERVAL", "300ms"),
        ("SOLLOL_NODE_NAME", "lan-coordinator"),
    ]);
    hosts.spawn(
        "h1",
        "coordinator",
        &coordinator_env,
        &[
            SOLLOL,
            "coordinator",
            "--data-dir",
            &coordinator_dir,
            "--gateway-bind",
            "10.77.0.1:11435",
            "--cluster-bind",
            "0.0.0.0:11436",
        ],
    );
    let api = "http://10.77.0.1:11435/api/sollol/v1";
    hosts.wait("the coordinator's gateway", Duration::from_secs(20), || {
        hosts.try_run("h1", &["curl", "-sf", "http://10.77.0.1:11435/healthz"])
    });
    let token = hosts
        .run("h1", &[SOLLOL, "token", "--data-dir", &coordinator_dir])
        .trim()
        .to_owned();
    assert!(!token.is_empty(), "sollol token printed nothing");
    // The agents read the token from a file, as `sollol up` tells users to: never on a command line.
    let token_file = format!("{coordinator_dir}/cluster-token");

    // Both agents get only the token: h2 over mDNS, h3 through its seed.
    for (host, name, seeds) in [
        ("h2", "lan-agent", None),
        ("h3", "routed-agent", Some("coordinator.test:11436")),
    ] {
        let mut env = sollol_env.to_vec();
        env.extend(seeds.map(|seeds| ("SOLLOL_SEEDS", seeds)));
        let data_dir = dir(name);
        hosts.spawn(
            host,
            name,
            &env,
            &[
                SOLLOL,
                "agent",
                "--token-file",
                &token_file,
                "--data-dir",
                &data_dir,
                "--name",
                name,
            ],
        );
    }

    // An agent without a token announces itself and waits.
    let waiting_dir = dir("waiting-agent");
    hosts.spawn(
        "h2",
        "waiting-agent",
        &sollol_env,
        &[
            SOLLOL,
            "agent",
            "--data-dir",
            &waiting_dir,
            "--name",
            "waiting-agent",
        ],
    );

    let nodes = hosts.wait(
        "both agents up in the coordinator's node list",
        Duration::from_secs(30),
        || {
            let nodes = json(&hosts.try_run("h1", &["curl", "-sf", &format!("{api}/nodes")])?)?;
            let up = |name: &str| {
                nodes["nodes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|node| node["name"] == name && node["status"] == "up")
            };
            (up("lan-agent") && up("routed-agent")).then_some(nodes)
        },
    );
    let routed = nodes["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|node| node["name"] == "routed-agent")
        .expect("routed-agent listed");
    assert!(
        routed["addresses"][0]
            .as_str()
            .is_some_and(|address| address.starts_with("10.78.0.2:")),
        "the routed agent connects from its own network, through the router: {routed}"
    );

    let discovery = hosts.wait(
        "mDNS shows the LAN agent joined, and a scan saw both services",
        Duration::from_secs(30),
        || {
            let discovery =
                json(&hosts.try_run("h1", &["curl", "-sf", &format!("{api}/discovery")])?)?;
            let peers = discovery["mdns"]["peers"].as_array()?;
            let joined = peers
                .iter()
                .any(|peer| peer["name"] == "lan-agent" && peer["joined"] == true)
                && peers.iter().any(|peer| peer["name"] == "waiting-agent");
            // A scan that saw both services (the web server may start after the first scan).
            let scanned = !discovery["scan"]["found"].as_array()?.is_empty()
                && !discovery["scan"]["rejected"].as_array()?.is_empty();
            (joined && scanned).then_some(discovery)
        },
    );
    let mdns = &discovery["mdns"];
    let peers = mdns["peers"].as_array().expect("peers");
    let lan = peers
        .iter()
        .find(|peer| peer["name"] == "lan-agent")
        .expect("lan-agent");
    assert_eq!(lan["role"], "agent");
    assert_eq!(lan["addresses"][0], "10.77.0.2");
    assert_eq!(lan["has_token"], true);
    assert_eq!(lan["roles"], serde_json::json!(["agent", "stage"]));
    assert!(
        peers.iter().all(|peer| peer["name"] != "routed-agent"),
        "multicast must not pass the router, yet the routed agent was heard: {peers:?}"
    );
    let waiting = peers
        .iter()
        .find(|peer| peer["name"] == "waiting-agent")
        .expect("waiting-agent");
    assert_eq!(waiting["has_token"], false);
    assert_eq!(waiting["joined"], false);
    // The flood holds at most MAX_PER_ADDRESS places in the coordinator's table, the agent's too, and the
    // agent joined the real coordinator regardless (above).
    let impostors = peers
        .iter()
        .filter(|peer| peer["name"] == "impostor")
        .count();
    assert!(
        (1..=8).contains(&impostors),
        "{impostors} of the 1,000 fake coordinators in the coordinator's table: {peers:?}\n{}",
        hosts.logs()
    );
    assert_eq!(mdns["interfaces"][0]["name"], "eth0");
    assert_eq!(mdns["interfaces"][0]["answers"], 2 + impostors);
    let agent_log = std::fs::read_to_string(hosts.log("lan-agent")).expect("agent log");
    assert!(
        agent_log.contains("mDNS peer table full"),
        "the agent's table reached its bound: {agent_log}"
    );

    let scan = &discovery["scan"];
    assert_eq!(
        scan["found"]
            .as_array()
            .expect("found")
            .iter()
            .map(|found| found["address"].as_str().unwrap_or_default())
            .collect::<Vec<_>>(),
        ["10.77.0.2:11434"],
        "only the emulated Ollama counts: {scan}"
    );
    let rejected = scan["rejected"].as_array().expect("rejected");
    assert!(
        rejected
            .iter()
            .any(|other| other["address"] == "10.77.0.14:11434"
                && other["reason"]
                    .as_str()
                    .is_some_and(|reason| reason.contains("404"))),
        "the router's web server is listed as not Ollama: {scan}"
    );
    // The Ollama server found by the scan joins the routing as a node of its own.
    hosts.wait(
        "the scanned Ollama server as a node",
        Duration::from_secs(20),
        || {
            let nodes = json(&hosts.try_run("h1", &["curl", "-sf", &format!("{api}/nodes")])?)?;
            nodes["nodes"]
                .as_array()?
                .iter()
                .any(|node| node["name"] == "ollama@10.77.0.2:11434" && node["status"] == "up")
                .then_some(())
        },
    );

    // What `sollol discover` prints about it.
    let shown = hosts.run(
        "h1",
        &[SOLLOL, "discover", "--url", "http://10.77.0.1:11435"],
    );
    println!("sollol discover on h1:\n{shown}");
    let answers = format!("mDNS: {} answer(s) on eth0 (10.77.0.1/24)", 2 + impostors);
    for expected in [
        "mDNS: announced as lan-coordinator-",
        answers.as_str(),
        "agent, joined",
        "agent, discovered, not joined (it has no token)",
        "found       10.77.0.2:11434",
        "not Ollama  10.77.0.14:11434",
    ] {
        assert!(
            shown.contains(expected),
            "{expected:?} missing from:\n{shown}"
        );
    }
    // The agents said how they found the coordinator.
    let lan_log = std::fs::read_to_string(hosts.log("lan-agent")).unwrap_or_default();
    assert!(
        lan_log.contains("found over mDNS") && lan_log.contains("joined the cluster"),
        "lan-agent's log:\n{lan_log}"
    );
}
