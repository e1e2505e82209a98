//! Streaming chats at a steady rate against one address, for the failover test and benchmark
//! (`tests/failover.rs`, `scripts/bench/failover`): what a client of a virtual IP sees while the
//! coordinator behind it dies.
//!
//! `failover_load --url http://VIP:11435 --rate 20 --seconds 30 [--retries 2] [--model NAME]`
//!
//! Starts a request every 1/rate seconds whatever the others do (open loop), each a streaming
//! `/api/chat`, and prints one JSON line per request once it ends: `start_ms`, `first_byte_ms` and
//! `end_ms` (Unix milliseconds, so another process's clock compares), `attempts`, `first_attempt`
//! (what the first attempt got: `ok` or its error) and `outcome`: `ok`, `failed_before_stream` (no
//! byte of the answer came, after every retry) or `failed_mid_stream`. A failure before the first byte
//! is retried up to `--retries` times after 0.5 s, 1 s, ... (what the OpenAI clients do by default,
//! `max_retries=2`; the Ollama clients do not retry, `--retries 0`); a stream that broke is not
//! retried, its start was already shown. Connections are pooled and kept alive, as the official
//! clients do; a connection attempt gives up after 5 s (the OpenAI clients' connect timeout).

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct Args {
    url: String,
    rate: f64,
    seconds: f64,
    retries: u32,
    model: String,
}

fn usage() -> ! {
    eprintln!(
        "usage: failover_load --url URL --rate PER_SECOND --seconds SECONDS [--retries N] [--model NAME]"
    );
    std::process::exit(64);
}

fn parse_args() -> Args {
    let mut args = Args {
        url: String::new(),
        rate: 20.0,
        seconds: 30.0,
        retries: 0,
        model: "smollm2:135m".to_owned(),
    };
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        let Some(value) = given.next() else { usage() };
        let number = |value: &str| {
            value
                .parse::<f64>()
                .ok()
                .filter(|n| *n > 0.0 && n.is_finite())
        };
        match flag.as_str() {
            "--url" => args.url = value.trim_end_matches('/').to_owned(),
            "--rate" => args.rate = number(&value).unwrap_or_else(|| usage()),
            "--seconds" => args.seconds = number(&value).unwrap_or_else(|| usage()),
            "--retries" => args.retries = value.parse().unwrap_or_else(|_| usage()),
            "--model" => args.model = value,
            _ => usage(),
        }
    }
    if args.url.is_empty() {
        usage();
    }
    args
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64() * 1000.0)
}

/// How an attempt failed: before any byte of the answer (a client may retry it) or after.
enum Failure {
    BeforeStream(String),
    MidStream { first_byte_ms: f64, error: String },
}

/// One streaming chat; the time of its first body byte and of its end.
async fn attempt(client: &HttpClient, url: &str, body: &Bytes) -> Result<(f64, f64), Failure> {
    let request = hyper::Request::post(format!("{url}/api/chat"))
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))
        .map_err(|error| Failure::BeforeStream(error.to_string()))?;
    let response = client
        .request(request)
        .await
        .map_err(|error| Failure::BeforeStream(format!("{error:?}")))?;
    let status = response.status();
    let mut body = response.into_body();
    let mut first_byte_ms = None;
    let mut text = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    if first_byte_ms.is_none() && !data.is_empty() && status.is_success() {
                        first_byte_ms = Some(now_ms());
                    }
                    text.extend_from_slice(data);
                }
            }
            Err(error) => {
                let error = format!("the answer broke off: {error}");
                return Err(match first_byte_ms {
                    Some(first_byte_ms) => Failure::MidStream {
                        first_byte_ms,
                        error,
                    },
                    None => Failure::BeforeStream(error),
                });
            }
        }
    }
    if !status.is_success() {
        let text = String::from_utf8_lossy(&text);
        return Err(Failure::BeforeStream(format!("HTTP {status}: {text}")));
    }
    let last = text
        .split(|byte| *byte == b'\n')
        .rfind(|line| !line.is_empty())
        .and_then(|line| serde_json::from_slice::<Value>(line).ok());
    match (first_byte_ms, last) {
        (Some(first_byte_ms), Some(last)) if last["done"] == true => Ok((first_byte_ms, now_ms())),
        (Some(first_byte_ms), last) => Err(Failure::MidStream {
            first_byte_ms,
            error: format!("the stream ended without done: {last:?}"),
        }),
        (None, _) => Err(Failure::BeforeStream("an empty answer".to_owned())),
    }
}

async fn request(client: HttpClient, args: &Args, id: u64) -> Value {
    let body = Bytes::from(
        json!({
            "model": args.model,
            "messages": [{"role": "user", "content": format!("request {id}: say something")}],
            "stream": true,
        })
        .to_string(),
    );
    let start_ms = now_ms();
    let mut first_attempt = None;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let result = attempt(&client, &args.url, &body).await;
        first_attempt.get_or_insert_with(|| match &result {
            Ok(_) => "ok".to_owned(),
            Err(Failure::BeforeStream(error) | Failure::MidStream { error, .. }) => error.clone(),
        });
        let record = |outcome: &str, first_byte_ms: Option<f64>, error: Option<&str>| {
            json!({
                "id": id,
                "start_ms": start_ms,
                "first_byte_ms": first_byte_ms,
                "end_ms": now_ms(),
                "attempts": attempts,
                "first_attempt": first_attempt,
                "outcome": outcome,
                "error": error,
            })
        };
        match result {
            Ok((first_byte_ms, _)) => return record("ok", Some(first_byte_ms), None),
            Err(Failure::MidStream {
                first_byte_ms,
                error,
            }) => return record("failed_mid_stream", Some(first_byte_ms), Some(&error)),
            Err(Failure::BeforeStream(error)) if attempts > args.retries => {
                return record("failed_before_stream", None, Some(&error));
            }
            Err(Failure::BeforeStream(_)) => {
                let backoff = 0.5 * f64::from(1u32 << (attempts - 1).min(4));
                tokio::time::sleep(Duration::from_secs_f64(backoff)).await;
            }
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = std::sync::Arc::new(parse_args());
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(connector);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    let total = (args.rate * args.seconds).round() as u64;
    let mut running = tokio::task::JoinSet::new();
    for id in 0..total {
        ticker.tick().await;
        let (client, args) = (client.clone(), std::sync::Arc::clone(&args));
        running.spawn(async move {
            let record = request(client, &args, id).await;
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "{record}");
            let _ = stdout.flush();
        });
    }
    while running.join_next().await.is_some() {}
}
