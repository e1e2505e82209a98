//! Terminal rendering: the coordinator's answers and the start-up banner as the text and tables a
//! person reads. Every function here is pure (the time is passed in), so each is unit-tested.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use sollol_shared::BUILD_VERSION;
use sollol_shared::api::{ClusterSummary, Node};

use crate::config;

/// `sollol discover` as text.
/// Text from the network (node names, mDNS TXT records, Ollama versions, error messages) made safe to
/// print: control characters but newline and tab (an escape sequence can rewrite the screen, the
/// window title or the clipboard) and bidirectional overrides (which reorder what is shown) appear
/// as `\u{…}` escapes.
pub fn terminal_safe(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.contains(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut safe = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if unsafe_char(c) {
            safe.push_str(&c.escape_unicode().to_string());
        } else {
            safe.push(c);
        }
    }
    std::borrow::Cow::Owned(safe)
}

pub fn render_discovery(discovery: &sollol_shared::api::Discovery, now_ms: u64) -> String {
    let mut text = render_mdns(discovery.mdns.as_ref());
    let Some(scan) = &discovery.scan else {
        text.push_str("range scan: off (set discovery.scan, e.g. [\"192.168.1.0/24\"], to look for Ollama servers)\n");
        return text;
    };
    let ranges = scan.ranges.join(", ");
    let Some(at) = scan.scanned_at_ms else {
        let _ = writeln!(
            text,
            "range scan of {ranges} on port {}: not finished yet",
            scan.port
        );
        return text;
    };
    let _ = writeln!(
        text,
        "range scan of {ranges} on port {}: {} addresses, {} ago; {} Ollama server(s), {} other service(s)",
        scan.port,
        scan.addresses,
        human_duration(now_ms.saturating_sub(at)),
        scan.found.len(),
        scan.rejected.len()
    );
    for server in &scan.found {
        let _ = writeln!(
            text,
            "  found       {}  Ollama {} (a node: ollama@{})",
            server.address, server.version, server.address
        );
    }
    for other in &scan.rejected {
        let _ = writeln!(text, "  not Ollama  {}  {}", other.address, other.reason);
    }
    text
}

fn render_mdns(mdns: Option<&sollol_shared::api::MdnsDiscovery>) -> String {
    let mut text = String::new();
    let Some(mdns) = mdns else {
        text.push_str("mDNS: off (discovery.mdns = false)\n");
        return text;
    };
    let Some(instance) = &mdns.announced_as else {
        let _ = writeln!(
            text,
            "mDNS: not running: {}",
            mdns.error.as_deref().unwrap_or("unknown reason")
        );
        return text;
    };
    let _ = writeln!(
        text,
        "mDNS: announced as {instance}; {} peer(s)",
        mdns.peers.len()
    );
    for interface in &mdns.interfaces {
        if interface.answers == 0 {
            let _ = writeln!(
                text,
                "  mDNS: no answer on {} ({})",
                interface.name, interface.address
            );
        } else {
            let _ = writeln!(
                text,
                "  mDNS: {} answer(s) on {} ({})",
                interface.answers, interface.name, interface.address
            );
        }
    }
    for peer in &mdns.peers {
        let state = match (peer.role.as_str(), peer.joined, peer.has_token) {
            ("agent", true, _) => "agent, joined",
            ("agent", false, true) => "agent, discovered, not joined",
            ("agent", false, false) => "agent, discovered, not joined (it has no token)",
            _ => "another coordinator",
        };
        let address = peer.addresses.first().map_or("?", String::as_str);
        // An agent without a token listens on no port.
        let address = match peer.port {
            0 => address.to_owned(),
            port => format!("{address}:{port}"),
        };
        let _ = writeln!(
            text,
            "  {:<24} {address}  {state}  (sollol {}, runs {}, id {})",
            peer.name,
            peer.version,
            peer.roles.join(","),
            peer.node_id
        );
    }
    text
}

