//! Snapshot tests: the JSON of each public API type, and the postcard compatibility rules of the protocol.
//!
//! Run with `UPDATE_SNAPSHOTS=1` to rewrite `snapshots/*.json` after a deliberate change.

use std::path::PathBuf;

use serde::Serialize;
use sollol_shared::api::{
    Aggregate, CandidateCost, ClusterSummary, DistributedList, DistributedModel, ErrorBody,
    HardwareSample, LiveEvent, Node, NodeDetail, NodeEvent, NodeEventKind, NodeList, NodeLoad,
    NodeStatus, Percentiles, PipelineStage, Readiness, RequestEntry, RequestList, RequestStatus,
    RoutingDecision, SeriesPoint, Stats, StatsWindow, Transfer, TransferState,
};
use sollol_shared::hardware::{
    CpuInfo, DiskInfo, GpuInfo, GpuVendor, HardwareReport, MemoryInfo, NodeReport,
    OllamaLoadedModel, OllamaModel, OllamaState, TemperatureReading,
};
use sollol_shared::protocol::{
    AgentMessage, Hello, HelloPrefix, HelloReply, PROTOCOL_VERSION, Refusal, RefusalCode,
};

fn check<T: Serialize>(name: &str, value: &T) {
    let actual = serde_json::to_string_pretty(value).expect("serialize") + "\n";
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("snapshots/{name}.json"));
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &actual).expect("write snapshot");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|error| {
        panic!(
            "missing snapshot {}: {error}; run with UPDATE_SNAPSHOTS=1",
            path.display()
        )
    });
    assert_eq!(
        actual, expected,
        "JSON of {name} changed: review it, then run with UPDATE_SNAPSHOTS=1"
    );
}

fn example_hardware() -> HardwareReport {
    HardwareReport {
        cpu: CpuInfo {
            model: "AMD Ryzen 7 5800X 8-Core Processor".into(),
            architecture: "x86_64".into(),
            logical_cores: 16,
            load_average: [0.5, 0.25, 0.125],
            utilisation_percent: Some(12.5),
        },
        memory: MemoryInfo {
            total_bytes: 34_359_738_368,
            available_bytes: 17_179_869_184,
            swap_total_bytes: 2_147_483_648,
            swap_free_bytes: 2_147_483_648,
        },
        disk: Some(DiskInfo {
            path: "/var/lib/sollol/models".into(),
            total_bytes: 1_000_000_000_000,
            available_bytes: 400_000_000_000,
        }),
        temperatures: vec![TemperatureReading {
            sensor: "hwmon0 k10temp Tctl".into(),
            celsius: 48.5,
        }],
        gpus: vec![GpuInfo {
            vendor: GpuVendor::Nvidia,
            index: 0,
            name: "NVIDIA GeForce RTX 3060".into(),
            vram_total_bytes: 12_884_901_888,
            vram_used_bytes: 1_073_741_824,
            utilisation_percent: Some(3.0),
            temperature_celsius: Some(41.0),
        }],
    }
}

fn example_ollama() -> OllamaState {
    OllamaState {
        url: "http://127.0.0.1:11434".into(),
        reachable: true,
        error: None,
        version: Some("0.12.3".into()),
        models: vec![OllamaModel {
            name: "smollm2:135m".into(),
            size_bytes: 270_898_672,
            digest: "9077fe9d2ae1a4a41a868836b56b8163731a8fe16621397028c2c76f838c6907".into(),
            family: Some("llama".into()),
            parameter_size: Some("134.52M".into()),
            quantization_level: Some("F16".into()),
        }],
        loaded: vec![OllamaLoadedModel {
            name: "smollm2:135m".into(),
            size_bytes: 400_000_000,
            vram_bytes: 400_000_000,
            expires_at: Some("2026-11-28T12:05:00Z".into()),
        }],
    }
}

