//! What the black-box tests share: the built binary started with an isolated environment, its
//! processes killed however a test ends, and `sollol up`'s banner read back.

#![allow(dead_code)] // each test file uses its own part

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub mod hosts;

pub const SOLLOL: &str = env!("CARGO_BIN_EXE_sollol");

/// A child process that is killed when the test ends, however it ends.
pub struct Process {
    pub child: Child,
    pub name: &'static str,
}

impl Process {
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {} failed", self.name);
    }

    /// Sends SIGTERM and waits; returns the exit code and everything written to stderr.
    pub fn terminate(mut self) -> (Option<i32>, String) {
        self.signal("-TERM");
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                let mut stderr = String::new();
                if let Some(mut pipe) = self.child.stderr.take() {
                    std::io::Read::read_to_string(&mut pipe, &mut stderr).expect("read stderr");
                }
                return (status.code(), stderr);
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{} did not exit on SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn sollol(args: &[&str]) -> Command {
    let mut command = Command::new(SOLLOL);
    command.args(args);
    // Isolate from the machine's own configuration: no SOLLOL_* variables, no config file.
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("SOLLOL_")) {
        command.env_remove(name);
    }
    // Tests stay on loopback: no mDNS on the machine's interfaces.
    command.env("SOLLOL_MDNS", "false");
    command.env(
        "XDG_CONFIG_HOME",
        std::env::temp_dir().join("sollol-blackbox-no-config"),
    );
    command
}

pub fn run(args: &[&str]) -> Output {
    sollol(args).output().expect("run sollol")
}

/// What `sollol up` printed: the gateway URL and the join command's address and token.
pub struct Banner {
    pub gateway: String,
    pub join: String,
    pub token: String,
}

/// Starts `sollol up` and reads its banner from stdout.
pub fn start_up(data_dir: &Path, gateway_bind: &str, cluster_bind: &str) -> (Process, Banner) {
    start_up_with(data_dir, gateway_bind, cluster_bind, &[], &[])
}

/// [`start_up`] with more arguments and environment variables.
pub fn start_up_with(
    data_dir: &Path,
    gateway_bind: &str,
    cluster_bind: &str,
    extra_args: &[&str],
    env: &[(&str, &str)],
) -> (Process, Banner) {
    let mut command = sollol(&[
        "up",
        "--data-dir",
        &data_dir.display().to_string(),
        "--gateway-bind",
        gateway_bind,
        "--cluster-bind",
        cluster_bind,
        "--name",
        "coordinator-node",
        "--heartbeat-interval",
        "250ms",
        "--reconnect-max-backoff",
        "500ms",
    ]);
    command.args(extra_args);
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sollol up");
    let stdout = child.stdout.take().expect("stdout");
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let process = Process {
        child,
        name: "sollol up",
    };
    let mut gateway = None;
    let mut join_address = None;
    let mut token_text = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while gateway.is_none() || join_address.is_none() || token_text.is_none() {
        let line = receiver
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("sollol up printed its banner");
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Gateway:", url, ..] => gateway = Some((*url).to_owned()),
            ["sollol", "agent", "--join", address, "--token-file", _] => {
                join_address = Some((*address).to_owned());
            }
            ["Token:", token, ..] => token_text = Some((*token).to_owned()),
            _ => {}
        }
    }
    let (join, token) = (
        join_address.expect("join line"),
        token_text.expect("token line"),
    );
    let banner = Banner {
        gateway: gateway.expect("gateway line"),
        join,
        token,
    };
    (process, banner)
}

/// `sollol agent` joining the coordinator of `banner` as `name`, its token in a file only this user reads
/// (as the banner says: never on the command line), its data in `data_dir`; not started.
pub fn agent_command(banner: &Banner, data_dir: &Path, name: &str) -> Command {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(data_dir).expect("data dir");
    let token_file = data_dir.join("coordinator-token");
    std::fs::write(&token_file, &banner.token).expect("token file");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).expect("mode");
    sollol(&[
        "agent",
        "--join",
        &banner.join,
        "--token-file",
        &token_file.display().to_string(),
        "--data-dir",
        &data_dir.display().to_string(),
        "--name",
        name,
        "--heartbeat-interval",
        "250ms",
    ])
}

pub fn temp_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_owned();
    (dir, path)
}