/// One line of a plan's progress: the phase, the elapsed time, and each stage (✓ once loaded).
pub fn render_progress(progress: &sollol_shared::api::PlanProgress) -> String {
    use sollol_shared::api::PlanPhase;
    let seconds = progress.elapsed_ms as f64 / 1e3;
    match progress.phase {
        PlanPhase::Describing => format!("describing the agents ({seconds:.1} s)"),
        PlanPhase::Loading => {
            let loaded = progress.stages.iter().filter(|stage| stage.loaded).count();
            let stages: Vec<String> = progress
                .stages
                .iter()
                .map(|stage| {
                    let fetched = fetched_text(stage);
                    format!(
                        "{} {}-{} {}{fetched}",
                        stage.name,
                        stage.layers_start,
                        stage.layers_end.saturating_sub(1),
                        if stage.loaded { "✓" } else { "…" }
                    )
                })
                .collect();
            format!(
                "loading the stages, {loaded} of {} ready ({seconds:.1} s): {}",
                progress.stages.len(),
                stages.join(", ")
            )
        }
    }
}

/// `, fetched 12 of 47 MiB` while a stage fetches its tensors from a peer, `, fetched 47 MiB` after.
pub fn fetched_text(stage: &sollol_shared::api::StageProgress) -> String {
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    match (stage.loaded, stage.fetched_bytes, stage.fetch_total_bytes) {
        (_, 0, 0) => String::new(),
        (false, done, total) if total > 0 => {
            format!(", fetched {:.0} of {:.0} MiB", mib(done), mib(total))
        }
        (_, done, _) => format!(", fetched {:.0} MiB", mib(done)),
    }
}

/// A progress line without its elapsed time, to print a line per change when not on a terminal.
pub(super) fn strip_elapsed(line: &str) -> String {
    match (line.find(" ("), line.find(" s)")) {
        (Some(start), Some(end)) if end > start => {
            format!("{}{}", &line[..start], &line[end + 3..])
        }
        _ => line.to_owned(),
    }
}

/// `sollol distribute` as text.
pub fn render_plan(status: &sollol_shared::api::DistributedModel, took: Duration) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "{} ({}) over {} stages, ready in {:.1} s",
        status.model,
        status.digest.as_deref().unwrap_or("digest unknown"),
        status.stages.len(),
        took.as_secs_f64()
    );
    let _ = writeln!(
        text,
        "  {:<5} {:<20} {:<9} {:<22} {:>9}",
        "stage", "node", "layers", "also", "resident"
    );
    for (index, stage) in status.stages.iter().enumerate() {
        let mut roles = Vec::new();
        if stage.embed {
            roles.push("embeddings");
        }
        if stage.head {
            roles.push("head, sampling");
        }
        let _ = writeln!(
            text,
            "  {:<5} {:<20} {:<9} {:<22} {:>5} MiB",
            index + 1,
            stage.name,
            format!(
                "{}-{}",
                stage.layers_start,
                stage.layers_end.saturating_sub(1)
            ),
            roles.join(", "),
            stage.resident_bytes >> 20
        );
    }
    if !status.reasons.is_empty() {
        let _ = writeln!(text, "why:");
        for reason in &status.reasons {
            let _ = writeln!(text, "  - {reason}");
        }
    }
    text
}

