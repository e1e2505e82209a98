//! Ollama's model management through the gateway, in front of emulated Ollama nodes behind real
//! agents: pull, copy, delete, create, push and blobs, sent to the named nodes or to the nodes the
//! change concerns, with several nodes' progress folded into one stream.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::Digest;
use sollol_ollama_emulator::EmulatorConfig;

mod support;

use support::cluster::{Cluster, cluster_with};
use support::{Answer, send};

async fn three_nodes(not_in_registry_on_b: &[&str]) -> Cluster {
    // Each emulated node keeps Ollama's store on disk, which its agent reads: models go node to node.
    let stores: Vec<tempfile::TempDir> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let nodes: Vec<EmulatorConfig> = ["a", "b", "c"]
        .iter()
        .zip(&stores)
        .map(|(name, store)| EmulatorConfig {
            name: (*name).to_owned(),
            not_in_registry: if *name == "b" {
                not_in_registry_on_b
                    .iter()
                    .map(|model| (*model).to_owned())
                    .collect()
            } else {
                Vec::new()
            },
            store: Some(store.path().to_owned()),
            ..EmulatorConfig::default()
        })
        .collect();
    let mut cluster = cluster_with(&[], &nodes).await;
    cluster.dirs.extend(stores);
    cluster
}

async fn call(
    cluster: &Cluster,
    method: &str,
    path: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> Answer {
    send(
        method,
        &cluster.url(path),
        serde_json::to_vec(&body).expect("json"),
        headers,
    )
    .await
}

/// Which emulated nodes hold `model`, by name.
fn holders(cluster: &Cluster, model: &str) -> Vec<String> {
    cluster
        .emulators
        .iter()
        .filter(|emulator| emulator.models().iter().any(|name| name == model))
        .map(|emulator| emulator.name().to_owned())
        .collect()
}

/// Waits until the coordinator's view shows `model` on exactly `nodes`.
async fn until_the_view_shows(cluster: &Cluster, model: &str, nodes: &[&str]) {
    until_the_view_shows_within(cluster, model, nodes, Duration::from_secs(10)).await;
}

async fn until_the_view_shows_within(
    cluster: &Cluster,
    model: &str,
    nodes: &[&str],
    within: Duration,
) {
    let started = Instant::now();
    loop {
        let mut seen: Vec<String> = cluster
            .coordinator
            .view()
            .backends
            .iter()
            .filter(|backend| backend.has_model(model))
            .map(|backend| backend.name.clone())
            .collect();
        seen.sort();
        if seen == nodes {
            return;
        }
        assert!(
            started.elapsed() < within,
            "the view shows {model} on {seen:?}, not {nodes:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn lines(answer: &Answer) -> Vec<Value> {
    answer
        .text()
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).expect("an NDJSON line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_copies_and_deletes_go_to_the_named_nodes_or_to_those_holding_the_model() {
    let cluster = three_nodes(&["missing:7b"]).await;
    // A pull fanned out to two nodes: one stream, each layer's bar adding up both nodes' bytes.
    let pulled = call(
        &cluster,
        "POST",
        "/api/pull",
        json!({"model": "tinyllama:1b"}),
        &[("x-sollol-nodes", "a, b")],
    )
    .await;
    assert_eq!(pulled.status, 200, "{}", pulled.text());
    assert_eq!(pulled.node.as_deref(), Some("a,b"));
    let progress = lines(&pulled);
    assert_eq!(
        progress.last(),
        Some(&json!({"status": "success"})),
        "{progress:?}"
    );
    let layer = progress
        .iter()
        .rfind(|line| line.get("digest").is_some())
        .expect("layer progress");
    // One node pulled from the registry, the other copied from it: the same layer, the same digest.
    assert_eq!(
        layer["total"],
        2 * EmulatorConfig::default().blob_bytes,
        "{layer}"
    );
    assert_eq!(layer["completed"], layer["total"], "{layer}");
    assert_eq!(holders(&cluster, "tinyllama:1b"), ["a", "b"]);
    let registry: Vec<u64> = cluster
        .emulators
        .iter()
        .map(|node| node.registry_pulls())
        .collect();
    assert_eq!(registry, [1, 0, 0], "{progress:?}");
    let downloaded: u64 = cluster
        .emulators
        .iter()
        .map(|node| node.registry_bytes())
        .sum();
    assert_eq!(
        downloaded,
        EmulatorConfig::default().blob_bytes,
        "the registry sent the model once"
    );
    assert!(
        progress.iter().any(|line| line["status"]
            .as_str()
            .is_some_and(|status| status.starts_with("copying ") && status.ends_with(" from a"))),
        "b copied from a: {progress:?}"
    );
    // The copy is listed with its outcome and counted in the metrics.
    let transfers = call(&cluster, "GET", "/api/sollol/v1/transfers", json!({}), &[]).await;
    let transfer = &transfers.json()["transfers"][0];
    assert_eq!(
        (
            &transfer["model"],
            &transfer["source"],
            &transfer["target"],
            &transfer["state"]
        ),
        (
            &json!("tinyllama:1b"),
            &json!("a"),
            &json!("b"),
            &json!("done")
        ),
        "{transfer}"
    );
    let metrics = call(&cluster, "GET", "/metrics", json!({}), &[])
        .await
        .text();
    assert!(
        metrics.contains(&format!(
            "sollol_model_transfer_bytes_total{{source=\"a\",target=\"b\",outcome=\"done\"}} {}",
            EmulatorConfig::default().blob_bytes
        )),
        "{metrics}"
    );
    until_the_view_shows(&cluster, "tinyllama:1b", &["a", "b"]).await;

    // Without a target a pull goes to the node that lacks the model.
    let placed = call(
        &cluster,
        "POST",
        "/api/pull",
        json!({"model": "tinyllama:1b", "stream": false}),
        &[],
    )
    .await;
    assert_eq!(placed.status, 200, "{}", placed.text());
    assert_eq!(placed.node.as_deref(), Some("c"));
    assert_eq!(holders(&cluster, "tinyllama:1b"), ["a", "b", "c"]);
    let registry: u64 = cluster
        .emulators
        .iter()
        .map(|node| node.registry_pulls())
        .sum();
    assert_eq!(registry, 1, "c copied from a or b");
    until_the_view_shows(&cluster, "tinyllama:1b", &["a", "b", "c"]).await;

    // A copy goes to the named nodes; a delete without names to every node (those without the model
    // answer 404, which there means "not here").
    let copied = call(
        &cluster,
        "POST",
        "/api/copy",
        json!({"source": "tinyllama:1b", "destination": "mine:v1"}),
        &[("x-sollol-nodes", "b,c")],
    )
    .await;
    assert_eq!(copied.status, 200, "{}", copied.text());
    assert_eq!(holders(&cluster, "mine:v1"), ["b", "c"]);
    // At once, before the nodes' next reports list the copy: the delete still reaches them.
    let deleted = call(
        &cluster,
        "DELETE",
        "/api/delete",
        json!({"model": "mine:v1"}),
        &[],
    )
    .await;
    assert_eq!(deleted.status, 200, "{}", deleted.text());
    assert_eq!(deleted.node.as_deref(), Some("b,c"));
    assert!(holders(&cluster, "mine:v1").is_empty());
    until_the_view_shows(&cluster, "mine:v1", &[]).await;
    let again = call(
        &cluster,
        "DELETE",
        "/api/delete",
        json!({"model": "mine:v1"}),
        &[],
    )
    .await;
    assert_eq!(again.status, 404, "{}", again.text());
    assert_eq!(again.json()["error"], "model 'mine:v1' not found");

    // One node failing a fan-out is named, with the nodes that succeeded; the stream still ends. b is
    // the first named, so it pulls from the registry (which lacks the model) while c waits to copy from
    // it; b has nothing to give, so c pulls from its own registry.
    let partly = call(
        &cluster,
        "POST",
        "/api/pull",
        json!({"model": "missing:7b"}),
        &[("x-sollol-nodes", "b,c")],
    )
    .await;
    assert_eq!(partly.status, 200, "{}", partly.text());
    let partly = lines(&partly);
    let error = partly
        .last()
        .and_then(|last| last["error"].as_str())
        .expect("an error line");
    assert!(
        error.starts_with("failed on b: pull model manifest: file does not exist")
            && error.ends_with("(done on c)"),
        "{error}"
    );
    assert!(
        partly.iter().any(|line| line["status"]
            .as_str()
            .is_some_and(|status| status.contains("pulling from the registry"))),
        "{partly:?}"
    );
    let unknown = call(
        &cluster,
        "POST",
        "/api/pull",
        json!({"model": "tinyllama:1b"}),
        &[("x-sollol-node", "nosuch")],
    )
    .await;
    assert_eq!(unknown.status, 404, "{}", unknown.text());
    assert!(unknown.text().contains("up: a, b, c"), "{}", unknown.text());

    // Names that are paths never reach a node.
    let before: u64 = cluster
        .emulators
        .iter()
        .map(|node| node.registry_pulls())
        .sum();
    for name in ["../../etc/passwd", "a/../../b", "bad\nname", "/abs:latest"] {
        let refused = call(&cluster, "POST", "/api/pull", json!({"model": name}), &[]).await;
        assert_eq!(refused.status, 400, "{name:?}: {}", refused.text());
        let refused = call(
            &cluster,
            "POST",
            "/api/copy",
            json!({"source": "tinyllama:1b", "destination": name}),
            &[],
        )
        .await;
        assert_eq!(refused.status, 400, "{name:?}: {}", refused.text());
    }
    let after: u64 = cluster
        .emulators
        .iter()
        .map(|node| node.registry_pulls())
        .sum();
    assert_eq!(before, after);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_created_from_an_uploaded_blob_is_created_where_the_blob_is() {
    let cluster = three_nodes(&[]).await;
    let weights = b"GGUF emulated weights".repeat(1000);
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&weights)));
    let blob = format!("/api/blobs/{digest}");
    let head = send("HEAD", &cluster.url(&blob), Vec::new(), &[]).await;
    assert_eq!(head.status, 404);
    let uploaded = send(
        "POST",
        &cluster.url(&blob),
        weights.clone(),
        &[("x-sollol-node", "b")],
    )
    .await;
    assert_eq!(uploaded.status, 201, "{}", uploaded.text());
    let head = send("HEAD", &cluster.url(&blob), Vec::new(), &[]).await;
    assert_eq!((head.status, head.node.as_deref()), (200, Some("b")));
    // The node checks the digest; its refusal comes back as it gave it.
    let wrong = send("POST", &cluster.url(&blob), b"other bytes".to_vec(), &[]).await;
    assert_eq!(wrong.status, 400, "{}", wrong.text());
    assert!(wrong.text().contains("digest mismatch"), "{}", wrong.text());

    let created = call(
        &cluster,
        "POST",
        "/api/create",
        json!({"model": "uploaded", "files": {"model.gguf": digest}, "stream": false}),
        &[],
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.text());
    assert_eq!(created.node.as_deref(), Some("b"));
    assert_eq!(holders(&cluster, "uploaded:latest"), ["b"]);
    let missing = format!("sha256:{}", "0".repeat(64));
    let refused = call(
        &cluster,
        "POST",
        "/api/create",
        json!({"model": "other", "files": {"model.gguf": missing}}),
        &[],
    )
    .await;
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert!(
        refused.text().contains("upload it first"),
        "{}",
        refused.text()
    );
    // A model created from another goes where that one is: here, every node.
    let derived = call(
        &cluster,
        "POST",
        "/api/create",
        json!({"model": "derived", "from": "smollm2:135m"}),
        &[],
    )
    .await;
    assert_eq!(derived.status, 200, "{}", derived.text());
    assert_eq!(lines(&derived).last(), Some(&json!({"status": "success"})));
    assert_eq!(holders(&cluster, "derived:latest"), ["a", "b", "c"]);

    until_the_view_shows(&cluster, "uploaded:latest", &["b"]).await;
    let pushed = call(
        &cluster,
        "POST",
        "/api/push",
        json!({"model": "uploaded"}),
        &[],
    )
    .await;
    assert_eq!(pushed.status, 200, "{}", pushed.text());
    assert_eq!(pushed.node.as_deref(), Some("b"));
    let pushes: Vec<u64> = cluster
        .emulators
        .iter()
        .map(|node| node.registry_pushes())
        .collect();
    assert_eq!(pushes, [0, 1, 0]);
    cluster.stop().await;
}

/// The official `ollama` Python client, pointed at the gateway: pull on every node with one progress
/// stream, copy, delete, create from an uploaded file, a refused name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_ollama_client_manages_models_through_the_gateway() {
    let cluster = three_nodes(&[]).await;
    let gateway = cluster.url("");
    support::run_client_script(
        "model_management.py",
        &[&gateway],
        "model management: 4 passed, 0 failed",
    )
    .await;
    assert_eq!(holders(&cluster, "tinyllama:1b"), ["a", "b", "c"]);
    cluster.stop().await;
}

