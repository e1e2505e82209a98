//! Identities kept in the data directory: the cluster token (coordinator) and the node id (agent).
//!
//! Both are created on first start and then read back, so they survive
//! restarts. The token file is written with mode 0600 and its directory 0700.
//! This module does no network IO.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;

const TOKEN_FILE: &str = "cluster-token";
const NODE_ID_FILE: &str = "node-id";
const MAX_TOKEN_LEN: usize = 256;
/// 32 characters: 128 bits written as hexadecimal (generated tokens have 64).
const MIN_TOKEN_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot create data directory {}: {source}", .path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} holds an invalid value: {reason}; delete it to generate a new one", .path.display())]
    Corrupt { path: PathBuf, reason: String },
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidToken(&'static str);

/// The shared secret agents prove they hold. Its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterToken(String);

impl fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterToken(<hidden>)")
    }
}

impl ClusterToken {
    pub fn parse(text: &str) -> Result<Self, InvalidToken> {
        let text = text.trim();
        if text.len() < MIN_TOKEN_LEN {
            return Err(InvalidToken(
                "a cluster token has at least 32 characters (128 bits as hex); `sollol token` prints the coordinator's",
            ));
        }
        if text.len() > MAX_TOKEN_LEN {
            return Err(InvalidToken("a cluster token has at most 256 characters"));
        }
        if !text.chars().all(|c| c.is_ascii_graphic()) {
            return Err(InvalidToken(
                "a cluster token is printable ASCII without spaces",
            ));
        }
        Ok(Self(text.to_owned()))
    }

    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self(hex::encode(bytes))
    }

    /// Reads the token from `data_dir`, creating it (mode 0600) on first start.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, IdentityError> {
        let path = data_dir.join(TOKEN_FILE);
        load_or_create(
            &path,
            data_dir,
            Self::generate,
            |text| Self::parse(text).map_err(|error| error.to_string()),
            |token| token.0.clone(),
        )
    }

    /// Reads the token from `data_dir` without creating one.
    pub fn load(data_dir: &Path) -> Result<Option<Self>, IdentityError> {
        let path = data_dir.join(TOKEN_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text)
                .map(Some)
                .map_err(|error| IdentityError::Corrupt {
                    path,
                    reason: error.to_string(),
                }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(IdentityError::Read { path, source }),
        }
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// A node's stable identity: 32 lowercase hex digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(String);

impl NodeId {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.len() == 32
            && text
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        {
            Ok(Self(text.to_owned()))
        } else {
            Err("a node id is 32 lowercase hexadecimal digits".to_owned())
        }
    }

    pub fn generate() -> Self {
        let mut bytes = [0u8; 16];
        rand::rng().fill_bytes(&mut bytes);
        Self(hex::encode(bytes))
    }

    /// Reads the node id from `data_dir`, creating it on first start.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, IdentityError> {
        let path = data_dir.join(NODE_ID_FILE);
        load_or_create(&path, data_dir, Self::generate, Self::parse, |id| {
            id.0.clone()
        })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The machine's host name, or `node` when it cannot be read.
pub fn host_name() -> String {
    let uname = rustix::system::uname();
    let name = uname.nodename().to_string_lossy().into_owned();
    validate_node_name(&name)
        .map(str::to_owned)
        .unwrap_or_else(|_| "node".to_owned())
}

/// Node names are shown in tables and logs: 1–64 printable characters.
pub fn validate_node_name(name: &str) -> Result<&str, String> {
    if name.is_empty() || name.chars().count() > 64 {
        return Err("a node name has 1 to 64 characters".to_owned());
    }
    if name.chars().any(|c| c.is_control()) {
        return Err("a node name has no control characters".to_owned());
    }
    Ok(name)
}

/// Creates `dir` (and parents) with mode 0700 if it does not exist.
pub fn ensure_private_dir(dir: &Path) -> Result<(), IdentityError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(|source| IdentityError::CreateDir {
        path: dir.to_owned(),
        source,
    })?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| {
        IdentityError::CreateDir {
            path: dir.to_owned(),
            source,
        }
    })
}

