//! Models copied between agents, black-box: `sollol up` and `sollol agent` processes serving the built-in
//! engine, two of them holding the test model and a large file, pulls through the gateway onto the others.
//! The official `ollama` client pulls the test model onto a node that lacks it (copied node to node, the
//! same digest, then a greedy chat gives llama.cpp's reference text); copy and delete on an engine node;
//! a source SIGKILLed mid-copy is replaced by the other holder without a half file becoming visible; a
//! node with too little room refuses before writing anything.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::Digest;

mod common;
#[path = "../agent/tests/support/mod.rs"]
mod support;

use common::{Banner, Process, agent_command, run, start_up_with, temp_dir};

/// The large file's size: big enough that a copy takes many progress reports (one per 16 MiB).
const BIG_BYTES: u64 = 384 << 20;

/// An agent with the built-in engine on, its models in `models_dir`, `env` over the test defaults.
fn start_agent(
    banner: &Banner,
    data_dir: &Path,
    name: &str,
    models_dir: &Path,
    env: &[(&str, &str)],
) -> Process {
    let mut command = agent_command(banner, data_dir, name);
    command
        .env("SOLLOL_ENGINE", "on")
        .env("SOLLOL_ENGINE_BIND", "127.0.0.1:0")
        .env("SOLLOL_STAGE_BIND", "127.0.0.1:0")
        .env("SOLLOL_MODELS_DIR", models_dir);
    for (key, value) in env {
        command.env(key, value);
    }
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sollol agent");
    Process {
        child,
        name: "sollol agent",
    }
}