/// The start-up banner of `sollol up` and `sollol coordinator`; `join_host` is the host other nodes
/// join on, and `token` the cluster token they need.
pub(super) fn render_banner(
    gateway: SocketAddr,
    cluster: SocketAddr,
    join_host: &str,
    data_dir: &Path,
    token: &str,
) -> String {
    let gateway = config::loopback_if_unspecified(gateway);
    let mut text = String::new();
    let _ = writeln!(text, "sollol {BUILD_VERSION} is running");
    let _ = writeln!(text, "  Gateway:   http://{gateway}  (Ollama API)");
    let _ = writeln!(text, "  Dashboard: http://{gateway}/dashboard/");
    let _ = writeln!(text, "  Cluster:   {cluster}");
    let _ = writeln!(text, "  Data:      {}", data_dir.display());
    let token_file = data_dir.join("cluster-token");
    let _ = writeln!(
        text,
        "Join other nodes: put the token in a file there that only the agent's user can read, then run"
    );
    let _ = writeln!(
        text,
        "  sollol agent --join {join_host}:{} --token-file ./cluster-token",
        cluster.port(),
    );
    let _ = writeln!(
        text,
        "  Token: {token}  (also in {}; `sollol token` prints it)",
        token_file.display()
    );
    let _ = writeln!(
        text,
        "Or, on a Linux node with systemd, install the agent as a service from a copy of this binary:"
    );
    let _ = writeln!(
        text,
        "  ./sollol install-script | sudo sh -s -- --binary ./sollol --join {join_host}:{} --token-file ./cluster-token",
        cluster.port(),
    );
    if cluster.ip().is_loopback() {
        let _ = writeln!(
            text,
            "  (the cluster port is loopback-only; set coordinator.cluster_bind to accept other machines)"
        );
    }
    text
}

/// `sollol status` as text.
pub fn render_status(summary: &ClusterSummary) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "coordinator  sollol {} (protocol v{}), up {}",
        summary.build_version,
        summary.protocol_version,
        human_duration(summary.uptime_ms)
    );
    let _ = writeln!(text, "gateway      {}", summary.gateway_address);
    let _ = writeln!(text, "cluster      {}", summary.cluster_address);
    let _ = writeln!(
        text,
        "nodes        {} known: {} up, {} suspect, {} down, {} left",
        summary.nodes_total,
        summary.nodes_up,
        summary.nodes_suspect,
        summary.nodes_down,
        summary.nodes_left
    );
    if summary.history_dropped > 0 {
        let _ = writeln!(
            text,
            "warning      {} history records dropped (writer behind)",
            summary.history_dropped
        );
    }
    for notice in &summary.notices {
        let _ = writeln!(text, "warning      {notice}");
    }
    text
}