fn load_or_create<T>(
    path: &Path,
    data_dir: &Path,
    generate: impl FnOnce() -> T,
    parse: impl FnOnce(&str) -> Result<T, String>,
    render: impl FnOnce(&T) -> String,
) -> Result<T, IdentityError> {
    match fs::read_to_string(path) {
        Ok(text) => {
            return parse(&text).map_err(|reason| IdentityError::Corrupt {
                path: path.to_owned(),
                reason,
            });
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(IdentityError::Read {
                path: path.to_owned(),
                source,
            });
        }
    }
    ensure_private_dir(data_dir)?;
    let value = generate();
    let write_error = |source| IdentityError::Write {
        path: path.to_owned(),
        source,
    };
    // Written whole to a temporary file first, then linked into place: a crash leaves either no
    // file or a complete one, and (the link fails if the name exists) two processes starting at
    // once do not overwrite each other's identity.
    let temporary = path.with_extension(format!("tmp-{}", std::process::id()));
    let _ = fs::remove_file(&temporary);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(write_error)?;
    let written = file
        .write_all(format!("{}\n", render(&value)).as_bytes())
        .and_then(|()| file.sync_all());
    drop(file);
    let linked = written.and_then(|()| fs::hard_link(&temporary, path));
    let _ = fs::remove_file(&temporary);
    match linked {
        Ok(()) => {
            if let Ok(directory) = fs::File::open(data_dir) {
                let _ = directory.sync_all();
            }
            Ok(value)
        }
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            let text = fs::read_to_string(path).map_err(|source| IdentityError::Read {
                path: path.to_owned(),
                source,
            })?;
            parse(&text).map_err(|reason| IdentityError::Corrupt {
                path: path.to_owned(),
                reason,
            })
        }
        Err(source) => Err(write_error(source)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_created_once_with_private_permissions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        let first = ClusterToken::load_or_create(&data_dir).expect("create");
        let second = ClusterToken::load_or_create(&data_dir).expect("load");
        assert_eq!(first, second);
        assert_eq!(first.expose().len(), 64);
        let mode = fs::metadata(data_dir.join(TOKEN_FILE))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = fs::metadata(&data_dir).expect("stat").permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        assert_eq!(
            ClusterToken::load(&data_dir).expect("load"),
            Some(first.clone())
        );
        assert!(!format!("{first:?}").contains(first.expose()));
    }

    #[test]
    fn node_id_is_stable_and_corruption_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = NodeId::load_or_create(dir.path()).expect("create");
        assert_eq!(NodeId::load_or_create(dir.path()).expect("load"), first);
        fs::write(dir.path().join(NODE_ID_FILE), "not-an-id").expect("write");
        let error = NodeId::load_or_create(dir.path()).expect_err("corrupt");
        assert!(error.to_string().contains("delete it"), "{error}");
    }

    #[test]
    fn token_validation() {
        fn check(text: &str, valid: bool) {
            assert_eq!(ClusterToken::parse(text).is_ok(), valid, "{text:?}");
        }
        check("short", false);
        // Fewer than 128 bits as hex.
        check("0123456789abcdef", false);
        check(&"a".repeat(31), false);
        check(&"a".repeat(32), true);
        check(" 0123456789abcdef0123456789abcdef\n", true);
        check("0123456789abcdef 0123456789abcdef", false);
        check(&"a".repeat(257), false);
    }

    #[test]
    fn a_token_file_is_complete_or_absent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        let token = ClusterToken::load_or_create(&data_dir).expect("create");
        let names: Vec<String> = fs::read_dir(&data_dir)
            .expect("dir")
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [TOKEN_FILE], "no temporary file left behind");
        assert_eq!(
            fs::read_to_string(data_dir.join(TOKEN_FILE)).expect("read"),
            format!("{}\n", token.expose())
        );
    }
}
