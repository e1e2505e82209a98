//! Hosts in network namespaces for the multi-host black-box tests: each test makes its own
//! namespaces (named after its process id) and removes them, and everything running in them, on drop.
//! Needs root and `ip` from iproute2.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::SOLLOL;

/// Namespaces and processes, removed on drop: also when an assertion fails.
pub struct Hosts {
    prefix: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
    logs: tempfile::TempDir,
}

impl Hosts {
    pub fn new() -> Self {
        Self {
            prefix: format!("sl{}", std::process::id() % 100_000),
            namespaces: Vec::new(),
            children: Vec::new(),
            logs: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn ns(&self, host: &str) -> String {
        format!("{}{host}", self.prefix)
    }

    pub fn add(&mut self, host: &str) {
        let name = self.ns(host);
        ip(&["netns", "add", &name]);
        self.namespaces.push(name);
        self.run(host, &["ip", "link", "set", "lo", "up"]);
    }

    /// Runs `command` in `host` and asserts it succeeds; returns its stdout.
    pub fn run(&self, host: &str, command: &[&str]) -> String {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.ns(host)])
            .args(command)
            .output()
            .expect("run ip netns exec");
        assert!(
            output.status.success(),
            "{host}: {command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Like `run`, but a failure is returned, not asserted.
    pub fn try_run(&self, host: &str, command: &[&str]) -> Option<String> {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.ns(host)])
            .args(command)
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// A switch: namespace `sw` with bridge `br0`, and each host's `eth0` on it with its address.
    pub fn lan(&mut self, hosts: &[(&str, &str)]) {
        self.run("sw", &["ip", "link", "add", "br0", "type", "bridge"]);
        self.run("sw", &["ip", "link", "set", "br0", "up"]);
        for (host, address) in hosts {
            let port = format!("p-{host}");
            let peer_ns = self.ns(host);
            self.run(
                "sw",
                &[
                    "ip", "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                    &peer_ns,
                ],
            );
            self.run("sw", &["ip", "link", "set", &port, "master", "br0", "up"]);
            self.run(host, &["ip", "addr", "add", address, "dev", "eth0"]);
            self.run(host, &["ip", "link", "set", "eth0", "up"]);
        }
    }

    /// Starts `command` in `host` in the background, its output in a log named `name`; returns the
    /// process's id (`ip netns exec` execs the command, so it is the command's own).
    pub fn spawn(&mut self, host: &str, name: &str, env: &[(&str, &str)], command: &[&str]) -> u32 {
        let log = std::fs::File::create(self.log(name)).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(host)])
            .args(command)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn in namespace");
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Sends `signal` (`-KILL`, `-TERM`) to a process `spawn` started and reaps it.
    pub fn signal(&mut self, pid: u32, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
        if let Some(index) = self.children.iter().position(|child| child.id() == pid) {
            let mut child = self.children.swap_remove(index);
            let _ = child.wait();
        }
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.logs.path().join(format!("{name}.log"))
    }

    /// Every process's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        if let Ok(entries) = std::fs::read_dir(self.logs.path()) {
            for entry in entries.flatten() {
                let content = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let keep = std::env::var("SOLLOL_TEST_LOG_LINES")
                    .ok()
                    .and_then(|lines| lines.parse().ok())
                    .unwrap_or(15);
                let tail: Vec<&str> = content.lines().rev().take(keep).collect();
                text.push_str(&format!("--- {}\n", entry.path().display()));
                for line in tail.into_iter().rev() {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
        text
    }

    /// Polls `check` until it returns `Some`, at most `timeout`; fails with every log otherwise.
    pub fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Option<T>,
    ) -> T {
        let started = Instant::now();
        loop {
            if let Some(value) = check() {
                return value;
            }
            assert!(
                started.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for namespace in &self.namespaces {
            // Anything still running in it (a grandchild) goes too, then the namespace and its links.
            if let Ok(output) = Command::new("ip")
                .args(["netns", "pids", namespace])
                .output()
            {
                for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip")
                .args(["netns", "del", namespace])
                .status();
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(namespace));
        }
    }
}

pub fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        output.status.success(),
        "ip {args:?} failed: {} (this test needs root and iproute2)",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The emulated Ollama server built beside the sollol binary (`scripts/test` builds it first).
pub fn emulator() -> PathBuf {
    let path = Path::new(SOLLOL).with_file_name("ollama-emulator");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p sollol-ollama-emulator`",
        path.display()
    );
    path
}