fn example_node() -> Node {
    Node {
        id: "5f0c2a9e7d4b41c8a3e1f6b2d9c07e15".into(),
        name: "gpu-desktop".into(),
        status: NodeStatus::Up,
        addresses: vec!["192.0.2.10:51234".into()],
        build_version: "0.1.0".into(),
        protocol_version: 1,
        first_seen_ms: 1_795_000_000_000,
        last_seen_ms: 1_795_000_042_000,
        heartbeat_interval_ms: 2000,
        connected: true,
        hardware: Some(example_hardware()),
        ollama: Some(example_ollama()),
        stage_address: Some("192.0.2.10:7703".into()),
        memory_limit_bytes: None,
    }
}

#[test]
fn node_list_json() {
    check(
        "node_list",
        &NodeList {
            nodes: vec![example_node()],
            load: [(example_node().id, NodeLoad { in_flight: 2 })].into(),
        },
    );
}

#[test]
fn node_detail_json() {
    check(
        "node_detail",
        &NodeDetail {
            node: example_node(),
            events: vec![NodeEvent {
                at_ms: 1_795_000_000_000,
                kind: NodeEventKind::Joined,
                detail: "from 192.0.2.10:51234".into(),
            }],
            load: NodeLoad { in_flight: 1 },
            samples: vec![HardwareSample::of(1_795_000_042_000, &example_hardware())],
            requests: vec![example_request()],
        },
    );
}

fn example_request() -> RequestEntry {
    RequestEntry {
        id: 42,
        at_ms: 1_795_000_042_000,
        node_id: "5f0c2a9e7d4b41c8a3e1f6b2d9c07e15".into(),
        node: "gpu-desktop".into(),
        model: "smollm2:135m".into(),
        path: "/api/chat".into(),
        app: "open-webui".into(),
        status: RequestStatus::Ok,
        prompt_tokens: Some(26),
        output_tokens: Some(48),
        time_to_first_byte_ms: 180,
        time_to_first_token_ms: Some(120),
        total_ms: 520,
        load_ms: Some(0),
        tokens_per_second: Some(120.5),
        decision: RoutingDecision {
            strategy: "intelligent".into(),
            reason: "lowest predicted time 510ms".into(),
            candidates: vec![
                CandidateCost {
                    node: "gpu-desktop".into(),
                    predicted_ms: 510,
                },
                CandidateCost {
                    node: "old-laptop".into(),
                    predicted_ms: 4300,
                },
            ],
        },
    }
}

#[test]
fn request_list_json() {
    check(
        "request_list",
        &RequestList {
            requests: vec![example_request()],
        },
    );
}

#[test]
fn stats_json() {
    let latency = Some(Percentiles {
        p50: 480,
        p95: 900,
        p99: 1200,
    });
    let aggregate = |key: &str| Aggregate {
        key: key.into(),
        requests: 10,
        errors: 1,
        error_rate: 0.1,
        latency_ms: latency,
        time_to_first_token_ms: Some(Percentiles {
            p50: 100,
            p95: 200,
            p99: 250,
        }),
        output_tokens: 400,
        tokens_per_second: Some(118.2),
        last_at_ms: 1_795_000_042_000,
    };
    check(
        "stats",
        &Stats {
            window: StatsWindow::FiveMinutes,
            since_ms: 1_795_000_000_000,
            until_ms: 1_795_000_300_000,
            bucket_ms: 5000,
            total: aggregate("all"),
            by_node: vec![aggregate("gpu-desktop")],
            by_model: vec![aggregate("smollm2:135m")],
            by_app: vec![aggregate("open-webui")],
            series: vec![SeriesPoint {
                at_ms: 1_795_000_295_000,
                requests: 10,
                errors: 1,
                latency_ms: latency,
                time_to_first_token_ms: None,
                tokens_per_second: 80.0,
            }],
        },
    );
}