/// `sollol models`, `sollol pull` and `sollol rm`, the built binary against the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_commands_show_pull_and_remove() {
    let cluster = three_nodes(&[]).await;
    let url = cluster.url("");
    let data_dir = tempfile::tempdir().expect("tempdir");
    let sollol = |args: &[&str]| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_sollol"));
        command
            .args(args)
            .args(["--url", &url])
            .env("SOLLOL_DATA_DIR", data_dir.path());
        async move {
            let output = command.output().await.expect("run sollol");
            (
                output.status.code(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        }
    };
    let (code, table, _) = sollol(&["models"]).await;
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines
            .first()
            .map(|line| line.split_whitespace().collect::<Vec<_>>()),
        Some(vec!["MODEL", "SIZE", "a", "b", "c"]),
        "{table}"
    );
    assert!(
        lines.iter().any(|line| line.starts_with("smollm2:135m")
            && line.split_whitespace().skip(3).collect::<Vec<_>>() == ["yes", "yes", "yes"]),
        "{table}"
    );

    let (code, out, err) = sollol(&["pull", "tinyllama:1b", "--nodes", "a,b"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out.trim(), "pulled tinyllama:1b onto a, b");
    assert!(
        err.contains("100% of"),
        "plain progress lines when not a terminal: {err}"
    );
    until_the_view_shows(&cluster, "tinyllama:1b", &["a", "b"]).await;
    let (code, json, _) = sollol(&["models", "--json"]).await;
    assert_eq!(code, Some(0));
    let matrix: Value = serde_json::from_str(&json).expect("json");
    let row = matrix["models"]
        .as_array()
        .and_then(|rows| rows.iter().find(|row| row["model"] == "tinyllama:1b"))
        .expect("a row for tinyllama");
    assert_eq!(row["on"], json!(["present", "present", "absent"]));

    let (code, out, err) = sollol(&["rm", "tinyllama:1b"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out.trim(), "removed tinyllama:1b from a, b");
    until_the_view_shows(&cluster, "tinyllama:1b", &[]).await;
    let (code, _, err) = sollol(&["rm", "tinyllama:1b"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("model 'tinyllama:1b' not found"), "{err}");
    let (code, _, err) = sollol(&["pull", "../../etc/passwd"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("invalid model name"), "{err}");
    cluster.stop().await;
}

/// Ollama's unload (a load-only request with `keep_alive: 0`, as Open WebUI and `ollama stop` send it)
/// reaches every node that has the model loaded, not only the one routing would pick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unload_reaches_every_node_that_has_the_model_loaded() {
    let cluster = three_nodes(&[]).await;
    for node in ["a", "b"] {
        let loaded = call(
            &cluster,
            "POST",
            "/api/generate",
            json!({"model": "smollm2:135m"}),
            &[("x-sollol-node", node)],
        )
        .await;
        assert_eq!(loaded.status, 200, "{}", loaded.text());
    }
    let started = Instant::now();
    while cluster
        .coordinator
        .view()
        .backends
        .iter()
        .filter(|backend| backend.has_loaded("smollm2:135m"))
        .count()
        < 2
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never reported loaded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let unloaded = call(
        &cluster,
        "POST",
        "/api/generate",
        json!({"model": "smollm2:135m", "keep_alive": 0}),
        &[],
    )
    .await;
    assert_eq!(unloaded.status, 200, "{}", unloaded.text());
    assert_eq!(unloaded.node.as_deref(), Some("a,b"));
    for emulator in &cluster.emulators {
        assert!(
            !emulator
                .loaded_models()
                .iter()
                .any(|model| model == "smollm2:135m"),
            "{} still has it loaded",
            emulator.name()
        );
    }
    cluster.stop().await;
}

/// `models.replicas = "all"`: the coordinator copies the model onto every node (from the one that has
/// it: no registry pull), and onto a node that replaces one that left; a count set through the API is
/// kept too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_fill_every_node_and_a_node_that_replaces_one() {
    let stores: Vec<tempfile::TempDir> = (0..4)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let node = |name: &str, store: &tempfile::TempDir, models: &[&str]| EmulatorConfig {
        name: name.to_owned(),
        models: models.iter().map(|model| (*model).to_owned()).collect(),
        store: Some(store.path().to_owned()),
        ..EmulatorConfig::default()
    };
    let nodes = [
        node("a", &stores[0], &["qwen3:0.6b"]),
        node("b", &stores[1], &[]),
        node("c", &stores[2], &[]),
    ];
    let mut cluster = cluster_with(&[("models.replicas", "qwen3:0.6b=all")], &nodes).await;
    until_the_view_shows_within(
        &cluster,
        "qwen3:0.6b",
        &["a", "b", "c"],
        Duration::from_secs(30),
    )
    .await;
    let registry: u64 = cluster
        .emulators
        .iter()
        .map(|node| node.registry_pulls())
        .sum();
    assert_eq!(registry, 0, "copied from a, not pulled");

    // c leaves; d joins and gets a copy.
    cluster
        .agents
        .pop()
        .expect("c's agent")
        .stop(Duration::from_secs(5))
        .await
        .expect("stop c");
    cluster.emulators.pop();
    cluster.add_node(node("d", &stores[3], &[])).await;
    until_the_view_shows_within(
        &cluster,
        "qwen3:0.6b",
        &["a", "b", "d"],
        Duration::from_secs(30),
    )
    .await;
    let listed = call(&cluster, "GET", "/api/sollol/v1/replicas", json!({}), &[]).await;
    assert_eq!(
        listed.json()["replicas"],
        json!([{"model": "qwen3:0.6b", "wanted": "all", "holders": ["a", "b", "d"], "origin": "config"}])
    );

    // `sollol models` says which counts the coordinator keeps.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_sollol"))
        .args(["models", "--url", &cluster.url("")])
        .env("SOLLOL_DATA_DIR", cluster.dirs[0].path())
        .output()
        .await
        .expect("run sollol models");
    let table = String::from_utf8_lossy(&output.stdout);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|line| line.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0], ["MODEL", "SIZE", "KEEP", "a", "b", "d"], "{table}");
    assert!(
        rows.iter()
            .any(|row| row[0] == "qwen3:0.6b" && row[3..] == ["all", "yes", "yes", "yes"]),
        "{table}"
    );

    // Two copies of a model no node has: one registry pull, one copy of it.
    let set = call(
        &cluster,
        "PUT",
        "/api/sollol/v1/replicas/tinyllama:1b",
        json!({"replicas": 2}),
        &[],
    )
    .await;
    assert_eq!(set.status, 200, "{}", set.text());
    let started = Instant::now();
    while holders(&cluster, "tinyllama:1b").len() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "two copies never appeared: {:?}",
            holders(&cluster, "tinyllama:1b")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let registry: u64 = cluster
        .emulators
        .iter()
        .map(|node| node.registry_pulls())
        .sum();
    assert_eq!(registry, 1);
    for (body, status) in [
        (json!({"replicas": 0}), 400),
        (json!({"replicas": "most"}), 400),
        (json!({}), 400),
    ] {
        let refused = call(
            &cluster,
            "PUT",
            "/api/sollol/v1/replicas/tinyllama:1b",
            body.clone(),
            &[],
        )
        .await;
        assert_eq!(refused.status, status, "{body}: {}", refused.text());
    }
    let forgotten = call(
        &cluster,
        "DELETE",
        "/api/sollol/v1/replicas/tinyllama:1b",
        json!({}),
        &[],
    )
    .await;
    assert_eq!(forgotten.status, 200, "{}", forgotten.text());
    assert_eq!(
        holders(&cluster, "tinyllama:1b").len(),
        2,
        "nothing is removed"
    );
    cluster.stop().await;
}

