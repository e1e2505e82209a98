//! Finding plain Ollama servers by probing address ranges (`discovery.scan`): opt-in, never on by
//! default. Every address of the configured IPv4 ranges is tried on one port, a bounded number at a
//! time, each with a short timeout; what answers is kept only if `GET /api/version` answers as Ollama
//! does (`{"version": "..."}`). Servers found join the routing like `coordinator.nodes`, and the last
//! scan (found, answered but not Ollama, silent) is in `GET /api/sollol/v1/discovery`.

use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use sollol_shared::api::{DiscoveryScan, FoundServer, RejectedAddress};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cluster::ClusterEvent;
use crate::telemetry::ollama::OllamaProbe;

/// Addresses probed at once.
const CONCURRENCY: usize = 64;
/// How long an address may take to accept, and then to answer `/api/version`.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(400);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// The most of an answer read.
const MAX_ANSWER: usize = 16 * 1024;

/// An IPv4 range, `a.b.c.d/n` with `n` from 16 to 32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    base: u32,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (address, prefix) = text.trim().split_once('/').unwrap_or((text.trim(), "32"));
        let address: Ipv4Addr = address
            .parse()
            .map_err(|_| format!("{text:?} is not an IPv4 range such as 192.168.1.0/24"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|prefix| *prefix <= 32)
            .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to 32"))?;
        if prefix < 16 {
            return Err(format!(
                "{text:?} has {} addresses: ranges of at most 65536 (/16) are scanned",
                1u64 << (32 - prefix)
            ));
        }
        let mask = u32::MAX << (32 - u32::from(prefix));
        Ok(Self {
            base: u32::from(address) & mask,
            prefix,
        })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

impl Cidr {
    /// Its host addresses: all but the network and broadcast addresses, except in /31 and /32.
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> + use<> {
        let size = 1u64 << (32 - u32::from(self.prefix));
        let (first, last) = if size <= 2 { (0, size) } else { (1, size - 1) };
        let base = u64::from(self.base);
        (first..last).map(move |offset| Ipv4Addr::from((base + offset) as u32))
    }
}

/// What one address answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ollama {
        version: String,
    },
    /// Something listens, but it is not Ollama (why).
    NotOllama(String),
    Silent,
}

/// Tries `address`: connects, asks `GET /api/version`, and judges the answer.
pub async fn probe(address: SocketAddr) -> Outcome {
    let Ok(Ok(mut stream)) =
        tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)).await
    else {
        return Outcome::Silent;
    };
    let request = format!(
        "GET /api/version HTTP/1.1\r\nHost: {address}\r\nUser-Agent: sollol-scan\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    let exchange = async {
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        let mut chunk = [0u8; 4096];
        while answer.len() < MAX_ANSWER {
            let read = stream.read(&mut chunk).await?;
            if read == 0 {
                break;
            }
            answer.extend_from_slice(&chunk[..read]);
        }
        Ok::<_, std::io::Error>(answer)
    };
    match tokio::time::timeout(ANSWER_TIMEOUT, exchange).await {
        Err(_) => Outcome::NotOllama(format!(
            "accepted, but did not answer /api/version within {ANSWER_TIMEOUT:?}"
        )),
        Ok(Err(error)) => Outcome::NotOllama(format!("accepted, then {error}")),
        Ok(Ok(answer)) => judge(&answer),
    }
}

/// Whether an HTTP answer to `GET /api/version` is Ollama's: status 200 and a JSON body with a
/// `version` string.
pub fn judge(answer: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(answer);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Outcome::NotOllama("did not answer HTTP".to_owned());
    };
    let status = head.lines().next().unwrap_or_default();
    let code = status.split_whitespace().nth(1).unwrap_or_default();
    if !status.starts_with("HTTP/1.") {
        return Outcome::NotOllama("did not answer HTTP".to_owned());
    }
    if code != "200" {
        return Outcome::NotOllama(format!("answered {code} to /api/version"));
    }
    // A chunked body: the JSON sits between the chunk sizes; the first `{` to the last `}` holds it.
    let json = match (body.find('{'), body.rfind('}')) {
        (Some(start), Some(end)) if end > start => &body[start..=end],
        _ => "",
    };
    match serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|value| value.get("version")?.as_str().map(str::to_owned))
    {
        Some(version) => Outcome::Ollama { version },
        None => Outcome::NotOllama("answered /api/version without an Ollama version".to_owned()),
    }
}

