//! The Ollama/OpenAI gateway in front of emulated Ollama nodes, each behind a real agent: routing, streaming, failover, errors.

use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use sollol::app::{self, AgentHandle, CoordinatorHandle};
use sollol_ollama_emulator::{Emulator, EmulatorConfig, Fault, embedding_of};

mod support;

use support::cluster::{Cluster, cluster_with, config};
use support::{Answer, get, post, send};

/// Nodes fast, mid and slow: decode 2000, 400 and 100 tokens/s.
async fn cluster() -> Cluster {
    let nodes =
        [("fast", 2000.0), ("mid", 400.0), ("slow", 100.0)].map(|(name, speed)| EmulatorConfig {
            name: name.to_owned(),
            decode_tokens_per_second: speed,
            prompt_tokens_per_second: speed * 10.0,
            ..EmulatorConfig::default()
        });
    cluster_with(&[], &nodes).await
}

/// Sends each request with round robin, so every node gets measured, and waits until the learner has folded in every outcome.
async fn teach(cluster: &Cluster, requests: &[Value]) {
    let served_before: u64 = cluster.coordinator.learned().served.values().sum();
    for request in requests {
        let body = serde_json::to_vec(request).expect("json");
        let answer = send(
            "POST",
            &cluster.url("/api/chat"),
            body,
            &[("x-sollol-strategy", "round_robin")],
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    until_learned(cluster, served_before + requests.len() as u64).await;
}

/// Waits until the learner has folded in `served` outcomes in all (it learns in the background, a
/// moment after each answer).
async fn until_learned(cluster: &Cluster, served: u64) {
    let started = Instant::now();
    while cluster.coordinator.learned().served.values().sum::<u64>() < served {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the learner never caught up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn lines(answer: &Answer) -> Vec<Value> {
    answer
        .text()
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("bad NDJSON line {line:?}: {error}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_and_openai_routes_through_the_gateway() {
    let cluster = cluster().await;

    // Non-streaming chat: Ollama's shape, the node and decision in headers.
    let answer = post(
        &cluster.url("/api/chat"),
        json!({"model": "smollm2:135m", "stream": false, "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 4}}),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let body = answer.json();
    assert_eq!(body["message"]["content"], "tok0 tok1 tok2 tok3 ");
    assert_eq!(body["done"], true);
    assert_eq!(body["eval_count"], 4);
    assert!(answer.node.is_some() && answer.decision.is_some());

    // Streaming is the default: NDJSON chunks, the last one done with timings.
    let answer = post(
        &cluster.url("/api/chat"),
        json!({"model": "smollm2:135m", "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 5}}),
    )
    .await;
    let chunks = lines(&answer);
    assert_eq!(chunks.len(), 6, "{}", answer.text());
    assert_eq!(chunks[0]["message"]["content"], "tok0 ");
    assert_eq!(chunks[5]["done"], true);
    assert!(chunks[5]["eval_duration"].as_u64().is_some());

    let answer = post(
        &cluster.url("/api/generate"),
        json!({"model": "smollm2:135m", "prompt": "hi", "options": {"num_predict": 3}}),
    )
    .await;
    let chunks = lines(&answer);
    assert_eq!(
        chunks
            .iter()
            .filter_map(|chunk| chunk["response"].as_str())
            .collect::<String>(),
        "tok0 tok1 tok2 "
    );

    // OpenAI: non-streaming and SSE.
    let answer = post(
        &cluster.url("/v1/chat/completions"),
        json!({"model": "smollm2:135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    )
    .await;
    assert_eq!(
        answer.json()["choices"][0]["message"]["content"],
        "tok0 tok1 "
    );
    let answer = post(
        &cluster.url("/v1/chat/completions"),
        json!({"model": "smollm2:135m", "stream": true, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    )
    .await;
    let text = answer.text();
    assert!(text.starts_with("data: {"), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    // Embeddings come back from a node, in input order.
    let answer = post(
        &cluster.url("/api/embed"),
        json!({"model": "nomic-embed-text", "input": ["a", "b", "c"]}),
    )
    .await;
    let embeddings = answer.json()["embeddings"].clone();
    for (index, input) in ["a", "b", "c"].iter().enumerate() {
        let expected = embedding_of("nomic-embed-text:latest", input, 8);
        let actual: Vec<f32> = serde_json::from_value(embeddings[index].clone()).expect("floats");
        assert_eq!(actual, expected, "embedding {index}");
    }

    // Listing routes come from the cluster view.
    let tags = get(&cluster.url("/api/tags")).await.json();
    let names: Vec<&str> = tags["models"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|model| model["name"].as_str())
        .collect();
    assert_eq!(names, vec!["nomic-embed-text:latest", "smollm2:135m"]);
    assert_eq!(
        get(&cluster.url("/api/version")).await.json()["version"],
        "0.12.3"
    );
    assert_eq!(
        get(&cluster.url("/v1/models")).await.json()["data"]
            .as_array()
            .expect("list")
            .len(),
        2
    );
    let show = post(&cluster.url("/api/show"), json!({"model": "smollm2:135m"})).await;
    assert_eq!(show.json()["details"]["family"], "llama");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_ollama_errors() {
    let cluster = cluster().await;
    fn check(answer: &Answer, status: u16, needle: &str) {
        assert_eq!(answer.status, status, "{}", answer.text());
        let error = answer.json()["error"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_default();
        assert!(error.contains(needle), "{error:?} lacks {needle:?}");
    }
    check(
        &send(
            "POST",
            &cluster.url("/api/chat"),
            b"{not json".to_vec(),
            &[],
        )
        .await,
        400,
        "invalid JSON",
    );
    check(
        &post(&cluster.url("/api/chat"), json!(["array"])).await,
        400,
        "JSON object",
    );
    check(
        &post(&cluster.url("/api/chat"), json!({"messages": []})).await,
        400,
        "model is required",
    );
    check(
        &post(&cluster.url("/api/chat"), json!({"model": "nope:1b"})).await,
        404,
        "model \"nope:1b\" not found, try pulling it first",
    );
    check(
        &send(
            "POST",
            &cluster.url("/api/chat"),
            serde_json::to_vec(&json!({"model": "smollm2:135m"})).expect("json"),
            &[("x-sollol-strategy", "fastest")],
        )
        .await,
        400,
        "unknown routing strategy",
    );
    check(
        &post(
            &cluster.url("/api/chat"),
            json!({"model": "smollm2:135m", "pad": "x".repeat(70_000)}),
        )
        .await,
        413,
        "",
    );
    cluster.stop().await;
}

/// An answer read whole larger than `coordinator.max_response_body` is a 502 that names the limit,
/// not a coordinator holding it in memory, and the node stays healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_answers_are_refused_not_buffered() {
    let cluster = cluster_with(
        &[("coordinator.max_response_body", "4KiB")],
        &[EmulatorConfig {
            name: "only".to_owned(),
            ..EmulatorConfig::default()
        }],
    )
    .await;
    let small = post(
        &cluster.url("/api/generate"),
        json!({"model": "smollm2:135m", "prompt": "hi", "stream": false, "options": {"num_predict": 4}}),
    )
    .await;
    assert_eq!(small.status, 200, "{}", small.text());
    let large = post(
        &cluster.url("/api/generate"),
        json!({"model": "smollm2:135m", "prompt": "hi", "stream": false, "options": {"num_predict": 5000}}),
    )
    .await;
    assert_eq!(large.status, 502, "{}", large.text());
    let error = large.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(error.contains("max_response_body"), "{error}");
    // Streamed, the same answer passes through.
    let streamed = post(
        &cluster.url("/api/generate"),
        json!({"model": "smollm2:135m", "prompt": "hi", "options": {"num_predict": 5000}}),
    )
    .await;
    assert_eq!(streamed.status, 200);
    assert!(streamed.body.len() > 4096, "{}", streamed.body.len());
    cluster.stop().await;
}

/// An upload that stops halfway is answered 408 once it has been idle for `body_read_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_uploads_time_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = cluster_with(
        &[("coordinator.body_read_timeout", "300ms")],
        &[EmulatorConfig {
            name: "only".to_owned(),
            ..EmulatorConfig::default()
        }],
    )
    .await;
    let mut stalled = tokio::net::TcpStream::connect(cluster.coordinator.gateway_address)
        .await
        .expect("connect");
    stalled
        .write_all(b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\": \"smollm2")
        .await
        .expect("write");
    let started = Instant::now();
    // Others are served while the upload stalls.
    let answer = post(
        &cluster.url("/api/chat"),
        json!({"model": "smollm2:135m", "stream": false, "messages": []}),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stalled.read_to_end(&mut reply)).await;
    assert!(read.is_ok(), "the stalled upload was never answered");
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(
        reply.contains(r#"{"error":"#) && reply.contains("stopped arriving"),
        "{reply}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "timed out too early: {:?}",
        started.elapsed()
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_nodes_are_skipped() {
    let cluster = cluster().await;
    let chat = || json!({"model": "smollm2:135m", "stream": false, "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 2}});
    // Two of three nodes answer 500 or are gone: every request still succeeds, on the healthy one.
    cluster.emulators[0].set_fault(Fault::InternalError);
    cluster.emulators[1].kill();
    for _ in 0..6 {
        let answer = post(&cluster.url("/api/chat"), chat()).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.node.as_deref(), Some("slow"));
    }
    // A node that dies mid-answer: non-streaming answers are retried elsewhere.
    cluster.emulators[0].set_fault(Fault::DropMidStream { after_tokens: 1 });
    for _ in 0..3 {
        let answer = post(&cluster.url("/api/chat"), chat()).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    // Streaming answers that break after they began end with an error object, not a hang.
    cluster.emulators[2].set_fault(Fault::DropMidStream { after_tokens: 2 });
    cluster.emulators[0].set_fault(Fault::DropMidStream { after_tokens: 2 });
    let answer = post(
        &cluster.url("/api/chat"),
        json!({"model": "smollm2:135m", "messages": [], "options": {"num_predict": 5}}),
    )
    .await;
    let chunks = lines(&answer);
    let (last, before) = chunks.split_last().expect("chunks");
    assert!(
        !before.is_empty() && before.iter().all(|chunk| chunk.get("error").is_none()),
        "{}",
        answer.text()
    );
    assert!(
        last["error"]
            .as_str()
            .is_some_and(|error| error.contains("failed mid-stream")),
        "{}",
        answer.text()
    );
    // Every node failing before answering: a 502 that names each node tried and why.
    // ("fast" failed three times above, so its breaker is open and it is not tried.)
    cluster.emulators[0].set_fault(Fault::InternalError);
    cluster.emulators[2].set_fault(Fault::InternalError);
    let answer = post(&cluster.url("/api/chat"), chat()).await;
    assert_eq!(answer.status, 502, "{}", answer.text());
    let error = answer.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        error.starts_with("every node tried failed") && error.contains("slow: HTTP 500"),
        "{error}"
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_learns_and_prefers_the_fast_node() {
    let cluster = cluster().await;
    let chat = json!({"model": "smollm2:135m", "stream": false, "messages": [{"role": "user", "content": "hello there"}], "options": {"num_predict": 20}});
    // Round robin measures every node once or more.
    teach(&cluster, &vec![chat.clone(); 6]).await;
    let started = Instant::now();
    loop {
        let learned = cluster.coordinator.learned();
        if learned.pairs.len() >= 3 {
            let fast = cluster
                .coordinator
                .view()
                .backends
                .iter()
                .find(|backend| backend.name == "fast")
                .expect("fast")
                .node_id
                .clone();
            let stats = learned.pair(&fast, "smollm2:135m").expect("fast learned");
            assert!(stats.decode_tokens_per_second > 1000.0, "{stats:?}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "nothing learned"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Sequential requests under the intelligent strategy go to the fastest node.
    for _ in 0..5 {
        let answer = post(&cluster.url("/api/chat"), chat.clone()).await;
        assert_eq!(
            answer.node.as_deref(),
            Some("fast"),
            "{:?}",
            answer.decision
        );
    }
    cluster.stop().await;
}

/// The official `ollama` and `openai` Python packages, from the virtual environment `scripts/test` creates.
/// Requests through the gateway show up in `/metrics` (parsed by Prometheus's own Python parser), in the
/// live event stream, in `/requests` (filterable) and in `/stats`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observability_counts_every_request() {
    use tokio::io::AsyncWriteExt;
    let (python, root) = (support::test_python(), support::root());
    let nodes = [("fast", 2000.0), ("slow", 400.0)].map(|(name, speed)| EmulatorConfig {
        name: name.to_owned(),
        decode_tokens_per_second: speed,
        ..EmulatorConfig::default()
    });
    let cluster = cluster_with(&[("coordinator.calibration", "false")], &nodes).await;
    // Subscribe to the live events before sending anything.
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let events = client
        .get(cluster.url("/api/sollol/v1/events").parse().expect("uri"))
        .await
        .expect("event stream");
    assert_eq!(events.status(), 200);
    assert_eq!(
        events.headers()["content-type"].to_str().ok(),
        Some("text/event-stream")
    );
    let (seen_sender, mut seen) = tokio::sync::watch::channel(String::new());
    tokio::spawn(async move {
        let mut body = events.into_body();
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                seen_sender.send_modify(|text| text.push_str(&String::from_utf8_lossy(&data)));
            }
        }
    });

    const SENT: usize = 12;
    for index in 0..SENT {
        let answer = send(
            "POST",
            &cluster.url("/api/chat"),
            serde_json::to_vec(&json!({"model": "smollm2:135m", "stream": index % 2 == 0,
                "messages": [{"role": "user", "content": format!("hello {index}")}]}))
            .expect("json"),
            &[("x-sollol-app", "observability-test")],
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let bad = post(&cluster.url("/api/chat"), json!({"model": "nope:1b"})).await;
    assert_eq!(bad.status, 404);

    // The live stream: one routing decision and one finished attempt per request.
    let count = |text: &str, event: &str| text.matches(&format!("event: {event}\n")).count();
    let wait = tokio::time::timeout(
        Duration::from_secs(10),
        seen.wait_for(|text| count(text, "finished") >= SENT),
    )
    .await
    .is_ok();
    let text = seen.borrow().clone();
    assert!(wait, "finished events missing:\n{text}");
    assert_eq!(count(&text, "routed"), SENT, "{text}");
    assert!(text.contains("\"app\":\"observability-test\""), "{text}");
    assert!(text.contains("event: node\n"), "no node event:\n{text}");

    // Prometheus: parses, and counts exactly what was sent.
    let metrics = get(&cluster.url("/metrics")).await;
    assert_eq!(metrics.status, 200);
    let mut parser = tokio::process::Command::new(&python)
        .arg(root.join("tests/clients/prometheus_check.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run python");
    let mut stdin = parser.stdin.take().expect("stdin");
    stdin.write_all(&metrics.body).await.expect("write");
    drop(stdin);
    let output = parser.wait_with_output().await.expect("python");
    assert!(
        output.status.success(),
        "the exposition does not parse: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        metrics.text()
    );
    let summary: Value = serde_json::from_slice(&output.stdout).expect("summary JSON");
    assert_eq!(summary["requests"]["ok"], json!(SENT as f64), "{summary}");
    assert_eq!(summary["duration_count"], json!(SENT as f64), "{summary}");
    for (family, kind) in [
        ("sollol_requests", "counter"),
        ("sollol_request_duration_seconds", "histogram"),
        ("sollol_time_to_first_token_seconds", "histogram"),
        ("sollol_requests_queued", "gauge"),
        ("sollol_node_up", "gauge"),
        ("sollol_node_memory_total_bytes", "gauge"),
        ("sollol_routing_decisions", "counter"),
        ("sollol_history_records_dropped", "counter"),
    ] {
        assert_eq!(
            summary["families"][family],
            json!(kind),
            "{family}: {summary}"
        );
    }

    // The request history (written in batches, so give it a moment) and its filters.
    let started = Instant::now();
    let listed = loop {
        let listed = get(&cluster.url("/api/sollol/v1/requests?app=observability-test")).await;
        assert_eq!(listed.status, 200, "{}", listed.text());
        if listed.json()["requests"].as_array().map_or(0, Vec::len) == SENT
            || started.elapsed() > Duration::from_secs(5)
        {
            break listed.json();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let requests = listed["requests"].as_array().expect("requests");
    assert_eq!(requests.len(), SENT, "{listed}");
    assert!(requests.iter().all(|request| {
        request["status"] == "ok"
            && request["decision"]["strategy"] == "intelligent"
            && request["output_tokens"]
                .as_u64()
                .is_some_and(|tokens| tokens > 0)
    }));
    let by_fast = get(&cluster.url("/api/sollol/v1/requests?node=fast&limit=1000")).await;
    let fast_count = by_fast.json()["requests"].as_array().map_or(0, Vec::len);
    let on_fast = requests
        .iter()
        .filter(|request| request["node"] == "fast")
        .count();
    assert_eq!(fast_count, on_fast, "{}", by_fast.text());
    for (query, needle) in [
        ("status=maybe", "status must be ok or failed"),
        ("limit=0", "limit must be"),
        ("colour=red", "unknown query parameter"),
    ] {
        let answer = get(&cluster.url(&format!("/api/sollol/v1/requests?{query}"))).await;
        assert_eq!(answer.status, 400, "{query}");
        assert!(answer.text().contains(needle), "{query}: {}", answer.text());
    }

    // Aggregates over a window.
    let stats = get(&cluster.url("/api/sollol/v1/stats?window=1h")).await;
    assert_eq!(stats.status, 200, "{}", stats.text());
    let stats = stats.json();
    assert_eq!(stats["total"]["requests"], json!(SENT), "{stats}");
    assert_eq!(stats["by_app"][0]["key"], "observability-test", "{stats}");
    assert_eq!(stats["series"].as_array().map(Vec::len), Some(60));
    assert!(
        stats["total"]["latency_ms"]["p95"].as_u64().is_some(),
        "{stats}"
    );
    let bad_window = get(&cluster.url("/api/sollol/v1/stats?window=7d")).await;
    assert_eq!(bad_window.status, 400);

    // A node's page: its requests and hardware samples.
    let nodes = get(&cluster.url("/api/sollol/v1/nodes")).await.json();
    let fast_id = nodes["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|node| node["name"] == "fast"))
        .and_then(|node| node["id"].as_str())
        .expect("fast node")
        .to_owned();
    // Hardware samples are taken by the node watch every 250 ms, so a node that joined a moment
    // ago may not have one yet.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let detail = loop {
        let detail = get(&cluster.url(&format!("/api/sollol/v1/nodes/{fast_id}")))
            .await
            .json();
        let sampled = !detail["samples"].as_array().is_none_or(Vec::is_empty);
        if sampled || tokio::time::Instant::now() > deadline {
            break detail;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        detail["requests"].as_array().map_or(0, Vec::len),
        on_fast,
        "{detail}"
    );
    assert!(
        !detail["samples"].as_array().is_none_or(Vec::is_empty),
        "no hardware samples: {detail}"
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_clients() {
    let cluster = cluster().await;
    let gateway = format!("http://{}", cluster.coordinator.gateway_address);
    support::run_client_script(
        "official_clients.py",
        &[&gateway],
        "python clients: 9 passed, 0 failed",
    )
    .await;
    cluster.stop().await;
}

/// One single-slot node, no node-side queueing: requests beyond one wait in the gateway's priority queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_nodes_queue_by_priority() {
    let node = EmulatorConfig {
        name: "only".to_owned(),
        decode_tokens_per_second: 50.0,
        parallel: 1,
        ..EmulatorConfig::default()
    };
    let cluster = cluster_with(
        &[
            ("coordinator.node_slots", "1"),
            ("coordinator.node_queue_depth", "0"),
            ("coordinator.queue_capacity", "2"),
            ("coordinator.queue_timeout", "700ms"),
        ],
        &[node],
    )
    .await;
    let url = cluster.url("/api/chat");
    let chat = |tokens: u32| {
        serde_json::to_vec(&json!({"model": "smollm2:135m", "stream": false, "messages": [], "options": {"num_predict": tokens}})).expect("json")
    };
    let (done_sender, mut done) = tokio::sync::mpsc::unbounded_channel();
    let spawn = |priority: &'static str, tokens: u32| {
        let url = url.clone();
        let body = chat(tokens);
        let done_sender = done_sender.clone();
        tokio::spawn(async move {
            let answer = send("POST", &url, body, &[("x-sollol-priority", priority)]).await;
            done_sender.send((priority, answer.status)).expect("send");
        })
    };
    let wait_queued = |count: usize| {
        let coordinator = &cluster.coordinator;
        async move {
            let started = Instant::now();
            while coordinator.queued() < count {
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "queue never reached {count}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    // The node is busy for 200 ms; a low- then a high-priority request queue behind it.
    spawn("5", 10);
    tokio::time::sleep(Duration::from_millis(50)).await;
    spawn("1", 10);
    wait_queued(1).await;
    spawn("9", 10);
    wait_queued(2).await;
    // The queue holds two: a third waiter is turned away at once.
    let overflow = send("POST", &url, chat(1), &[]).await;
    assert_eq!(overflow.status, 429, "{}", overflow.text());
    assert!(
        overflow.json()["error"]
            .as_str()
            .is_some_and(|error| error.contains("saturated"))
    );
    // Saturated as it is, the gateway still answers health, metrics and the API at once.
    for path in ["/healthz", "/readyz", "/metrics", "/api/sollol/v1/cluster"] {
        let asked = Instant::now();
        let answer = get(&cluster.url(path)).await;
        assert_eq!(answer.status, 200, "{path}: {}", answer.text());
        assert!(
            asked.elapsed() < Duration::from_millis(150),
            "{path} took {:?} while saturated",
            asked.elapsed()
        );
        if path == "/metrics" {
            assert!(
                answer.text().contains("sollol_requests_queued 2\n"),
                "{}",
                answer.text()
            );
        }
    }
    let mut order = Vec::new();
    for _ in 0..3 {
        order.push(done.recv().await.expect("finished"));
    }
    assert_eq!(order, vec![("5", 200), ("9", 200), ("1", 200)]);

    // Waiting longer than the queue timeout: 503.
    spawn("5", 60);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let timed_out = send("POST", &url, chat(1), &[]).await;
    assert_eq!(timed_out.status, 503, "{}", timed_out.text());
    assert_eq!(done.recv().await.expect("long request"), ("5", 200));
    let bad = send("POST", &url, chat(1), &[("x-sollol-priority", "11")]).await;
    assert_eq!(bad.status, 400);
    cluster.stop().await;
}

fn embedding_nodes() -> Vec<EmulatorConfig> {
    [("fast", 4000.0), ("mid", 2000.0), ("slow", 1000.0)]
        .map(|(name, prompt_speed)| EmulatorConfig {
            name: name.to_owned(),
            prompt_tokens_per_second: prompt_speed,
            parallel: 1,
            ..EmulatorConfig::default()
        })
        .to_vec()
}

fn batch_inputs(count: usize) -> Vec<String> {
    (0..count)
        .map(|index| format!("input number {index:05}"))
        .collect()
}

fn check_embeddings(body: &Value, inputs: &[String]) {
    let embeddings = body["embeddings"].as_array().expect("embeddings");
    assert_eq!(embeddings.len(), inputs.len());
    for (index, input) in inputs.iter().enumerate() {
        let actual: Vec<f32> = serde_json::from_value(embeddings[index].clone()).expect("floats");
        assert_eq!(
            actual,
            embedding_of("nomic-embed-text:latest", input, 8),
            "input {index} out of place"
        );
    }
}

/// 1,000 inputs over three nodes of different speeds: complete, in order, and faster than the fastest node alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_embeddings_split_across_nodes() {
    let cluster = cluster_with(&[], &embedding_nodes()).await;
    let inputs = batch_inputs(1000);
    let request = json!({"model": "nomic-embed-text", "input": inputs});

    let started = Instant::now();
    let alone = post(
        &format!("{}/api/embed", cluster.emulators[0].url()),
        request.clone(),
    )
    .await;
    let fastest_alone = started.elapsed();
    check_embeddings(&alone.json(), &inputs);

    let started = Instant::now();
    let answer = post(&cluster.url("/api/embed"), request.clone()).await;
    let split = started.elapsed();
    assert_eq!(answer.status, 200, "{}", answer.text());
    check_embeddings(&answer.json(), &inputs);
    // The response cache is off by default: no cache header.
    assert!(answer.headers.get("x-sollol-cache").is_none());
    let nodes = answer.node.clone().unwrap_or_default();
    assert_eq!(nodes.split(',').count(), 3, "every node helped: {nodes}");
    assert!(
        split < fastest_alone,
        "split {split:?} vs fastest node alone {fastest_alone:?}"
    );
    eprintln!(
        "1,000 inputs: fastest node alone {fastest_alone:?}, split over 3 nodes {split:?} ({:?})",
        answer.decision
    );

    // OpenAI's shape, same content.
    let answer = post(
        &cluster.url("/v1/embeddings"),
        json!({"model": "nomic-embed-text", "input": inputs[..10]}),
    )
    .await;
    let data = answer.json()["data"].as_array().expect("data").clone();
    let indexes: Vec<u64> = data
        .iter()
        .filter_map(|item| item["index"].as_u64())
        .collect();
    assert_eq!(indexes, (0..10).collect::<Vec<u64>>());

    // A node failing mid-batch, and one that hangs: the others finish its share.
    cluster.emulators[1].set_fault(Fault::InternalError);
    cluster.emulators[2].set_fault(Fault::HangBeforeFirstByte);
    let answer = post(&cluster.url("/api/embed"), request).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    check_embeddings(&answer.json(), &inputs);
    cluster.stop().await;
}

/// With API keys set, only liveness and the dashboard's files are open; requests are attributed to applications.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_the_gateway_and_name_applications() {
    let node = EmulatorConfig {
        name: "only".to_owned(),
        ..EmulatorConfig::default()
    };
    let cluster = cluster_with(
        &[(
            "coordinator.api_keys",
            "webui=0123456789abcdef0123,batch=fedcba9876543210fedc",
        )],
        &[node],
    )
    .await;
    let chat =
        serde_json::to_vec(&json!({"model": "smollm2:135m", "stream": false, "messages": []}))
            .expect("json");
    for path in ["/", "/healthz", "/readyz", "/dashboard/"] {
        assert_eq!(
            send("GET", &cluster.url(path), Vec::new(), &[])
                .await
                .status,
            200,
            "{path}"
        );
    }
    for path in ["/api/tags", "/api/sollol/v1/nodes", "/v1/models"] {
        let answer = send("GET", &cluster.url(path), Vec::new(), &[]).await;
        assert_eq!(answer.status, 401, "{path}");
        // OpenAI's routes answer in OpenAI's error shape, which its clients read.
        let error = &answer.json()["error"];
        let message = if path.starts_with("/v1/") {
            error["message"].as_str()
        } else {
            error.as_str()
        };
        assert!(
            message.is_some_and(|error| error.contains("API key")),
            "{path}: {}",
            answer.text()
        );
    }
    let wrong = send(
        "POST",
        &cluster.url("/api/chat"),
        chat.clone(),
        &[("authorization", "Bearer 0123456789abcdef0124")],
    )
    .await;
    assert_eq!(wrong.status, 401);
    let bearer = send(
        "POST",
        &cluster.url("/api/chat"),
        chat.clone(),
        &[("authorization", "Bearer 0123456789abcdef0123")],
    )
    .await;
    assert_eq!(bearer.status, 200, "{}", bearer.text());
    let header = send(
        "POST",
        &cluster.url("/api/chat"),
        chat.clone(),
        &[
            ("x-api-key", "fedcba9876543210fedc"),
            ("x-sollol-app", "nightly-index"),
        ],
    )
    .await;
    assert_eq!(header.status, 200, "{}", header.text());

    let database = cluster.dirs[0].path().join("coordinator.db");
    let started = Instant::now();
    loop {
        let connection = rusqlite::Connection::open(&database).expect("open history");
        let apps: Vec<String> = connection
            .prepare("SELECT app FROM requests ORDER BY id")
            .expect("query")
            .query_map([], |row| row.get(0))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("apps");
        if apps.len() == 2 {
            assert_eq!(apps, vec!["webui", "nightly-index"]);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "requests not recorded: {apps:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.stop().await;
}

/// Inference keys generate but cannot change the cluster; admin keys can. Each key and each
/// application has its own requests per minute, and a client past them gets 429 with Retry-After.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_scopes_and_rate_limits() {
    let node = EmulatorConfig {
        name: "only".to_owned(),
        ..EmulatorConfig::default()
    };
    let cluster = cluster_with(
        &[
            ("coordinator.api_keys", "webui=0123456789abcdef0123"),
            ("coordinator.admin_keys", "ops=a0a0a0a0a0a0a0a0a0a0"),
            ("coordinator.requests_per_minute", "4"),
        ],
        &[node],
    )
    .await;
    let pull =
        serde_json::to_vec(&json!({"model": "tinyllama:1b", "stream": false})).expect("json");
    let inference = [("authorization", "Bearer 0123456789abcdef0123")];
    let admin = [("authorization", "Bearer a0a0a0a0a0a0a0a0a0a0")];
    for path in [
        "/api/pull",
        "/api/delete",
        "/api/create",
        "/api/push",
        "/api/blobs/sha256:00",
    ] {
        let refused = send("POST", &cluster.url(path), pull.clone(), &inference).await;
        assert_eq!(refused.status, 403, "{path}: {}", refused.text());
        assert!(refused.text().contains("admin_keys"), "{}", refused.text());
    }
    let planned = send(
        "POST",
        &cluster.url("/api/sollol/v1/distributed/smollm2:135m/plan"),
        Vec::new(),
        &inference,
    )
    .await;
    assert_eq!(planned.status, 403, "{}", planned.text());
    let pulled = send("POST", &cluster.url("/api/pull"), pull.clone(), &admin).await;
    assert_eq!(pulled.status, 200, "{}", pulled.text());

    // 4 a minute for the webui key: the admin's pull above counted against the ops key only.
    let chat =
        serde_json::to_vec(&json!({"model": "smollm2:135m", "stream": false, "messages": []}))
            .expect("json");
    for _ in 0..4 {
        let answer = send("POST", &cluster.url("/api/chat"), chat.clone(), &inference).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let limited = send("POST", &cluster.url("/api/chat"), chat.clone(), &inference).await;
    assert_eq!(limited.status, 429, "{}", limited.text());
    let retry: u64 = limited
        .headers
        .get("retry-after")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
        .expect("Retry-After");
    assert!((1..=15).contains(&retry), "{retry}");
    assert!(limited.text().contains("key:webui"), "{}", limited.text());
    // The admin key still has its own minute.
    let other = send("POST", &cluster.url("/api/chat"), chat.clone(), &admin).await;
    assert_eq!(other.status, 200, "{}", other.text());
    cluster.stop().await;
}

/// A node that keeps failing is cut off after three failures, then let back in by a trial once it recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_opens_and_recovers() {
    let nodes = [("fast", 2000.0), ("slow", 200.0)].map(|(name, speed)| EmulatorConfig {
        name: name.to_owned(),
        decode_tokens_per_second: speed,
        ..EmulatorConfig::default()
    });
    let cluster = cluster_with(&[], &nodes).await;
    let chat = || json!({"model": "smollm2:135m", "stream": false, "messages": [], "options": {"num_predict": 4}});
    // Teach routing that "fast" is fast.
    teach(&cluster, &[chat(), chat(), chat(), chat()]).await;
    cluster.emulators[0].set_fault(Fault::InternalError);
    let tried_before = cluster.emulators[0].started();
    for _ in 0..8 {
        let answer = post(&cluster.url("/api/chat"), chat()).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.node.as_deref(), Some("slow"));
    }
    assert_eq!(
        cluster.emulators[0].started() - tried_before,
        3,
        "the breaker opened after three failures"
    );

    // The node recovers: after the open period, one trial closes the breaker and traffic returns.
    cluster.emulators[0].set_fault(Fault::None);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut nodes_seen = Vec::new();
    for _ in 0..4 {
        nodes_seen.push(
            post(&cluster.url("/api/chat"), chat())
                .await
                .node
                .unwrap_or_default(),
        );
    }
    assert_eq!(
        nodes_seen,
        vec!["fast"; 4],
        "traffic is back on the recovered node"
    );
    cluster.stop().await;
}

/// A pull of a model the registry does not have fails for the client (as Ollama's does) without
/// counting against the node: its breaker stays closed and chats keep going to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_pull_is_not_a_node_failure() {
    let node = EmulatorConfig {
        name: "only".to_owned(),
        not_in_registry: vec!["no-such-model:7b".to_owned()],
        ..EmulatorConfig::default()
    };
    let cluster = cluster_with(&[], &[node]).await;
    for _ in 0..5 {
        let pulled = post(
            &cluster.url("/api/pull"),
            json!({"model": "no-such-model:7b", "stream": false}),
        )
        .await;
        assert_eq!(pulled.status, 500, "{}", pulled.text());
        assert!(
            pulled.text().contains("file does not exist"),
            "{}",
            pulled.text()
        );
    }
    let chat = post(
        &cluster.url("/api/chat"),
        json!({"model": "smollm2:135m", "stream": false, "messages": [], "options": {"num_predict": 4}}),
    )
    .await;
    assert_eq!(chat.status, 200, "{}", chat.text());
    assert_eq!(chat.node.as_deref(), Some("only"));
    cluster.stop().await;
}

/// A node that hangs before its first byte: the request is hedged on the next node and answered from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_nodes_are_hedged() {
    let nodes = [("fast", 2000.0), ("slow", 400.0)].map(|(name, speed)| EmulatorConfig {
        name: name.to_owned(),
        decode_tokens_per_second: speed,
        ..EmulatorConfig::default()
    });
    let cluster = cluster_with(&[("coordinator.hedging", "true")], &nodes).await;
    let chat = |stream: bool| json!({"model": "smollm2:135m", "stream": stream, "messages": [], "options": {"num_predict": 4}});
    teach(
        &cluster,
        &[chat(false), chat(true), chat(false), chat(true)],
    )
    .await;
    cluster.emulators[0].set_fault(Fault::HangBeforeFirstByte);
    for stream in [false, true] {
        let started = Instant::now();
        let answer = post(&cluster.url("/api/chat"), chat(stream)).await;
        let took = started.elapsed();
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.node.as_deref(), Some("slow"));
        assert!(
            answer
                .decision
                .as_deref()
                .is_some_and(|decision| decision.starts_with("hedged")),
            "{:?}",
            answer.decision
        );
        assert!(
            took < Duration::from_secs(2),
            "hedged answer took {took:?}: {:?}",
            answer.decision
        );
        let text: String = if stream {
            lines(&answer)
                .iter()
                .filter_map(|chunk| chunk["message"]["content"].as_str().map(str::to_owned))
                .collect()
        } else {
            answer.json()["message"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(text, "tok0 tok1 tok2 tok3 ");
    }
    cluster.stop().await;
}

/// Plain Ollama servers from the configuration, with no agent: probed, routed to, and marked down when they stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_ollama_nodes_from_the_configuration() {
    let mut emulators = Vec::new();
    for name in ["left", "right"] {
        emulators.push(
            Emulator::start(EmulatorConfig {
                name: name.to_owned(),
                ..EmulatorConfig::default()
            })
            .await
            .expect("emulator"),
        );
    }
    let urls = format!("{},{}", emulators[0].url(), emulators[1].url());
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = app::start_coordinator(&config(
        dir.path(),
        "c",
        &[
            ("coordinator.nodes", &urls),
            ("coordinator.probe_interval", "200ms"),
        ],
    ))
    .await
    .expect("coordinator");
    let started = Instant::now();
    while coordinator.view().backends.len() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "static nodes never came up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let names: Vec<String> = coordinator
        .view()
        .nodes
        .iter()
        .map(|node| node.name.clone())
        .collect();
    assert!(
        names.contains(&emulators[0].address().to_string()),
        "{names:?}"
    );
    let url = format!("http://{}/api/chat", coordinator.gateway_address);
    let chat = json!({"model": "smollm2:135m", "stream": false, "messages": [], "options": {"num_predict": 1}});
    assert_eq!(post(&url, chat.clone()).await.status, 200);

    emulators[0].kill();
    let left = emulators[0].address().to_string();
    let started = Instant::now();
    loop {
        let view = coordinator.view();
        let status = view
            .nodes
            .iter()
            .find(|node| node.name == left)
            .map(|node| node.status);
        if status == Some(sollol_shared::api::NodeStatus::Down) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "stopped static node never went down: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..3 {
        let answer = post(&url, chat.clone()).await;
        assert_eq!(answer.status, 200);
        assert_eq!(
            answer.node.as_deref(),
            Some(emulators[1].address().to_string().as_str())
        );
    }
    coordinator.shutdown(Duration::from_secs(5)).await;
}

/// Later turns of a conversation go to the node that served the earlier ones (its KV cache holds the prefix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_stick_to_their_node() {
    let nodes = ["a", "b"].map(|name| EmulatorConfig {
        name: name.to_owned(),
        decode_tokens_per_second: 1000.0,
        ..EmulatorConfig::default()
    });
    let cluster = cluster_with(&[("coordinator.calibration", "false")], &nodes).await;
    // 20 tokens: long enough that millisecond timing noise cannot make one identical node look 1.5x slower.
    let turn = |turns: usize, user: &str| {
        let mut messages = vec![
            json!({"role": "system", "content": "You are terse."}),
            json!({"role": "user", "content": user}),
        ];
        for index in 1..turns {
            messages.push(json!({"role": "assistant", "content": format!("answer {index}")}));
            messages.push(json!({"role": "user", "content": format!("follow-up {index}")}));
        }
        serde_json::to_vec(&json!({"model": "smollm2:135m", "stream": false, "messages": messages, "options": {"num_predict": 20}}))
            .expect("json")
    };
    // Round robin sends the first turns of two conversations to different nodes.
    let first = send(
        "POST",
        &cluster.url("/api/chat"),
        turn(1, "conversation one"),
        &[("x-sollol-strategy", "round_robin")],
    )
    .await;
    let second = send(
        "POST",
        &cluster.url("/api/chat"),
        turn(1, "conversation two"),
        &[("x-sollol-strategy", "round_robin")],
    )
    .await;
    let (node_one, node_two) = (first.node.expect("node"), second.node.expect("node"));
    assert_ne!(node_one, node_two);
    // Every later turn, routed by `intelligent`, goes back to its conversation's node.
    for turns in 2..5 {
        for (user, node) in [
            ("conversation one", &node_one),
            ("conversation two", &node_two),
        ] {
            let answer = send("POST", &cluster.url("/api/chat"), turn(turns, user), &[]).await;
            assert_eq!(
                answer.node.as_ref(),
                Some(node),
                "turn {turns} of {user}: {:?}",
                answer.decision
            );
        }
    }
    cluster.stop().await;
}

/// What routing learned is in SQLite: a restarted coordinator routes on it from its first request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learning_survives_a_coordinator_restart() {
    let nodes =
        [("fast", 2000.0), ("mid", 400.0), ("slow", 100.0)].map(|(name, speed)| EmulatorConfig {
            name: name.to_owned(),
            decode_tokens_per_second: speed,
            ..EmulatorConfig::default()
        });
    let cluster = cluster_with(&[("coordinator.calibration", "false")], &nodes).await;
    let chat = json!({"model": "smollm2:135m", "stream": false, "messages": [], "options": {"num_predict": 8}});
    // Every outcome is folded in before the snapshot is taken.
    teach(&cluster, &vec![chat; 6]).await;
    let before = cluster.coordinator.learned().pairs.clone();
    let data_dir = cluster.coordinator.data_dir.clone();
    let Cluster {
        coordinator,
        agents,
        emulators,
        dirs: _dirs,
    } = cluster;
    for agent in agents {
        agent
            .stop(Duration::from_secs(5))
            .await
            .expect("stop agent");
    }
    coordinator.shutdown(Duration::from_secs(5)).await;

    let restarted = app::start_coordinator(&config(&data_dir, "coordinator", &[]))
        .await
        .expect("restart");
    let after = restarted.learned().pairs.clone();
    assert_eq!(
        after.len(),
        before.len(),
        "every learned pair is remembered"
    );
    for (key, stats) in &before {
        let remembered = after.get(key).expect("pair remembered");
        assert!(
            (remembered.decode_tokens_per_second - stats.decode_tokens_per_second).abs() < 1e-6,
            "{key:?}"
        );
        assert_eq!(remembered.samples, stats.samples);
    }
    restarted.shutdown(Duration::from_secs(5)).await;
    drop(emulators);
}

/// A node killed while it is answering: every non-streaming request still succeeds, on the other nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_under_load_loses_no_request() {
    let nodes =
        [("fast", 300.0), ("mid", 200.0), ("slow", 150.0)].map(|(name, speed)| EmulatorConfig {
            name: name.to_owned(),
            decode_tokens_per_second: speed,
            parallel: 2,
            ..EmulatorConfig::default()
        });
    let cluster = cluster_with(&[], &nodes).await;
    let url = cluster.url("/api/chat");
    let body = serde_json::to_vec(&json!({"model": "smollm2:135m", "stream": false, "messages": [], "options": {"num_predict": 30}}))
        .expect("json");
    let queue = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(40));
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let (url, body, queue) = (url.clone(), body.clone(), std::sync::Arc::clone(&queue));
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                while queue
                    .fetch_update(
                        std::sync::atomic::Ordering::SeqCst,
                        std::sync::atomic::Ordering::SeqCst,
                        |left| left.checked_sub(1),
                    )
                    .is_ok()
                {
                    let answer = send(
                        "POST",
                        &url,
                        body.clone(),
                        &[("x-sollol-strategy", "round_robin")],
                    )
                    .await;
                    statuses.push((answer.status, answer.text()));
                }
                statuses
            })
        })
        .collect();
    // Kill a node while requests are running on it.
    let started = Instant::now();
    while cluster.emulators[0].started() < 3 {
        assert!(started.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.emulators[0].kill();
    let mut answered = 0;
    for client in clients {
        for (status, text) in client.await.expect("client") {
            assert_eq!(status, 200, "{text}");
            answered += 1;
        }
    }
    assert_eq!(answered, 40);
    cluster.stop().await;
}

/// Generated tokens are charged after each answer, streamed or not: once an application's minute of
/// tokens is spent, it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_per_minute_are_charged_from_the_answers() {
    let node = EmulatorConfig {
        name: "only".to_owned(),
        default_num_predict: 16,
        ..EmulatorConfig::default()
    };
    let cluster = cluster_with(&[("coordinator.tokens_per_minute", "20")], &[node]).await;
    let app = [("x-sollol-app", "summariser")];
    let whole =
        serde_json::to_vec(&json!({"model": "smollm2:135m", "stream": false, "prompt": "hi"}))
            .expect("json");
    let streamed =
        serde_json::to_vec(&json!({"model": "smollm2:135m", "prompt": "hi"})).expect("json");
    // 16 tokens of 20: still above zero.
    let first = send("POST", &cluster.url("/api/generate"), whole.clone(), &app).await;
    assert_eq!(first.status, 200, "{}", first.text());
    // Admitted with 4 left, then charged 16 more when its stream ends.
    let second = send("POST", &cluster.url("/api/generate"), streamed, &app).await;
    assert_eq!(second.status, 200, "{}", second.text());
    let started = Instant::now();
    let limited = loop {
        let answer = send("POST", &cluster.url("/api/generate"), whole.clone(), &app).await;
        if answer.status == 429 || started.elapsed() > Duration::from_secs(2) {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(limited.status, 429, "{}", limited.text());
    assert!(limited.headers.contains_key("retry-after"));
    // Another application is not held back.
    let other = send(
        "POST",
        &cluster.url("/api/generate"),
        whole,
        &[("x-sollol-app", "chat")],
    )
    .await;
    assert_eq!(other.status, 200, "{}", other.text());
    cluster.stop().await;
}

/// The dashboard signs in once with a key and then reads with a session cookie (its event stream
/// too); an inference key's session cannot change the cluster; signing out ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_sessions_stand_in_for_keys() {
    let node = EmulatorConfig {
        name: "only".to_owned(),
        ..EmulatorConfig::default()
    };
    let cluster = cluster_with(
        &[("coordinator.api_keys", "webui=0123456789abcdef0123")],
        &[node],
    )
    .await;
    let session_url = cluster.url("/api/sollol/v1/session");
    let status = send("GET", &session_url, Vec::new(), &[]).await;
    assert_eq!(status.status, 200);
    assert_eq!(
        status.json(),
        json!({"keys_required": true, "signed_in_as": null})
    );
    let wrong = send(
        "POST",
        &session_url,
        br#"{"key": "0123456789abcdef9999"}"#.to_vec(),
        &[],
    )
    .await;
    assert_eq!(wrong.status, 401, "{}", wrong.text());
    assert!(!wrong.headers.contains_key("set-cookie"));
    let signed = send(
        "POST",
        &session_url,
        br#"{"key": "0123456789abcdef0123"}"#.to_vec(),
        &[],
    )
    .await;
    assert_eq!(signed.status, 200, "{}", signed.text());
    let cookie = signed.headers["set-cookie"]
        .to_str()
        .expect("cookie")
        .to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(
        !cookie.contains("0123456789abcdef0123"),
        "the key is not the cookie"
    );
    let session = cookie.split(';').next().expect("name=value").to_owned();
    let with_cookie = [("cookie", session.as_str())];
    assert_eq!(
        send("GET", &session_url, Vec::new(), &with_cookie)
            .await
            .json(),
        json!({"keys_required": true, "signed_in_as": "webui"})
    );
    for path in [
        "/api/sollol/v1/nodes",
        "/api/sollol/v1/cluster",
        "/api/tags",
    ] {
        let answer = send("GET", &cluster.url(path), Vec::new(), &with_cookie).await;
        assert_eq!(answer.status, 200, "{path}: {}", answer.text());
    }
    // The event stream (an EventSource sends cookies, not headers): its head arrives.
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<hyper::body::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let events = hyper::Request::get(cluster.url("/api/sollol/v1/events"))
        .header("cookie", session.as_str())
        .body(http_body_util::Empty::new())
        .expect("request");
    let head = tokio::time::timeout(Duration::from_secs(5), client.request(events))
        .await
        .expect("in time")
        .expect("answer");
    assert_eq!(head.status(), 200);
    drop(head);
    let plan = send(
        "POST",
        &cluster.url("/api/sollol/v1/distributed/smollm2:135m/plan"),
        Vec::new(),
        &with_cookie,
    )
    .await;
    assert_eq!(plan.status, 403, "{}", plan.text());
    let out = send("DELETE", &session_url, Vec::new(), &with_cookie).await;
    assert_eq!(out.status, 204);
    let after = send(
        "GET",
        &cluster.url("/api/sollol/v1/nodes"),
        Vec::new(),
        &with_cookie,
    )
    .await;
    assert_eq!(after.status, 401);
    cluster.stop().await;
}

/// Waits until `ready` holds, checking every 50 ms, at most `limit`; false when it never did.
async fn eventually(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while !ready() {
        if started.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Every emulated node restarted on its port with nothing loaded, as after its Ollama restarted.
async fn restart_cold(emulators: &[Emulator]) {
    for emulator in emulators {
        emulator.kill();
        // The killed server task lets go of its port a moment later.
        let started = Instant::now();
        while let Err(error) = emulator.restart().await {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "restart: {error}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Agents for `emulators` joining `coordinator`, each keeping its identity in its directory of `dirs`.
async fn rejoin(
    coordinator: &CoordinatorHandle,
    emulators: &[Emulator],
    dirs: &[tempfile::TempDir],
) -> Vec<AgentHandle> {
    let mut agents = Vec::new();
    for (emulator, dir) in emulators.iter().zip(dirs) {
        let url = emulator.url();
        let config = config(dir.path(), emulator.name(), &[("agent.ollama_url", &url)]);
        agents.push(
            app::start_agent(
                &config,
                coordinator.cluster_address.to_string(),
                coordinator.token.clone(),
            )
            .await
            .expect("agent"),
        );
    }
    assert!(
        eventually(Duration::from_secs(10), || coordinator
            .view()
            .backends
            .len()
            == emulators.len())
        .await,
        "nodes never joined"
    );
    agents
}

/// A coordinator restarted with its history, every node restarted cold: the models the history asked
/// for are loaded on the nodes the router would pick (not the slow one) before any client asks; a node
/// that comes back cold is warmed again; with `coordinator.warmup = false` nothing is loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_warms_cold_nodes_with_the_demand_it_remembers() {
    let small = "smollm2:135m";
    let big = "qwen2:0.5b";
    let nodes =
        [("fast", 2000.0), ("mid", 800.0), ("slow", 50.0)].map(|(name, speed)| EmulatorConfig {
            name: name.to_owned(),
            models: vec![small.to_owned(), big.to_owned()],
            decode_tokens_per_second: speed,
            prompt_tokens_per_second: speed * 10.0,
            load_time: Duration::from_millis(300),
            max_loaded_models: 2,
            ..EmulatorConfig::default()
        });
    let quiet = [
        ("coordinator.calibration", "false"),
        ("coordinator.warmup", "false"),
    ];
    let cluster = cluster_with(&quiet, &nodes).await;
    let chat = |model: &str| json!({"model": model, "stream": false, "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 16}});
    // Round robin over three nodes: every node serves each model; the demand is 9 small, 3 big.
    let taught: Vec<Value> = [small, small, small, big, big, big]
        .into_iter()
        .chain([small; 6])
        .map(chat)
        .collect();
    teach(&cluster, &taught).await;
    let data_dir = cluster.coordinator.data_dir.clone();
    let Cluster {
        coordinator,
        agents,
        emulators,
        dirs,
    } = cluster;
    let stop = |coordinator: CoordinatorHandle, agents: Vec<AgentHandle>| async move {
        for agent in agents {
            agent.stop(Duration::from_secs(5)).await.expect("stop");
        }
        coordinator.shutdown(Duration::from_secs(5)).await;
    };
    stop(coordinator, agents).await;
    restart_cold(&emulators).await;
    let generations =
        |emulators: &[Emulator]| -> u64 { emulators.iter().map(Emulator::started).sum() };
    let before = generations(&emulators);

    let coordinator = app::start_coordinator(&config(&data_dir, "coordinator", &quiet[..1]))
        .await
        .expect("restart");
    let agents = rejoin(&coordinator, &emulators, &dirs[1..]).await;
    let holds = |emulator: &Emulator| {
        let loaded = emulator.loaded_models();
        loaded.iter().any(|model| model == small) && loaded.iter().any(|model| model == big)
    };
    assert!(
        eventually(Duration::from_secs(15), || holds(&emulators[0])
            && holds(&emulators[1]))
        .await,
        "fast and mid warmed with both models: fast {:?}, mid {:?}",
        emulators[0].loaded_models(),
        emulators[1].loaded_models()
    );
    assert_eq!(
        emulators[2].loaded_models(),
        Vec::<String>::new(),
        "the slow node (40x slower) is left cold"
    );
    assert_eq!(generations(&emulators), before, "no generation: loads only");
    let gateway = |path: &str| format!("http://{}{path}", coordinator.gateway_address);
    // The history writes in batches: the last loads show up a moment after they ended.
    let started = Instant::now();
    let (listed, warmups) = loop {
        let listed = get(&gateway("/api/sollol/v1/requests?app=sollol-warmup")).await;
        let warmups: Vec<Value> = listed.json()["requests"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if warmups.len() >= 4 || started.elapsed() > Duration::from_secs(5) {
            break (listed, warmups);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(warmups.len(), 4, "{}", listed.text());
    assert!(
        warmups
            .iter()
            .all(|entry| entry["decision"]["strategy"] == "warmup" && entry["status"] == "ok"),
        "{}",
        listed.text()
    );
    let metrics = get(&gateway("/metrics")).await.text();
    assert!(
        metrics.contains("sollol_routing_decisions_total{strategy=\"warmup\",kind=\"warmup\"}"),
        "{metrics}"
    );

    // The fast node's Ollama restarts: it comes back cold and is warmed again.
    restart_cold(&emulators[..1]).await;
    assert!(
        eventually(Duration::from_secs(15), || holds(&emulators[0])).await,
        "fast warmed again after coming back cold: {:?}",
        emulators[0].loaded_models()
    );
    // A client unloading both models (keep_alive 0) is obeyed, not repaired.
    for model in [small, big] {
        let unload = send(
            "POST",
            &gateway("/api/generate"),
            serde_json::to_vec(&json!({"model": model, "keep_alive": 0})).expect("json"),
            &[("x-sollol-node", "fast")],
        )
        .await;
        assert_eq!(unload.status, 200, "{}", unload.text());
    }
    // Longer than a pair's 10 s pause between warm-ups, so a repair would have happened.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(
        emulators[0].loaded_models(),
        Vec::<String>::new(),
        "models unloaded on purpose stay unloaded"
    );
    stop(coordinator, agents).await;

    // Off: nothing is loaded.
    restart_cold(&emulators).await;
    let coordinator = app::start_coordinator(&config(&data_dir, "coordinator", &quiet))
        .await
        .expect("restart");
    let agents = rejoin(&coordinator, &emulators, &dirs[1..]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for emulator in &emulators {
        assert_eq!(
            emulator.loaded_models(),
            Vec::<String>::new(),
            "{}",
            emulator.name()
        );
    }
    stop(coordinator, agents).await;
}

/// Spare capacity: while the fast node's only slot is taken, an idle node that would serve the next
/// request sooner once warm gets the model loaded in the background; no client request pays that load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_keeps_requests_waiting_is_loaded_on_an_idle_node() {
    let nodes =
        [("fast", 100.0, 0), ("spare", 80.0, 2000)].map(|(name, speed, load_ms)| EmulatorConfig {
            name: name.to_owned(),
            decode_tokens_per_second: speed,
            prompt_tokens_per_second: speed * 100.0,
            parallel: 1,
            load_time: Duration::from_millis(load_ms),
            ..EmulatorConfig::default()
        });
    let cluster = cluster_with(
        &[
            ("coordinator.calibration", "false"),
            ("coordinator.node_slots", "1"),
        ],
        &nodes,
    )
    .await;
    let chat = json!({"model": "smollm2:135m", "stream": false, "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 32}});
    // The first request teaches the fast node's speed; then three at once keep its slot taken.
    let first = post(&cluster.url("/api/chat"), chat.clone()).await;
    assert_eq!(first.node.as_deref(), Some("fast"), "{}", first.text());
    until_learned(&cluster, 1).await;
    let url = cluster.url("/api/chat");
    let burst = futures_util::future::join_all((0..3).map(|_| post(&url, chat.clone()))).await;
    for answer in &burst {
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(
            answer.node.as_deref(),
            Some("fast"),
            "waiting on fast beats a 2 s cold load: {:?}",
            answer.decision
        );
    }
    let spare = &cluster.emulators[1];
    assert!(
        eventually(Duration::from_secs(5), || !spare.loaded_models().is_empty()).await,
        "the idle node was warmed"
    );
    assert_eq!(spare.started(), 0, "no client request paid the load");
    let started = Instant::now();
    let warmups = loop {
        let listed = get(&cluster.url("/api/sollol/v1/requests?app=sollol-warmup")).await;
        let warmups = listed.json()["requests"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !warmups.is_empty() || started.elapsed() > Duration::from_secs(5) {
            break warmups;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(warmups.len(), 1, "{warmups:?}");
    assert_eq!(warmups[0]["node"], "spare");
    assert!(
        warmups[0]["decision"]["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("spare capacity")),
        "{warmups:?}"
    );
    cluster.stop().await;
}

/// The opt-in response cache: a repeated embedding or deterministic generation is answered without a
/// node (`X-Sollol-Cache: hit`); a change of any option, the model or the prompt misses; generations
/// that are not deterministic, streams and requests pinned to a node are never cached; hits and misses
/// are in `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_response_cache_answers_only_identical_requests() {
    let nodes = ["one", "two"].map(|name| EmulatorConfig {
        name: name.to_owned(),
        models: ["smollm2:135m", "qwen2:0.5b", "nomic-embed-text:latest"]
            .map(str::to_owned)
            .to_vec(),
        ..EmulatorConfig::default()
    });
    let cluster = cluster_with(
        &[
            ("cache.enabled", "true"),
            ("coordinator.calibration", "false"),
        ],
        &nodes,
    )
    .await;
    let reached = || -> u64 { cluster.emulators.iter().map(Emulator::started).sum() };
    // Sends a request; checks its `X-Sollol-Cache` header and whether a node saw it.
    let check = async |path: &str, body: &Value, headers: &[(&str, &str)], cache: Option<&str>| {
        let before = reached();
        let answer = send(
            "POST",
            &cluster.url(path),
            serde_json::to_vec(body).expect("json"),
            headers,
        )
        .await;
        assert_eq!(answer.status, 200, "{path} {body}: {}", answer.text());
        let seen = answer
            .headers
            .get("x-sollol-cache")
            .and_then(|value| value.to_str().ok());
        assert_eq!(seen, cache, "{path} {body}");
        let expected_nodes = u64::from(cache != Some("hit"));
        // A batch over both nodes reaches each of them.
        assert!(
            (reached() - before).min(1) == expected_nodes,
            "{path} {body}: nodes reached {} times for {cache:?}",
            reached() - before
        );
        answer
    };

    // Embeddings: a batch spread over both nodes, then the same batch again from the cache, the same
    // bytes; the model's short name and `keep_alive` do not change the key.
    let batch = json!({"model": "nomic-embed-text", "input": batch_inputs(64)});
    let first = check("/api/embed", &batch, &[], Some("miss")).await;
    check_embeddings(&first.json(), &batch_inputs(64));
    let again = check("/api/embed", &batch, &[], Some("hit")).await;
    assert_eq!(again.body, first.body);
    assert_eq!(again.decision.as_deref(), Some("cache hit"));
    let respelled =
        json!({"model": "nomic-embed-text:latest", "input": batch_inputs(64), "keep_alive": "1m"});
    check("/api/embed", &respelled, &[], Some("hit")).await;
    let one_more_input = json!({"model": "nomic-embed-text", "input": batch_inputs(65)});
    check("/api/embed", &one_more_input, &[], Some("miss")).await;
    let openai = json!({"model": "nomic-embed-text", "input": ["a", "b"]});
    check("/v1/embeddings", &openai, &[], Some("miss")).await;
    check("/v1/embeddings", &openai, &[], Some("hit")).await;

    // A deterministic generation, then every variation of it: each misses once and hits after.
    let generation = json!({"model": "smollm2:135m", "prompt": "Why is the sky blue?", "stream": false,
        "format": "json", "options": {"temperature": 0, "num_predict": 4, "top_k": 40, "stop": ["\n\n"]}});
    check("/api/generate", &generation, &[], Some("miss")).await;
    check("/api/generate", &generation, &[], Some("hit")).await;
    let variations: &[(&str, Value)] = &[
        ("/options/temperature", json!(0.0001)),
        ("/options/seed", json!(7)),
        ("/options/num_predict", json!(5)),
        ("/options/top_k", json!(41)),
        ("/options/stop", json!(["\n"])),
        ("/options/num_ctx", json!(4096)),
        ("/format", json!({"type": "object"})),
        ("/prompt", json!("Why is the sky blue")),
        ("/system", json!("Be brief.")),
        ("/model", json!("qwen2:0.5b")),
    ];
    for (pointer, value) in variations {
        let mut changed = generation.clone();
        let (parent, field) = pointer.rsplit_once('/').expect("pointer");
        let target = if parent.is_empty() {
            &mut changed
        } else {
            changed.pointer_mut(parent).expect("parent")
        };
        target[field] = value.clone();
        // A temperature above 0 is deterministic only with a seed.
        if *pointer == "/options/temperature" {
            changed["options"]["seed"] = json!(1);
        }
        check("/api/generate", &changed, &[], Some("miss")).await;
        check("/api/generate", &changed, &[], Some("hit")).await;
    }
    let chat = json!({"model": "smollm2:135m", "stream": false, "options": {"seed": 3, "temperature": 0.7},
        "messages": [{"role": "user", "content": "hi"}]});
    check("/api/chat", &chat, &[], Some("miss")).await;
    check("/api/chat", &chat, &[], Some("hit")).await;
    let openai_chat = json!({"model": "smollm2:135m", "temperature": 0, "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}]});
    check("/v1/chat/completions", &openai_chat, &[], Some("miss")).await;
    check("/v1/chat/completions", &openai_chat, &[], Some("hit")).await;

    // Never cached: sampled generations, streams, requests pinned to a node.
    let mut sampled = generation.clone();
    sampled["options"]["temperature"] = json!(0.8);
    check("/api/generate", &sampled, &[], None).await;
    check("/api/generate", &sampled, &[], None).await;
    let mut streamed = generation.clone();
    streamed["stream"] = json!(true);
    check("/api/generate", &streamed, &[], None).await;
    check(
        "/api/generate",
        &generation,
        &[("x-sollol-node", "one")],
        None,
    )
    .await;
    // Nor a generation that unloads its model: only a node can do that.
    let mut unloading = generation.clone();
    unloading["keep_alive"] = json!(0);
    check("/api/generate", &unloading, &[], None).await;
    // Errors are not kept: the second of these misses too.
    let mut refused = generation.clone();
    refused["model"] = json!("nomic-embed-text");
    for _ in 0..2 {
        let answer = post(&cluster.url("/api/generate"), refused.clone()).await;
        assert_eq!(answer.status, 400, "{}", answer.text());
        assert_eq!(
            answer
                .headers
                .get("x-sollol-cache")
                .map(|value| value.as_bytes()),
            Some(&b"miss"[..])
        );
    }

    // The counts: 18 misses and 16 hits above; the two errors were not kept.
    let metrics = get(&cluster.url("/metrics")).await.text();
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
    };
    assert_eq!(value("sollol_cache_misses_total"), 18);
    assert_eq!(value("sollol_cache_hits_total"), 16);
    assert_eq!(value("sollol_cache_entries"), 16);
    assert!(value("sollol_cache_bytes") > first.body.len() as u64);
    cluster.stop().await;
}

/// Above 64 nodes, intelligent routing weighs a ranked shortlist instead of every node: among 80 static
/// nodes it still finds the one fast node once every node has been measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_cluster_is_routed_through_its_ranked_shortlist() {
    const FAST: usize = 57;
    let mut emulators = Vec::new();
    for index in 0..80 {
        let speed = if index == FAST { 20_000.0 } else { 1_000.0 };
        emulators.push(
            Emulator::start(EmulatorConfig {
                name: format!("n{index}"),
                decode_tokens_per_second: speed,
                prompt_tokens_per_second: speed * 10.0,
                parallel: 1,
                ..EmulatorConfig::default()
            })
            .await
            .expect("emulator"),
        );
    }
    let urls: Vec<String> = emulators.iter().map(Emulator::url).collect();
    let urls = urls.join(",");
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = app::start_coordinator(&config(
        dir.path(),
        "c",
        &[
            ("coordinator.nodes", &urls),
            ("coordinator.probe_interval", "500ms"),
            ("coordinator.calibration", "false"),
            ("coordinator.warmup", "false"),
        ],
    ))
    .await
    .expect("coordinator");
    assert!(
        eventually(Duration::from_secs(10), || coordinator
            .view()
            .backends
            .len()
            == 80)
        .await,
        "80 static nodes never came up: {}",
        coordinator.view().backends.len()
    );
    let url = format!("http://{}/api/chat", coordinator.gateway_address);
    let chat = json!({"model": "smollm2:135m", "stream": false, "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 20}});
    let body = serde_json::to_vec(&chat).expect("json");
    // Round robin measures every node.
    for _ in 0..80 {
        let answer = send(
            "POST",
            &url,
            body.clone(),
            &[("x-sollol-strategy", "round_robin")],
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    assert!(
        eventually(Duration::from_secs(5), || {
            coordinator.learned().served.values().sum::<u64>() >= 80
        })
        .await,
        "the learner never caught up"
    );
    // The ranking is rebuilt from what was learned at most 250 ms later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fast = emulators[FAST].address().to_string();
    for _ in 0..5 {
        let answer = post(&url, chat.clone()).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(
            answer.node.as_deref(),
            Some(fast.as_str()),
            "{:?}",
            answer.decision
        );
    }
    coordinator.shutdown(Duration::from_secs(5)).await;
}