/// A holder whose file no longer matches its digest (bit rot, a file changed under the agent) sends bytes
/// the target discards; the target says so and copies from the next holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_do_not_match_the_digest_are_discarded_and_the_next_holder_used() {
    let cluster = three_nodes(&[]).await;
    let pulled = call(
        &cluster,
        "POST",
        "/api/pull",
        json!({"model": "tinyllama:1b"}),
        &[("x-sollol-nodes", "a,b")],
    )
    .await;
    let progress = lines(&pulled);
    assert_eq!(
        progress.last(),
        Some(&json!({"status": "success"})),
        "{progress:?}"
    );
    let digest = progress
        .iter()
        .find_map(|line| line["digest"].as_str())
        .expect("a layer digest")
        .to_owned();
    until_the_view_shows(&cluster, "tinyllama:1b", &["a", "b"]).await;
    // a's blob: the same length, other bytes.
    let blob = cluster.emulators[0]
        .store()
        .expect("a store")
        .join("blobs")
        .join(digest.replace(':', "-"));
    let mut bytes = std::fs::read(&blob).expect("a's blob");
    bytes[1000] ^= 0xff;
    std::fs::write(&blob, &bytes).expect("corrupt a's blob");

    let copied = call(
        &cluster,
        "POST",
        "/api/pull",
        json!({"model": "tinyllama:1b"}),
        &[("x-sollol-node", "c")],
    )
    .await;
    let progress = lines(&copied);
    assert_eq!(
        progress.last(),
        Some(&json!({"status": "success"})),
        "{progress:?}"
    );
    assert!(
        progress
            .iter()
            .any(|line| line["status"].as_str().is_some_and(|status| {
                status.starts_with("copying from a failed (sent bytes whose digest is")
                    && status.contains("discarded")
            })),
        "{progress:?}"
    );
    assert!(
        progress.iter().any(|line| line["status"]
            .as_str()
            .is_some_and(|status| status.ends_with(" from b"))),
        "{progress:?}"
    );
    // c's Ollama took the blob (it checks the digest too) and lists the model; no registry pull.
    assert_eq!(holders(&cluster, "tinyllama:1b"), ["a", "b", "c"]);
    let registry: u64 = cluster
        .emulators
        .iter()
        .map(|node| node.registry_pulls())
        .sum();
    assert_eq!(registry, 1);
    cluster.stop().await;
}
