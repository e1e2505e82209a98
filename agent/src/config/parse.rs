//! The small value parsers: text to addresses, URLs, durations, sizes, lists, flags and API keys.
//!
//! Each returns the reason as plain text; the validator adds the key and where the value came from.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use super::typed::{ApiKey, KeyScope};

/// The entries of a comma-separated list (a TOML list arrives joined with commas), trimmed, empty ones
/// skipped.
pub(super) fn list_items(text: &str) -> impl Iterator<Item = &str> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
}

pub(super) fn parse_port(text: &str) -> Result<u16, String> {
    text.trim()
        .parse::<u16>()
        .ok()
        .filter(|port| *port > 0)
        .ok_or_else(|| "must be a port number, 1 to 65535".to_owned())
}

/// A coordinator's cluster address as `HOST:PORT`; the host is resolved when it is used.
pub(super) fn parse_seed(seed: &str) -> Result<String, String> {
    match seed.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && parse_port(port).is_ok() => Ok(seed.to_owned()),
        _ => Err(format!(
            "{seed:?} is not HOST:PORT (the coordinator's cluster address, e.g. coordinator.lan:11436)"
        )),
    }
}

pub(super) fn parse_api_keys(text: &str, scope: KeyScope) -> Result<Vec<ApiKey>, String> {
    list_items(text)
        .enumerate()
        .map(|(index, entry)| {
            let (name, key) = match entry.split_once('=') {
                Some((name, key)) => (name.trim().to_owned(), key.trim().to_owned()),
                None => (format!("key-{}", index + 1), entry.to_owned()),
            };
            if key.len() < 16 || !key.chars().all(|c| c.is_ascii_graphic()) {
                return Err(format!(
                    "key {} must be at least 16 printable characters without spaces",
                    index + 1
                ));
            }
            if name.is_empty() || name.len() > 64 {
                return Err(format!(
                    "key {} needs a name of 1 to 64 characters",
                    index + 1
                ));
            }
            Ok(ApiKey { name, key, scope })
        })
        .collect()
}

pub(super) fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| "expected IP:PORT, e.g. 127.0.0.1:11435 or [::1]:11435".to_owned())
}

/// Accepts `HOST:PORT` where HOST is a name or an IP address.
pub(super) fn parse_host_port(text: &str) -> Result<(), String> {
    if text.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| "expected HOST:PORT, e.g. 192.168.1.10:11436".to_owned())?;
    port.parse::<u16>()
        .map_err(|_| format!("port {port:?} is not a number from 0 to 65535"))?;
    let valid_host = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if valid_host {
        Ok(())
    } else {
        Err(format!("host {host:?} is not a host name or IP address"))
    }
}

pub(super) fn parse_http_url(text: &str) -> Result<String, String> {
    let rest = text
        .strip_prefix("http://")
        .ok_or_else(|| "expected an http:// URL (https is not supported yet)".to_owned())?;
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return Err("expected http://HOST:PORT with no path".to_owned());
    }
    Ok(format!("http://{authority}"))
}

pub(super) fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|error| format!("expected a duration like 2s, 500ms or 1m ({error})"))
}

pub(super) fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        Err("must be greater than zero".to_owned())
    } else {
        Ok(duration)
    }
}

pub(super) fn parse_non_zero(text: &str) -> Result<NonZeroU32, String> {
    text.parse()
        .map_err(|_| "expected a whole number from 1 to 4294967295".to_owned())
}

/// `1048576`, `512MiB`, `6GiB`, `8GB`, `300 MB` (binary and decimal units, case-insensitive).
pub(super) fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| "must be a size such as 512MiB, 6GiB or 1048576".to_owned())?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        "tb" => 1_000_000_000_000,
        "tib" | "t" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)"
            ));
        }
    };
    let bytes = number * scale as f64;
    if !(1.0..=u64::MAX as f64).contains(&bytes) {
        return Err("must be at least one byte".to_owned());
    }
    Ok(bytes as u64)
}

/// `name=count,name=all`: models (checked, normalized) and how many copies of each.
pub(super) fn parse_replicas(
    text: &str,
) -> Result<Vec<(String, sollol_shared::api::ReplicaCount)>, String> {
    let mut replicas: Vec<(String, sollol_shared::api::ReplicaCount)> = Vec::new();
    for item in list_items(text) {
        let (name, count) = item
            .rsplit_once('=')
            .ok_or_else(|| format!("{item:?} is not MODEL=COUNT (or MODEL=all)"))?;
        let name = name.trim().trim_matches('"');
        sollol_shared::model_name::validate(name)?;
        let name = sollol_shared::model_name::normalize(name);
        let count = sollol_shared::api::ReplicaCount::parse(count)
            .map_err(|why| format!("{name}: {why}"))?;
        if replicas.iter().any(|(known, _)| *known == name) {
            return Err(format!("{name} is given twice"));
        }
        replicas.push((name, count));
    }
    Ok(replicas)
}

pub(super) fn parse_bool(text: &str) -> Result<bool, String> {
    match text {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("expected true or false".to_owned()),
    }
}

pub(super) fn parse_node_name(text: &str) -> Result<String, String> {
    crate::cluster::identity::validate_node_name(text).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_name_models_and_counts() {
        use sollol_shared::api::ReplicaCount;
        assert_eq!(
            parse_replicas("llama3.2:3b=2, nomic-embed-text=all").expect("valid"),
            [
                ("llama3.2:3b".to_owned(), ReplicaCount::Nodes(2)),
                ("nomic-embed-text:latest".to_owned(), ReplicaCount::All),
            ]
        );
        for bad in ["llama3.2:3b", "m=0", "m=two", "../x=1", "m=1,m:latest=2"] {
            assert!(parse_replicas(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_take_binary_and_decimal_units() {
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5 GiB"), Ok(3 << 29));
        assert_eq!(parse_bytes("8GB"), Ok(8_000_000_000));
        assert!(parse_bytes("0").is_err());
        assert!(
            parse_bytes("12 parsecs")
                .expect_err("an unknown unit")
                .contains("unknown unit")
        );
        assert!(parse_bytes("lots").is_err());
    }
}