#[test]
fn live_events_json() {
    check(
        "live_events",
        &[
            LiveEvent::Node {
                node: example_node(),
                load: NodeLoad { in_flight: 1 },
            },
            LiveEvent::Routed {
                at_ms: 1_795_000_041_500,
                model: "smollm2:135m".into(),
                path: "/api/chat".into(),
                app: "open-webui".into(),
                node: "gpu-desktop".into(),
                decision: example_request().decision,
            },
            LiveEvent::Finished {
                request: example_request(),
            },
            LiveEvent::Transfer {
                transfer: Transfer {
                    started_ms: 1_795_000_041_000,
                    model: "llama3.2:3b".into(),
                    digest: format!("sha256:{}", "ab".repeat(32)),
                    source: "gpu-desktop".into(),
                    target: "pi-5".into(),
                    done_bytes: 1 << 30,
                    total_bytes: 2 << 30,
                    state: TransferState::Copying,
                    duration_ms: 2_500,
                    error: None,
                },
            },
            LiveEvent::Lagged { skipped: 3 },
        ],
    );
}

#[test]
fn stats_windows_round_trip_through_their_names() {
    for window in StatsWindow::ALL {
        assert_eq!(StatsWindow::parse(window.as_str()), Some(window));
        assert_eq!(
            serde_json::to_string(&window).expect("serialize"),
            format!("\"{}\"", window.as_str())
        );
        assert_eq!(window.millis() / window.bucket_millis(), 60);
    }
}

#[test]
fn cluster_summary_json() {
    check(
        "cluster_summary",
        &ClusterSummary {
            build_version: "0.1.0".into(),
            protocol_version: 1,
            started_at_ms: 1_795_000_000_000,
            uptime_ms: 60_000,
            gateway_address: "127.0.0.1:11435".into(),
            cluster_address: "0.0.0.0:11436".into(),
            nodes_total: 3,
            nodes_up: 2,
            nodes_suspect: 0,
            nodes_down: 1,
            nodes_left: 0,
            cluster_connections: 2,
            history_dropped: 0,
            in_flight: 3,
            queued: 0,
            notices: Vec::new(),
        },
    );
}

#[test]
fn error_and_readiness_json() {
    check(
        "error",
        &ErrorBody {
            error: "node \"x\" not found".into(),
        },
    );
    check(
        "readiness",
        &Readiness {
            ready: true,
            detail: "ready".into(),
        },
    );
}

#[test]
fn node_event_kinds_round_trip_through_their_names() {
    for kind in [
        NodeEventKind::Joined,
        NodeEventKind::Up,
        NodeEventKind::Suspect,
        NodeEventKind::Down,
        NodeEventKind::Left,
    ] {
        assert_eq!(NodeEventKind::parse(kind.as_str()), Some(kind));
        assert_eq!(
            serde_json::to_string(&kind).expect("serialize"),
            format!("\"{}\"", kind.as_str())
        );
    }
    assert_eq!(NodeEventKind::parse("exploded"), None);
}

/// A hello from a later protocol version, with fields this build does not know, still yields its version.
#[test]
fn hello_prefix_reads_any_versions_hello() {
    #[derive(Serialize)]
    struct FutureHello {
        protocol_version: u32,
        build_version: String,
        capabilities: Vec<String>,
        weight: f64,
    }
    let bytes = postcard::to_stdvec(&FutureHello {
        protocol_version: 7,
        build_version: "9.0.0".into(),
        capabilities: vec!["quantum".into()],
        weight: 1.5,
    })
    .expect("encode");
    let (prefix, _rest): (HelloPrefix, _) = postcard::take_from_bytes(&bytes).expect("prefix");
    assert_eq!(
        prefix,
        HelloPrefix {
            protocol_version: 7,
            build_version: "9.0.0".into()
        }
    );

    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        build_version: "0.1.0".into(),
        node_id: "n".into(),
        node_name: "name".into(),
        heartbeat_interval_ms: 2000,
    };
    let bytes = postcard::to_stdvec(&hello).expect("encode");
    let (prefix, _rest): (HelloPrefix, _) = postcard::take_from_bytes(&bytes).expect("prefix");
    assert_eq!(prefix.protocol_version, PROTOCOL_VERSION);
}