/// `sollol nodes` as a table.
pub fn render_nodes(nodes: &[Node], now_ms: u64) -> String {
    if nodes.is_empty() {
        return "no nodes yet: start `sollol agent --join HOST:PORT --token TOKEN` on a machine\n"
            .to_owned();
    }
    let header = [
        "NAME",
        "STATUS",
        "CPU",
        "LOAD",
        "RAM USED/TOTAL",
        "GPUS",
        "TEMP",
        "OLLAMA",
        "LAST SEEN",
        "ID",
    ];
    let rows: Vec<[String; 10]> = nodes
        .iter()
        .map(|node| {
            let hardware = node.hardware.as_ref();
            let cpu = hardware.map_or("-".to_owned(), |hw| {
                format!("{} cores", hw.cpu.logical_cores)
            });
            let load = hardware.map_or("-".to_owned(), |hw| {
                format!("{:.2}", hw.cpu.load_average[0])
            });
            let ram = hardware.map_or("-".to_owned(), |hw| {
                let used = hw
                    .memory
                    .total_bytes
                    .saturating_sub(hw.memory.available_bytes);
                format!("{}/{}", gib(used), gib(hw.memory.total_bytes))
            });
            let gpus = hardware.map_or("-".to_owned(), |hw| {
                if hw.gpus.is_empty() {
                    "none".to_owned()
                } else {
                    hw.gpus
                        .iter()
                        .map(|gpu| {
                            format!(
                                "{} {}/{}",
                                gpu.name,
                                gib(gpu.vram_used_bytes),
                                gib(gpu.vram_total_bytes)
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            });
            let temperature = hardware
                .and_then(|hw| {
                    hw.temperatures
                        .iter()
                        .map(|reading| reading.celsius)
                        .reduce(f32::max)
                })
                .map_or("-".to_owned(), |celsius| format!("{celsius:.0}°C"));
            let ollama = match &node.ollama {
                None => "-".to_owned(),
                Some(state) if !state.reachable => "unreachable".to_owned(),
                Some(state) => format!(
                    "{} models, {} loaded",
                    state.models.len(),
                    state.loaded.len()
                ),
            };
            let last_seen = format!(
                "{} ago",
                human_duration(now_ms.saturating_sub(node.last_seen_ms))
            );
            [
                node.name.clone(),
                node.status.as_str().to_owned(),
                cpu,
                load,
                ram,
                gpus,
                temperature,
                ollama,
                last_seen,
                node.id.chars().take(8).collect(),
            ]
        })
        .collect();
    let mut table_rows = vec![header.map(str::to_owned).to_vec()];
    table_rows.extend(rows.into_iter().map(|row| row.to_vec()));
    table(&table_rows)
}

/// Rows as left-aligned columns two spaces apart, the first row being the header.
pub(super) fn table(rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        widths.resize(widths.len().max(row.len()), 0);
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in rows {
        let padded: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(text, "{}", padded.join("  ").trim_end());
    }
    text
}

fn gib(bytes: u64) -> String {
    format!("{:.1}G", bytes as f64 / (1024.0 * 1024.0 * 1024.0))
}

fn human_duration(ms: u64) -> String {
    let seconds = ms / 1000;
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{}s", seconds / 60, seconds % 60),
        3600..86400 => format!("{}h{}m", seconds / 3600, seconds % 3600 / 60),
        _ => format!("{}d{}h", seconds / 86400, seconds % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn text_from_the_network_cannot_drive_the_terminal() {
        use super::terminal_safe;
        assert_eq!(terminal_safe("node-1\tup\n"), "node-1\tup\n");
        // Set the window title, clear the screen, write the clipboard, reorder the text.
        assert_eq!(
            terminal_safe("lab\u{1b}]0;pwned\u{7}"),
            "lab\\u{1b}]0;pwned\\u{7}"
        );
        assert_eq!(terminal_safe("\u{1b}[2J"), "\\u{1b}[2J");
        assert_eq!(terminal_safe("a\u{9b}b\rc"), "a\\u{9b}b\\u{d}c");
        assert_eq!(terminal_safe("gpu\u{202e}1-edon"), "gpu\\u{202e}1-edon");
        assert_eq!(terminal_safe("naïve 节点"), "naïve 节点");
    }

    #[test]
    fn mdns_status_names_silent_interfaces_and_peers_that_cannot_join() {
        use sollol_shared::api::{MdnsDiscovery, MdnsInterface, MdnsPeer};
        assert_eq!(
            super::render_mdns(None),
            "mDNS: off (discovery.mdns = false)\n"
        );
        let failed = MdnsDiscovery {
            error: Some("not announced: the cluster port (127.0.0.1:11436) is reachable from this machine only".to_owned()),
            ..MdnsDiscovery::default()
        };
        assert_eq!(
            super::render_mdns(Some(&failed)),
            "mDNS: not running: not announced: the cluster port (127.0.0.1:11436) is reachable from this machine only\n"
        );
        let peer = |name: &str, joined, has_token| MdnsPeer {
            instance: format!("{name}-01234567._sollol._tcp.local."),
            node_id: "0123456789abcdef".to_owned(),
            name: name.to_owned(),
            role: "agent".to_owned(),
            roles: if has_token {
                vec!["agent".to_owned(), "stage".to_owned()]
            } else {
                vec!["agent".to_owned()]
            },
            version: "0.1.0".to_owned(),
            addresses: vec!["192.168.1.23".to_owned()],
            port: if has_token { 7703 } else { 0 },
            has_token,
            joined,
        };
        let running = MdnsDiscovery {
            announced_as: Some("lab-89abcdef._sollol._tcp.local.".to_owned()),
            error: None,
            interfaces: vec![
                MdnsInterface {
                    name: "eth0".to_owned(),
                    address: "192.168.1.2/24".to_owned(),
                    answers: 2,
                },
                MdnsInterface {
                    name: "wlan0".to_owned(),
                    address: "10.0.0.2/24".to_owned(),
                    answers: 0,
                },
            ],
            peers: vec![peer("pi-left", false, true), peer("pi-right", false, false)],
        };
        let text = super::render_mdns(Some(&running));
        for line in [
            "mDNS: announced as lab-89abcdef._sollol._tcp.local.; 2 peer(s)",
            "  mDNS: 2 answer(s) on eth0 (192.168.1.2/24)",
            "  mDNS: no answer on wlan0 (10.0.0.2/24)",
            "  pi-left                  192.168.1.23:7703  agent, discovered, not joined  (sollol 0.1.0, runs agent,stage, id 0123456789abcdef)",
            "  pi-right                 192.168.1.23  agent, discovered, not joined (it has no token)  (sollol 0.1.0, runs agent, id 0123456789abcdef)",
        ] {
            assert!(
                text.lines().any(|have| have == line),
                "{line:?} missing from:\n{text}"
            );
        }
    }

    #[test]
    fn plan_progress_reads_as_one_line() {
        use sollol_shared::api::{PlanPhase, PlanProgress, StageProgress};
        let stage =
            |name: &str, start, end, loaded, (fetched_bytes, fetch_total_bytes)| StageProgress {
                name: name.to_owned(),
                layers_start: start,
                layers_end: end,
                loaded,
                fetched_bytes,
                fetch_total_bytes,
            };
        let describing = PlanProgress {
            phase: PlanPhase::Describing,
            elapsed_ms: 300,
            stages: Vec::new(),
        };
        assert_eq!(
            render_progress(&describing),
            "describing the agents (0.3 s)"
        );
        let loading = PlanProgress {
            phase: PlanPhase::Loading,
            elapsed_ms: 2_340,
            stages: vec![
                stage("left", 0, 15, true, (48 << 20, 48 << 20)),
                stage("right", 15, 30, false, (12 << 20, 47 << 20)),
                stage("more", 30, 40, false, (0, 0)),
            ],
        };
        let line = render_progress(&loading);
        assert_eq!(
            line,
            "loading the stages, 1 of 3 ready (2.3 s): left 0-14 ✓, fetched 48 MiB, right 15-29 …, fetched 12 of 47 MiB, more 30-39 …"
        );
        assert_eq!(
            strip_elapsed(&line),
            "loading the stages, 1 of 3 ready: left 0-14 ✓, fetched 48 MiB, right 15-29 …, fetched 12 of 47 MiB, more 30-39 …"
        );
    }

    use super::*;

    #[test]
    fn durations_read_well() {
        fn check(ms: u64, expected: &str) {
            assert_eq!(human_duration(ms), expected);
        }
        check(999, "0s");
        check(59_000, "59s");
        check(61_000, "1m1s");
        check(3_600_000 + 120_000, "1h2m");
        check(90_000_000, "1d1h");
    }

    #[test]
    fn empty_node_table_says_how_to_add_one() {
        assert!(render_nodes(&[], 0).contains("sollol agent --join"));
    }

    #[test]
    fn banner_names_a_reachable_gateway_and_how_to_join() {
        let gateway: SocketAddr = "0.0.0.0:11435".parse().expect("address");
        let cluster: SocketAddr = "127.0.0.1:11436".parse().expect("address");
        let text = render_banner(
            gateway,
            cluster,
            "lab",
            Path::new("/srv/sollol"),
            "0123456789abcdef",
        );
        for line in [
            "  Gateway:   http://127.0.0.1:11435  (Ollama API)",
            "  Dashboard: http://127.0.0.1:11435/dashboard/",
            "  Cluster:   127.0.0.1:11436",
            "  Data:      /srv/sollol",
            "  sollol agent --join lab:11436 --token-file ./cluster-token",
            "  Token: 0123456789abcdef  (also in /srv/sollol/cluster-token; `sollol token` prints it)",
            "  (the cluster port is loopback-only; set coordinator.cluster_bind to accept other machines)",
        ] {
            assert!(
                text.lines().any(|have| have == line),
                "{line:?} missing from:\n{text}"
            );
        }
    }
}
