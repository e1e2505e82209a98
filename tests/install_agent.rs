//! `scripts/install-agent.sh` against a fake root (`DESTDIR`): the files it writes, their modes, that the
//! written config is one the built binary accepts, the unit under `systemd-analyze verify` where there is
//! one, a second run changing only what changed, and `--uninstall` leaving nothing behind.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SOLLOL: &str = env!("CARGO_BIN_EXE_sollol");

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-agent.sh")
}

fn install(root: &Path, args: &[&str]) -> Output {
    Command::new("sh")
        .arg(script())
        .args(args)
        .env("DESTDIR", root)
        .output()
        .expect("run install-agent.sh")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Every file under `root`, relative, sorted.
fn files(root: &Path) -> Vec<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, root, out);
            } else {
                out.push(
                    path.strip_prefix(root)
                        .expect("under root")
                        .display()
                        .to_string(),
                );
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn the_agent_installs_into_a_fake_root_and_uninstalls_without_a_trace() {
    // The binary ships the same script (`sollol install-script`), for installs from a copied binary.
    let shipped = Command::new(SOLLOL)
        .arg("install-script")
        .output()
        .expect("sollol install-script");
    assert!(shipped.status.success());
    assert_eq!(
        String::from_utf8_lossy(&shipped.stdout),
        std::fs::read_to_string(script()).expect("the script")
    );

    let root = tempfile::tempdir().expect("tempdir");
    let root = root.path();
    // The token arrives in a file, as `sollol up` says; never on the command line.
    let tokens = tempfile::tempdir().expect("tempdir");
    let token_file = tokens.path().join("cluster-token");
    std::fs::write(&token_file, "tok-0123456789abcdef0123456789abcdef\n").expect("token");
    let other_token_file = tokens.path().join("other-token");
    std::fs::write(&other_token_file, "tok-fedcba9876543210fedcba9876543210").expect("token");
    let token_path = token_file.display().to_string();
    let other_token_path = other_token_file.display().to_string();
    let args = [
        "--join",
        "127.0.0.1:11436",
        "--token-file",
        &token_path,
        "--name",
        "pi-kitchen",
        "--binary",
        SOLLOL,
    ];
    let first = install(root, &args);
    assert!(first.status.success(), "{}", text(&first));
    assert_eq!(
        files(root),
        [
            "etc/sollol/.installed",
            "etc/sollol/agent.toml",
            "etc/systemd/system/sollol-agent.service",
            "usr/local/bin/sollol",
        ]
    );

    // The binary runs; the config is private and is one the binary accepts, every value from the file.
    let binary = root.join("usr/local/bin/sollol");
    assert_eq!(mode(&binary), 0o755);
    let version = Command::new(&binary)
        .arg("version")
        .output()
        .expect("run the installed binary");
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("sollol "));
    let config = root.join("etc/sollol/agent.toml");
    assert_eq!(mode(&config), 0o600);
    let shown = Command::new(&binary)
        .args(["print-config", "--config"])
        .arg(&config)
        .env_remove("SOLLOL_DATA_DIR")
        .output()
        .expect("print-config");
    let shown_text = text(&shown);
    assert!(shown.status.success(), "{shown_text}");
    for expected in [
        "join = \"127.0.0.1:11436\"",
        "name = \"pi-kitchen\"",
        "data_dir = \"/var/lib/sollol\"",
    ] {
        assert!(shown_text.contains(expected), "{expected} in {shown_text}");
    }

    // The unit: a dedicated user, restarts, sandboxing.
    let unit_path = root.join("etc/systemd/system/sollol-agent.service");
    let unit = std::fs::read_to_string(&unit_path).expect("unit");
    for line in [
        "User=sollol",
        "ExecStart=/usr/local/bin/sollol agent --config /etc/sollol/agent.toml",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "PrivateTmp=yes",
        "ReadWritePaths=/var/lib/sollol",
        "WantedBy=multi-user.target",
    ] {
        assert!(
            unit.lines().any(|have| have == line),
            "{line} missing from the unit"
        );
    }
    // systemd's own check, where systemd-analyze exists: on a copy whose ExecStart is the installed
    // binary (the fake root is not a system verify can boot into). It reports problems on lines naming
    // the unit, and exits 0 for some of them: any such line fails the test.
    let check = tempfile::tempdir().expect("tempdir");
    let copy = check.path().join("sollol-agent.service");
    std::fs::write(
        &copy,
        unit.replace(
            "ExecStart=/usr/local/bin/sollol",
            &format!("ExecStart={}", binary.display()),
        ),
    )
    .expect("unit copy");
    if let Ok(verify) = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
    {
        let said = text(&verify);
        assert!(
            verify.status.success() && !said.contains("sollol-agent.service"),
            "systemd-analyze verify: {said}"
        );
    }

    // The unit a release tarball ships is the one installed.
    let printed = install(root, &["--print-unit"]);
    assert!(printed.status.success(), "{}", text(&printed));
    assert_eq!(String::from_utf8_lossy(&printed.stdout), unit);

    // Again, with another token: the config changes, nothing else is created.
    let manifest = std::fs::read_to_string(root.join("etc/sollol/.installed")).expect("manifest");
    let mut again = args;
    again[3] = &other_token_path;
    let second = install(root, &again);
    assert!(second.status.success(), "{}", text(&second));
    assert!(
        std::fs::read_to_string(&config)
            .expect("config")
            .contains("token = \"tok-fedcba9876543210fedcba9876543210\"")
    );
    assert_eq!(mode(&config), 0o600);
    assert_eq!(
        std::fs::read_to_string(root.join("etc/sollol/.installed")).expect("manifest"),
        manifest
    );

    // Bad input: a clear error and exit 64, nothing written.
    let other = tempfile::tempdir().expect("tempdir");
    let refused = install(
        other.path(),
        &[
            "--join",
            "nohost",
            "--token-file",
            &token_path,
            "--binary",
            SOLLOL,
        ],
    );
    assert_eq!(refused.status.code(), Some(64));
    assert!(
        text(&refused).contains("--join must be HOST:PORT"),
        "{}",
        text(&refused)
    );
    assert!(files(other.path()).is_empty());

    // Without --join the agent finds its coordinator (mDNS); seeds go into the config for routed networks.
    let found = tempfile::tempdir().expect("tempdir");
    let seeded = install(
        found.path(),
        &[
            "--token-file",
            &token_path,
            "--seeds",
            "coordinator.lan:11436,10.8.0.1:11436",
            "--binary",
            SOLLOL,
        ],
    );
    assert!(seeded.status.success(), "{}", text(&seeded));
    let seeded_config = found.path().join("etc/sollol/agent.toml");
    let seeded_text = std::fs::read_to_string(&seeded_config).expect("config");
    assert!(!seeded_text.contains("join"), "{seeded_text}");
    let shown = Command::new(SOLLOL)
        .args(["print-config", "--config"])
        .arg(&seeded_config)
        .env_remove("SOLLOL_SEEDS")
        .output()
        .expect("print-config");
    assert!(
        text(&shown).contains("seeds = \"coordinator.lan:11436,10.8.0.1:11436\""),
        "{}",
        text(&shown)
    );
    let bad_seed = install(
        other.path(),
        &[
            "--token-file",
            &token_path,
            "--seeds",
            "nohost",
            "--binary",
            SOLLOL,
        ],
    );
    assert_eq!(bad_seed.status.code(), Some(64));
    assert!(
        text(&bad_seed).contains("--seeds must be HOST:PORT"),
        "{}",
        text(&bad_seed)
    );
    assert!(files(other.path()).is_empty());

    // A control character in any argument could add lines to the config or the unit: refused.
    for (flag, value) in [
        ("--name", "pi\nExecStartPre=/bin/sh -c evil"),
        ("--models-dir", "/srv/models\u{1b}[2J"),
        ("--join", "127.0.0.1:11436\r"),
    ] {
        let injected = install(
            other.path(),
            &["--token-file", &token_path, flag, value, "--binary", SOLLOL],
        );
        assert_eq!(
            injected.status.code(),
            Some(64),
            "{flag}: {}",
            text(&injected)
        );
        assert!(
            text(&injected).contains("control characters"),
            "{}",
            text(&injected)
        );
        assert!(files(other.path()).is_empty());
    }
    // A token too short, or only on the command line (accepted, with a warning).
    std::fs::write(tokens.path().join("short"), "0123456789abcdef").expect("token");
    let short = install(
        other.path(),
        &[
            "--token-file",
            &tokens.path().join("short").display().to_string(),
            "--binary",
            SOLLOL,
        ],
    );
    assert_eq!(short.status.code(), Some(64), "{}", text(&short));
    assert!(text(&short).contains("too short"), "{}", text(&short));

    // --uninstall removes everything it created.
    let removed = install(root, &["--uninstall"]);
    assert!(removed.status.success(), "{}", text(&removed));
    assert!(files(root).is_empty(), "left behind: {:?}", files(root));
    assert!(!root.join("etc/sollol").exists() && !root.join("var/lib/sollol").exists());
}
