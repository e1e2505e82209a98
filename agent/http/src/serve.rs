//! The accept loop every sollol HTTP server runs: HTTP/1 only, a header timer (a connection that sends
//! no complete request head in time, idle keep-alive included, is closed), a cap on connections in
//! all (past it, new ones wait in the kernel's backlog until one closes) and a cap per remote address
//! (past it, the address's new connections are closed at once; loopback is exempt: it is this machine).
//! Shutdown stops accepting, lets requests in flight finish and closes idle connections.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// How many connections a server holds and how long a request head may take.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    /// Connections one remote address may hold at once (not counting loopback).
    pub max_per_address: usize,
    pub header_read_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown`, then finishes requests in flight.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let open = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let per_address = Arc::new(AddressCounts::default());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut warned_full = false;
    loop {
        if open.available_permits() == 0 && !warned_full {
            tracing::warn!(
                limit = limits.max_connections,
                "HTTP connection limit reached: new connections wait until one closes"
            );
            warned_full = true;
        }
        let permit = tokio::select! {
            permit = Arc::clone(&open).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, or a connection reset before it was accepted.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        if open.available_permits() > 0 {
            warned_full = false;
        }
        let Some(counted) = AddressCounts::enter(&per_address, peer, limits.max_per_address) else {
            tracing::debug!(%peer, limit = limits.max_per_address, "connection refused: too many from this address");
            continue;
        };
        // Small writes (streamed tokens) must not wait for delayed ACKs.
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(counted);
            drop(permit);
        });
    }
    graceful.shutdown().await;
}

/// Open connections per remote address (loopback not counted).
#[derive(Debug, Default)]
pub struct AddressCounts(Mutex<HashMap<IpAddr, usize>>);

/// One counted connection; leaving it (drop) uncounts it.
#[derive(Debug)]
pub struct Counted {
    counts: Arc<AddressCounts>,
    address: Option<IpAddr>,
}

impl AddressCounts {
    /// Counts a connection from `peer`; `None` when its address already holds `limit` (loopback is
    /// never limited).
    pub fn enter(counts: &Arc<Self>, peer: SocketAddr, limit: usize) -> Option<Counted> {
        let address = peer.ip().to_canonical();
        if address.is_loopback() {
            return Some(Counted {
                counts: Arc::clone(counts),
                address: None,
            });
        }
        let mut table = counts.0.lock().unwrap_or_else(PoisonError::into_inner);
        let count = table.entry(address).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(Counted {
            counts: Arc::clone(counts),
            address: Some(address),
        })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let Some(address) = self.address else {
            return;
        };
        let mut table = self.counts.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = table.get_mut(&address) {
            *count -= 1;
            if *count == 0 {
                table.remove(&address);
            }
        }
    }
}

/// Raises this process's open-file limit to the most it may have (as Go programs such as Ollama do at
/// start), so thousands of client connections do not exhaust the usual soft limit of 1,024.
pub fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                tracing::debug!(from = ?limit.current, to = ?limit.maximum, "open-file limit raised")
            }
            Err(error) => tracing::debug!(%error, "open-file limit left as it was"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(limits: Limits) -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let app = Router::new().route("/", axum::routing::get(|| async { "hello" }));
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(listener, app, limits, shutdown.clone()));
        (address, shutdown)
    }

    async fn get(address: SocketAddr) -> String {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        answer
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_server_serves_again_once_idle_connections_time_out() {
        let (address, shutdown) = start(Limits {
            max_connections: 8,
            max_per_address: 8,
            header_read_timeout: Duration::from_millis(300),
        })
        .await;
        let mut idle = Vec::new();
        for _ in 0..8 {
            idle.push(
                tokio::net::TcpStream::connect(address)
                    .await
                    .expect("connect"),
            );
        }
        let started = std::time::Instant::now();
        let answer = get(address).await;
        assert!(answer.ends_with("hello"), "{answer}");
        // The request waited for the header timer to close an idle connection, and no longer.
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "{:?}",
            started.elapsed()
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        shutdown.cancel();
    }

    #[tokio::test]
    async fn http2_prior_knowledge_is_not_spoken() {
        let (address, shutdown) = start(Limits {
            max_connections: 8,
            max_per_address: 8,
            header_read_timeout: Duration::from_secs(5),
        })
        .await;
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .expect("write");
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(!answer.contains("hello"), "{answer}");
        assert_eq!(get(address).await.lines().next(), Some("HTTP/1.1 200 OK"));
        shutdown.cancel();
    }

    #[test]
    fn addresses_are_counted_and_loopback_is_not() {
        let counts = Arc::new(AddressCounts::default());
        let lan: SocketAddr = "192.168.1.9:5000".parse().expect("address");
        let first = AddressCounts::enter(&counts, lan, 2).expect("first");
        let second = AddressCounts::enter(&counts, lan, 2).expect("second");
        assert!(AddressCounts::enter(&counts, lan, 2).is_none());
        drop(first);
        let third = AddressCounts::enter(&counts, lan, 2).expect("room again");
        let mapped: SocketAddr = "[::ffff:192.168.1.9]:5001".parse().expect("address");
        assert!(
            AddressCounts::enter(&counts, mapped, 2).is_none(),
            "v4-mapped is the same address"
        );
        let local: SocketAddr = "127.0.0.1:5000".parse().expect("address");
        let loopback: Vec<_> = (0..10)
            .map(|_| AddressCounts::enter(&counts, local, 2).expect("loopback"))
            .collect();
        drop((second, third, loopback));
        assert!(counts.0.lock().expect("lock").is_empty());
    }
}