/// Probes every host of `ranges` on `port`, [`CONCURRENCY`] at a time.
pub async fn scan(ranges: &[Cidr], port: u16) -> DiscoveryScan {
    let addresses: Vec<SocketAddr> = ranges
        .iter()
        .flat_map(Cidr::hosts)
        .map(|ip| SocketAddr::from((ip, port)))
        .collect();
    let outcomes: Vec<(SocketAddr, Outcome)> =
        futures_util::stream::iter(addresses.iter().copied())
            .map(|address| async move { (address, probe(address).await) })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
    let mut found = Vec::new();
    let mut rejected = Vec::new();
    for (address, outcome) in outcomes {
        match outcome {
            Outcome::Ollama { version } => found.push(FoundServer {
                address: address.to_string(),
                version,
            }),
            Outcome::NotOllama(reason) => rejected.push(RejectedAddress {
                address: address.to_string(),
                reason,
            }),
            Outcome::Silent => {}
        }
    }
    found.sort_by(|a, b| a.address.cmp(&b.address));
    rejected.sort_by(|a, b| a.address.cmp(&b.address));
    DiscoveryScan {
        ranges: ranges.iter().map(ToString::to_string).collect(),
        port,
        scanned_at_ms: Some(crate::telemetry::unix_ms(SystemTime::now())),
        addresses: u32::try_from(addresses.len()).unwrap_or(u32::MAX),
        found,
        rejected,
    }
}

/// Scans `ranges` every `every`, and probes what it found every `probe_interval` (as
/// `coordinator.nodes` are), reporting to the cluster task; the last scan goes into `last`.
pub async fn run(
    ranges: Vec<Cidr>,
    port: u16,
    every: Duration,
    probe_interval: Duration,
    events: mpsc::Sender<ClusterEvent>,
    last: Arc<Mutex<DiscoveryScan>>,
    shutdown: CancellationToken,
) {
    let mut probes: Vec<(String, OllamaProbe)> = Vec::new();
    let mut next_scan = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval(probe_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        if tokio::time::Instant::now() >= next_scan {
            let report = scan(&ranges, port).await;
            next_scan = tokio::time::Instant::now() + every;
            tracing::info!(
                ranges = ?report.ranges,
                addresses = report.addresses,
                found = report.found.len(),
                "scanned for Ollama servers"
            );
            for server in &report.found {
                let url = format!("http://{}", server.address);
                if !probes.iter().any(|(known, _)| *known == url) {
                    probes.push((url.clone(), OllamaProbe::remote(&url)));
                }
            }
            *last.lock().unwrap_or_else(PoisonError::into_inner) = report;
        }
        for (url, probe) in &probes {
            let Some(ollama) = probe.sample().await else {
                continue;
            };
            let name = format!("ollama@{}", url.trim_start_matches("http://"));
            let event = crate::cluster::discovery::probed(url, Some(name), ollama, probe_interval);
            if events.send(event).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_to_their_hosts() {
        let range: Cidr = "192.168.1.77/29".parse().expect("range");
        assert_eq!(range.to_string(), "192.168.1.72/29");
        let hosts: Vec<String> = range.hosts().map(|ip| ip.to_string()).collect();
        assert_eq!(hosts.first().map(String::as_str), Some("192.168.1.73"));
        assert_eq!(hosts.last().map(String::as_str), Some("192.168.1.78"));
        assert_eq!(hosts.len(), 6);
        assert_eq!(
            "10.0.0.5"
                .parse::<Cidr>()
                .expect("one address")
                .hosts()
                .count(),
            1
        );
        assert_eq!(
            "10.0.0.4/31".parse::<Cidr>().expect("pair").hosts().count(),
            2
        );
        assert_eq!(
            "10.1.0.0/16".parse::<Cidr>().expect("/16").hosts().count(),
            65_534
        );
        let refused = "10.0.0.0/8".parse::<Cidr>().expect_err("too large");
        assert!(refused.contains("16777216 addresses"), "{refused}");
        assert!("10.0.0.0/33".parse::<Cidr>().is_err() && "gpu-box/24".parse::<Cidr>().is_err());
    }

    #[test]
    fn only_an_ollama_version_answer_counts() {
        let ok =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"version\":\"0.5.7\"}";
        assert_eq!(
            judge(ok),
            Outcome::Ollama {
                version: "0.5.7".to_owned()
            }
        );
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n13\r\n{\"version\":\"0.6.0\"}\r\n0\r\n\r\n";
        assert_eq!(
            judge(chunked),
            Outcome::Ollama {
                version: "0.6.0".to_owned()
            }
        );
        assert_eq!(
            judge(b"HTTP/1.1 404 Not Found\r\n\r\nnot found"),
            Outcome::NotOllama("answered 404 to /api/version".to_owned())
        );
        assert!(matches!(
            judge(b"HTTP/1.1 200 OK\r\n\r\n{\"name\":\"nginx\"}"),
            Outcome::NotOllama(_)
        ));
        assert!(matches!(
            judge(b"SSH-2.0-OpenSSH_9.2\r\n"),
            Outcome::NotOllama(_)
        ));
    }
}
