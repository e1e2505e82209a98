//! Black-box tests of the built `sollol` binary: real processes, real signals, loopback only.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use sollol_shared::api::{NodeList, NodeStatus};

mod common;

use common::{Banner, Process, agent_command, run, sollol, start_up, temp_dir};

fn start_agent(banner: &Banner, data_dir: &Path, name: &str) -> Process {
    let child = agent_command(banner, data_dir, name)
        .args(["--reconnect-max-backoff", "500ms"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sollol agent");
    Process {
        child,
        name: "sollol agent",
    }
}

fn nodes(gateway: &str) -> Option<NodeList> {
    let output = run(&["nodes", "--json", "--url", gateway]);
    if !output.status.success() {
        return None;
    }
    Some(serde_json::from_slice(&output.stdout).expect("nodes --json prints the API's JSON"))
}

fn wait_for_nodes(gateway: &str, what: &str, condition: impl Fn(&NodeList) -> bool) -> NodeList {
    let started = Instant::now();
    loop {
        if let Some(list) = nodes(gateway)
            && condition(&list)
        {
            return list;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn all_up(list: &NodeList) -> bool {
    list.nodes.len() == 3 && list.nodes.iter().all(|node| node.status == NodeStatus::Up)
}

fn ids(list: &NodeList) -> Vec<String> {
    let mut ids: Vec<String> = list.nodes.iter().map(|node| node.id.clone()).collect();
    ids.sort();
    ids
}

#[test]
fn up_two_agents_and_a_coordinator_restart() {
    let (_keep_a, coordinator_dir) = temp_dir();
    let (_keep_b, agent_b) = temp_dir();
    let (_keep_c, agent_c) = temp_dir();
    let (up, banner) = start_up(&coordinator_dir, "127.0.0.1:0", "127.0.0.1:0");
    assert!(
        banner.join.starts_with("127.0.0.1:"),
        "join address {}",
        banner.join
    );

    // The printed token is the stored one, kept private.
    let token = run(&[
        "token",
        "--data-dir",
        &coordinator_dir.display().to_string(),
    ]);
    assert!(token.status.success());
    assert_eq!(String::from_utf8_lossy(&token.stdout).trim(), banner.token);
    let mode = std::fs::metadata(coordinator_dir.join("cluster-token"))
        .expect("token file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let agents = [
        start_agent(&banner, &agent_b, "node-b"),
        start_agent(&banner, &agent_c, "node-c"),
    ];
    let before = wait_for_nodes(&banner.gateway, "3 nodes up", all_up);
    let mut names: Vec<&str> = before.nodes.iter().map(|node| node.name.as_str()).collect();
    names.sort();
    assert_eq!(names, vec!["coordinator-node", "node-b", "node-c"]);

    let table = run(&["nodes", "--url", &banner.gateway]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.starts_with("NAME"), "{table}");
    assert_eq!(table.lines().count(), 4, "{table}");
    let status = run(&["status", "--url", &banner.gateway]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("3 known: 3 up"));

    // kill -9 the coordinator, then start it again on the same ports and data.
    let gateway_bind = banner.gateway.trim_start_matches("http://").to_owned();
    up.signal("-KILL");
    drop(up);
    let (up, banner_again) = start_up(&coordinator_dir, &gateway_bind, &banner.join);
    assert_eq!(
        banner_again.token, banner.token,
        "the token survives a restart"
    );
    let remembered = nodes(&banner.gateway).expect("nodes after restart");
    assert_eq!(
        ids(&remembered),
        ids(&before),
        "every node is remembered after a restart"
    );
    let after = wait_for_nodes(&banner.gateway, "3 nodes reconnected", all_up);
    assert_eq!(ids(&after), ids(&before), "nodes keep their ids");

    // SIGTERM: agents leave gracefully, the coordinator stops gracefully.
    for agent in agents {
        let (code, stderr) = agent.terminate();
        assert_eq!(code, Some(0), "{stderr}");
        assert!(stderr.contains("graceful"), "{stderr}");
    }
    let left = wait_for_nodes(&banner.gateway, "two nodes left", |list| {
        list.nodes
            .iter()
            .filter(|node| node.status == NodeStatus::Left)
            .count()
            == 2
    });
    assert_eq!(left.nodes.len(), 3);
    let (code, stderr) = up.terminate();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("shutdown=\"graceful\""), "{stderr}");
}

#[test]
fn usage_errors_exit_64_and_name_the_problem() {
    fn check(args: &[&str], env: &[(&str, &str)], needle: &str) {
        let output = sollol(args)
            .envs(env.iter().copied())
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{args:?} {env:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?} {env:?}: {stderr:?} lacks {needle:?}"
        );
    }
    check(
        &["print-config"],
        &[("SOLLOL_HEARTBEAT_INTERVAL", "banana")],
        "`agent.heartbeat_interval`",
    );
    check(
        &["up", "--gateway-bind", "nowhere"],
        &[],
        "`coordinator.gateway_bind`",
    );
    check(
        &["agent", "--token", "0123456789abcdef0123"],
        &[],
        "at least 32 characters",
    );
    check(
        &["agent", "--token", "0123456789abcdef0123456789abcdef"],
        &[],
        "no coordinator to join: pass --join HOST:PORT",
    );
    check(
        &["agent", "--token-file", "/nonexistent/token"],
        &[],
        "cannot read the token file",
    );
    check(
        &["agent", "--join", "127.0.0.1:1"],
        &[],
        "`agent.token` is required",
    );
    check(&["no-such-command"], &[], "unrecognized subcommand");
    check(
        &["print-config", "--config", "/nonexistent/sollol.toml"],
        &[],
        "/nonexistent/sollol.toml",
    );
}

#[test]
fn help_version_and_print_config() {
    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    for command in [
        "up",
        "coordinator",
        "agent",
        "status",
        "nodes",
        "token",
        "print-config",
        "version",
    ] {
        assert!(
            String::from_utf8_lossy(&help.stdout).contains(command),
            "--help lacks {command}"
        );
    }
    for command in ["up", "agent", "nodes"] {
        let output = run(&[command, "--help"]);
        assert_eq!(output.status.code(), Some(0), "{command} --help");
    }
    let version = run(&["version"]);
    let shown = String::from_utf8_lossy(&version.stdout);
    assert!(shown.starts_with(&format!("sollol {}", env!("CARGO_PKG_VERSION"))));
    // The kernels chosen for this CPU are named; the setting forces the portable ones.
    assert!(shown.contains(", kernels "), "{shown}");
    let portable = sollol(&["version"])
        .env("SOLLOL_KERNELS", "portable")
        .output()
        .expect("run sollol");
    assert!(
        String::from_utf8_lossy(&portable.stdout).contains(", kernels portable)"),
        "{}",
        String::from_utf8_lossy(&portable.stdout)
    );

    let (_keep, dir) = temp_dir();
    let file = dir.join("sollol.toml");
    std::fs::write(
        &file,
        "model_sharding_enabled = true\n[agent]\nname = \"from-file\"\n",
    )
    .expect("write config");
    let output = sollol(&[
        "print-config",
        "--config",
        &file.display().to_string(),
        "--data-dir",
        "/srv/x",
    ])
    .env("SOLLOL_NODE_NAME", "from-env")
    .output()
    .expect("run");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("name = \"from-env\"  # env SOLLOL_NODE_NAME"),
        "{text}"
    );
    assert!(
        text.contains("model_sharding_enabled = true  # file"),
        "{text}"
    );
    assert!(
        text.contains("data_dir = \"/srv/x\"  # command line"),
        "{text}"
    );
}

/// A coordinator that cannot bind its port fails with exit code 1 and says which address.
#[test]
fn port_in_use_is_a_clear_start_up_failure() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = taken.local_addr().expect("address").to_string();
    let (_keep, dir) = temp_dir();
    let output = run(&[
        "coordinator",
        "--data-dir",
        &dir.display().to_string(),
        "--gateway-bind",
        &address,
        "--cluster-bind",
        "127.0.0.1:0",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&address) && stderr.contains("gateway"),
        "{stderr}"
    );
}