/// Refusals are variant 0 with a fixed shape: these bytes must never change.
#[test]
fn refusal_bytes_are_frozen() {
    let refusal = Refusal {
        code: RefusalCode::IncompatibleVersion,
        message: "v".into(),
    };
    let bytes = postcard::to_stdvec(&HelloReply::Refused(refusal.clone())).expect("encode");
    assert_eq!(bytes, vec![0, 3, 1, b'v']);
    let decoded: HelloReply = postcard::from_bytes(&bytes).expect("decode");
    assert_eq!(decoded, HelloReply::Refused(refusal));
}

#[test]
fn reports_round_trip_through_postcard() {
    let message = AgentMessage::Report(Box::new(NodeReport {
        sampled_at_ms: 1,
        hardware: example_hardware(),
        ollama: Some(example_ollama()),
        stage_address: Some("0.0.0.0:7703".into()),
        memory_limit_bytes: None,
    }));
    let bytes = postcard::to_stdvec(&message).expect("encode");
    assert!(bytes.len() < 1024, "a report is {} bytes", bytes.len());
    let decoded: AgentMessage = postcard::from_bytes(&bytes).expect("decode");
    assert_eq!(decoded, message);
}

#[test]
fn distributed_list_json() {
    let stage = |name: &str, start: u32, end: u32| PipelineStage {
        node_id: format!("{name:0>32}"),
        name: name.into(),
        address: "192.0.2.10:7703".into(),
        layers_start: start,
        layers_end: end,
        embed: start == 0,
        head: end == 30,
        resident_bytes: 80 << 20,
        free_memory_bytes: 8 << 30,
        compute_ms_per_token: Some(6.1),
    };
    check(
        "distributed_list",
        &DistributedList {
            models: vec![DistributedModel {
                model: "smollm2:135m".into(),
                planned: true,
                digest: Some(
                    "sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
                        .into(),
                ),
                layers: 30,
                stages: vec![stage("pi-one", 0, 15), stage("pi-two", 15, 30)],
                reasons: vec!["pi-one: layers 0..15 (8192 MiB free), embeddings".into()],
                tokens: 64,
                tokens_per_second: Some(56.9),
                hop_ms: Some(0.4),
                bytes_per_token: Some(2362.0),
                replans: 0,
                last_error: None,
                planning: None,
            }],
        },
    );
}

#[test]
fn coordinator_list_and_learned_json() {
    use sollol_shared::api::{
        CoordinatorInfo, CoordinatorList, CoordinatorState, LearnedList, LearnedPair,
    };
    let this = CoordinatorInfo {
        id: "0123456789abcdef0123456789abcdef".into(),
        name: "c1".into(),
        gateway_url: "http://10.0.0.1:11435".into(),
        cluster_address: "10.0.0.1:11436".into(),
        state: CoordinatorState::This,
        started_at_ms: 1_795_000_000_000,
        leader: true,
        in_flight: 2,
        learned_pairs: 6,
        detail: None,
    };
    let refused = CoordinatorInfo {
        id: "fedcba9876543210fedcba9876543210".into(),
        name: String::new(),
        gateway_url: String::new(),
        cluster_address: "10.0.0.3:11436".into(),
        state: CoordinatorState::Refused,
        started_at_ms: 0,
        leader: false,
        in_flight: 0,
        learned_pairs: 0,
        detail: Some("configuration differs from coordinator fedcba9876543210fedcba9876543210's in: models.replicas; every coordinator of a cluster needs the same values there (compare `sollol print-config` on both)".into()),
    };
    check(
        "coordinator_list",
        &CoordinatorList {
            this: this.id.clone(),
            coordinators: vec![this, refused],
        },
    );
    check(
        "learned_list",
        &LearnedList {
            pairs: vec![LearnedPair {
                node_id: "0123456789abcdef0123456789abcdef".into(),
                model: "llama3.2:1b".into(),
                decode_tokens_per_second: 41.5,
                prompt_tokens_per_second: 415.0,
                time_to_first_token_ms: 120.25,
                cold_load_ms: Some(2100.0),
                samples: 7,
                coordinators: 2,
            }],
        },
    );
}