/// Waits until `sollol models --json` shows each `(model, node)` pair present.
fn wait_for_models(gateway: &str, wanted: &[(&str, &str)]) {
    let started = Instant::now();
    loop {
        let output = run(&["models", "--json", "--url", gateway]);
        if output.status.success() {
            let matrix: Value = serde_json::from_slice(&output.stdout).expect("json");
            let nodes: Vec<&str> = matrix["nodes"]
                .as_array()
                .map(|nodes| nodes.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let present = |model: &str, node: &str| {
                let column = nodes.iter().position(|name| *name == node);
                matrix["models"].as_array().is_some_and(|rows| {
                    rows.iter().any(|row| {
                        row["model"] == model
                            && column.is_some_and(|column| row["on"][column] == "present")
                    })
                })
            };
            if wanted.iter().all(|(model, node)| present(model, node)) {
                return;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the gateway never showed {wanted:?}: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `method path` with a JSON `body` to the gateway (to `node`, when named) over HTTP/1.0; the status
/// and a reader positioned at the body.
fn request(
    gateway: &str,
    method: &str,
    path: &str,
    node: Option<&str>,
    body: &str,
) -> (u16, BufReader<TcpStream>) {
    let address = gateway.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = TcpStream::connect(address).expect("connect to the gateway");
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    let node = node.map_or_else(String::new, |node| format!("X-Sollol-Node: {node}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {address}\r\nContent-Type: application/json\r\n{node}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send the request");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).expect("read the status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {line:?}"));
    // The headers.
    loop {
        line.clear();
        reader.read_line(&mut line).expect("read headers");
        if line.trim().is_empty() {
            break;
        }
    }
    (status, reader)
}

/// `POST /api/pull` of `model` onto `node`, its NDJSON lines handed to `each` as they arrive.
fn pull_lines(gateway: &str, node: &str, model: &str, mut each: impl FnMut(&Value)) -> Vec<Value> {
    let body = format!(r#"{{"model": "{model}"}}"#);
    let (_, reader) = request(gateway, "POST", "/api/pull", Some(node), &body);
    let mut lines = Vec::new();
    for line in reader.lines() {
        let line = line.expect("read a progress line");
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(&line).expect("an NDJSON line");
        each(&value);
        lines.push(value);
    }
    lines
}

fn sha256_of(path: &Path) -> String {
    let mut file = std::fs::File::open(path).expect("open");
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer).expect("read");
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

/// What `directory` holds besides the model files the engine lists: the partial copies.
fn partial_files(directory: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(directory.join(".partial"))
        .map(|entries| entries.flatten().map(|entry| entry.path()).collect())
        .unwrap_or_default()
}

#[test]
fn models_copy_between_engine_agents_resume_from_another_holder_and_respect_disk_limits() {
    let (_root, root) = temp_dir();
    let model = support::test_model();
    let model_digest = sha256_of(&model);
    // The large "model": the same bytes on both holders (not a GGUF: it is copied, never loaded).
    let big = root.join("big.bin");
    let mut bytes = vec![0u8; BIG_BYTES as usize];
    for (index, byte) in bytes.iter_mut().enumerate() {
        *byte = (index % 251) as u8;
    }
    std::fs::write(&big, &bytes).expect("write the large file");
    drop(bytes);
    let big_digest = sha256_of(&big);

    let empty = root.join("up-models");
    std::fs::create_dir_all(&empty).expect("dir");
    let (_up, banner) = start_up_with(
        &root.join("up"),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[],
        &[
            ("SOLLOL_ENGINE", "on"),
            ("SOLLOL_ENGINE_BIND", "127.0.0.1:0"),
            ("SOLLOL_STAGE_BIND", "127.0.0.1:0"),
            ("SOLLOL_MODELS_DIR", &empty.display().to_string()),
        ],
    );
    let mut agents = Vec::new();
    for holder in ["a", "b"] {
        let models = root.join(format!("{holder}-models"));
        std::fs::create_dir_all(&models).expect("dir");
        std::os::unix::fs::symlink(&model, models.join("smollm2:135m.gguf")).expect("link");
        std::os::unix::fs::symlink(&big, models.join("big:1b.gguf")).expect("link");
        agents.push(Some(start_agent(
            &banner,
            &root.join(holder),
            holder,
            &models,
            &[],
        )));
    }
    let target = root.join("c-models");
    std::fs::create_dir_all(&target).expect("dir");
    let _c = start_agent(&banner, &root.join("c"), "c", &target, &[]);
    let small = root.join("small-models");
    std::fs::create_dir_all(&small).expect("dir");
    let _small = start_agent(
        &banner,
        &root.join("small"),
        "small",
        &small,
        &[("SOLLOL_ENGINE_MAX_DISK", "100MB")],
    );
    wait_for_models(
        &banner.gateway,
        &[
            ("smollm2:135m", "a"),
            ("smollm2:135m", "b"),
            ("big:1b", "a"),
            ("big:1b", "b"),
        ],
    );

    // The official client pulls the test model onto c: copied from a or b, then it answers like llama.cpp.
    let output = std::process::Command::new(support::test_python())
        .arg(support::root().join("tests/clients/model_copy.py"))
        .args([&banner.gateway, "c", "smollm2:135m", &model_digest])
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("model copy: 3 passed, 0 failed"),
        "model_copy.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(sha256_of(&target.join("smollm2:135m.gguf")), model_digest);

    // The file removed by hand: the gateway still lists the model on c until c's next report, so c's own
    // pull is asked first; the engine says it lacks the model, and the gateway copies it from a holder.
    std::fs::remove_file(target.join("smollm2:135m.gguf")).expect("remove c's copy");
    let lines = pull_lines(&banner.gateway, "c", "smollm2:135m", |_| {});
    assert_eq!(
        lines.last(),
        Some(&serde_json::json!({"status": "success"})),
        "{lines:?}"
    );
    assert_eq!(sha256_of(&target.join("smollm2:135m.gguf")), model_digest);

    // Copy and delete through the gateway on an engine node: a second name for the same file, then gone.
    let (status, mut answer) = request(
        &banner.gateway,
        "POST",
        "/api/copy",
        Some("c"),
        r#"{"source": "smollm2:135m", "destination": "mine:v1"}"#,
    );
    let mut text = String::new();
    answer.read_to_string(&mut text).expect("read the answer");
    assert_eq!(status, 200, "{text}");
    assert_eq!(sha256_of(&target.join("mine:v1.gguf")), model_digest);
    wait_for_models(&banner.gateway, &[("mine:v1", "c")]);
    let (status, mut answer) = request(
        &banner.gateway,
        "DELETE",
        "/api/delete",
        None,
        r#"{"model": "mine:v1"}"#,
    );
    let mut text = String::new();
    answer.read_to_string(&mut text).expect("read the answer");
    assert_eq!(status, 200, "{text}");
    assert!(!target.join("mine:v1.gguf").exists());
    assert!(
        target.join("smollm2:135m.gguf").exists(),
        "the source stays"
    );

    // The large file onto c; its first source is killed (SIGKILL) after the first progress report.
    let mut killed = None;
    let lines = pull_lines(&banner.gateway, "c", "big:1b", |line| {
        let status = line["status"].as_str().unwrap_or_default();
        if killed.is_none()
            && status.starts_with("copying ")
            && line["completed"].as_u64() < line["total"].as_u64()
        {
            let source = status.rsplit(' ').next().unwrap_or_default().to_owned();
            let index = ["a", "b"]
                .iter()
                .position(|name| *name == source)
                .unwrap_or_else(|| panic!("copying from an unknown node: {line}"));
            if let Some(agent) = agents[index].take() {
                agent.signal("-KILL");
                drop(agent);
            }
            killed = Some(source);
        }
    });
    let killed = killed.unwrap_or_else(|| panic!("no progress report before the end: {lines:?}"));
    assert_eq!(
        lines.last(),
        Some(&serde_json::json!({"status": "success"})),
        "{lines:?}"
    );
    let other = if killed == "a" { "b" } else { "a" };
    assert!(
        lines.iter().any(|line| line["status"]
            .as_str()
            .is_some_and(|status| status.ends_with(&format!(" from {other}")))),
        "the copy went on from {other}: {lines:?}"
    );
    let copied = target.join("big:1b.gguf");
    assert_eq!(
        std::fs::metadata(&copied)
            .map(|metadata| metadata.len())
            .ok(),
        Some(BIG_BYTES)
    );
    assert_eq!(sha256_of(&copied), big_digest);
    assert!(
        partial_files(&target).is_empty(),
        "{:?}",
        partial_files(&target)
    );

    // A node with too little room says so before writing a byte.
    let lines = pull_lines(&banner.gateway, "small", "big:1b", |_| {});
    let error = lines
        .last()
        .and_then(|line| line["error"].as_str())
        .unwrap_or_else(|| panic!("an error line: {lines:?}"));
    assert!(
        error.contains("not enough disk on node small for big:1b")
            && error.contains("engine.max_disk = 100.0 MB"),
        "{error}"
    );
    assert!(!small.join("big:1b.gguf").exists());
    assert!(
        partial_files(&small).is_empty(),
        "{:?}",
        partial_files(&small)
    );
}
