//! Who may call an HTTP API from a web page: the `Origin` allow-list and the `Host` check that stops
//! DNS rebinding, at least as strict as Ollama's own.
//!
//! A browser attaches `Origin` to every cross-site request and to every same-site one that is not a
//! plain `GET`; command-line tools and SDKs send none. So a request without `Origin` is not a web page
//! (or one reading itself) and passes; one with a foreign `Origin` is refused before it runs anything,
//! which matters because a page may send a `POST` with `Content-Type: text/plain` without asking first.
//! DNS rebinding points a name the attacker owns at 127.0.0.1, after which the page is "same-origin"
//! with the API; only the `Host` header still shows the foreign name, so a server bound to loopback
//! accepts only local names.

use std::net::IpAddr;

/// Ollama's default origins: local pages on any port, and the schemes of desktop and editor apps.
const LOCAL_ORIGIN_HOSTS: [&str; 4] = ["localhost", "127.0.0.1", "0.0.0.0", "[::1]"];
const APP_SCHEMES: [&str; 5] = ["app", "file", "tauri", "vscode-webview", "vscode-file"];
/// Names that never leave the machine or the site: `*.localhost`, mDNS's `*.local`, `*.internal`.
const LOCAL_SUFFIXES: [&str; 3] = [".localhost", ".local", ".internal"];

/// Why a request from a browser was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "origin {0:?} is not allowed: add it to http.allowed_origins (as OLLAMA_ORIGINS does for Ollama)"
    )]
    Origin(String),
    #[error(
        "host {0:?} is not a local name and this server listens on loopback only (DNS rebinding?): add it to http.allowed_hosts"
    )]
    Host(String),
}

/// The rules for one listening server.
#[derive(Clone, Debug)]
pub struct Boundary {
    /// Origins allowed beyond the defaults, lowercase; `*` matches any run of characters.
    origins: Vec<String>,
    /// Host names allowed beyond the local ones, lowercase; enforced on any bind when not empty.
    hosts: Vec<String>,
    /// Only local host names are accepted (the server listens on loopback).
    loopback: bool,
    /// This machine's name, lowercase (a local name).
    machine: String,
}

impl Boundary {
    /// The rules for a server listening on `bound`; `origins` and `hosts` extend the defaults.
    pub fn new(bound: IpAddr, origins: &[String], hosts: &[String], machine: &str) -> Self {
        let lower = |items: &[String]| {
            items
                .iter()
                .map(|item| item.trim().to_ascii_lowercase())
                .filter(|item| !item.is_empty())
                .collect()
        };
        Self {
            origins: lower(origins),
            hosts: lower(hosts),
            loopback: bound.is_loopback(),
            machine: machine.to_ascii_lowercase(),
        }
    }

    /// Checks a request's `Origin` and `Host` headers (`None` when absent).
    pub fn check(&self, origin: Option<&str>, host: Option<&str>) -> Result<(), Refusal> {
        if let Some(host) = host
            && !self.host_allowed(host)
        {
            return Err(Refusal::Host(host.to_owned()));
        }
        match origin {
            Some(origin) if !self.origin_allowed(origin, host) => {
                Err(Refusal::Origin(origin.to_owned()))
            }
            _ => Ok(()),
        }
    }

    /// Whether a page at `origin` may call this server, reached as `host`.
    pub fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        let origin = origin.trim().to_ascii_lowercase();
        // The server's own pages (the dashboard, reached by whatever address): same origin.
        if let Some(host) = host {
            let host = host.to_ascii_lowercase();
            if origin == format!("http://{host}") || origin == format!("https://{host}") {
                return true;
            }
        }
        let Some((scheme, rest)) = origin.split_once("://") else {
            return false; // "null" (sandboxed frames, some file pages) and anything malformed
        };
        let default = match scheme {
            "http" | "https" => {
                let name = authority_host(rest);
                LOCAL_ORIGIN_HOSTS.contains(&name) && is_port_suffix(&rest[name.len()..])
            }
            _ => APP_SCHEMES.contains(&scheme),
        };
        default || self.origins.iter().any(|pattern| glob(pattern, &origin))
    }

    /// Whether `host` (a `Host` header, port included) is acceptable for this server.
    pub fn host_allowed(&self, host: &str) -> bool {
        let name = authority_host(host.trim()).to_ascii_lowercase();
        let name = name.trim_end_matches('.');
        if self.hosts.iter().any(|allowed| glob(allowed, name)) {
            return true;
        }
        if !self.hosts.is_empty() && !self.loopback {
            // An explicit list on a server reachable from the network: the list, or an address.
            return ip_literal(name).is_some();
        }
        if !self.loopback {
            return true;
        }
        if name.is_empty() || name == "localhost" || name == self.machine {
            return true;
        }
        if LOCAL_SUFFIXES.iter().any(|suffix| name.ends_with(suffix)) {
            return true;
        }
        ip_literal(name).is_some_and(|address| is_local_address(&address))
    }
}

/// The host part of `host[:port]` or `[v6]:port`, brackets kept for IPv6.
fn authority_host(authority: &str) -> &str {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => &authority[..=end],
            None => authority,
        };
    }
    match authority.rfind(':') {
        Some(colon) => &authority[..colon],
        None => authority,
    }
}

/// Nothing, or `:` and a port number.
fn is_port_suffix(rest: &str) -> bool {
    match rest.strip_prefix(':') {
        None => rest.is_empty(),
        Some(port) => {
            (1..=5).contains(&port.len()) && port.bytes().all(|byte| byte.is_ascii_digit())
        }
    }
}

fn ip_literal(name: &str) -> Option<IpAddr> {
    name.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// Loopback, private (RFC 1918, unique-local), link-local or unspecified: never a public address.
fn is_local_address(address: &IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => {
            v4.is_loopback() || v4.is_private() || v4.is_link_local() || v4.is_unspecified()
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| is_local_address(&IpAddr::V4(v4)))
        }
    }
}

/// `*` matches any run of characters (none included); everything else matches itself.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback() -> Boundary {
        Boundary::new(IpAddr::from([127, 0, 0, 1]), &[], &[], "homelab")
    }

    #[test]
    fn default_origins_are_ollamas() {
        let boundary = loopback();
        for origin in [
            "http://localhost",
            "http://localhost:3000",
            "https://127.0.0.1:8080",
            "http://0.0.0.0:11434",
            "http://[::1]:5173",
            "app://obsidian.md",
            "file://",
            "tauri://localhost",
            "vscode-webview://abc",
            "vscode-file://vscode-app",
            "HTTP://LOCALHOST:3000",
        ] {
            assert!(boundary.origin_allowed(origin, None), "{origin}");
        }
        for origin in [
            "http://evil.example",
            "http://localhost.evil.example",
            "http://localhost:3000.evil.example",
            "http://localhost:abc",
            "http://127.0.0.1.nip.io",
            "null",
            "",
            "evil",
            "ftp://localhost",
        ] {
            assert!(!boundary.origin_allowed(origin, None), "{origin}");
        }
    }

    #[test]
    fn the_servers_own_pages_and_configured_origins_are_allowed() {
        let boundary = Boundary::new(
            IpAddr::from([0, 0, 0, 0]),
            &[
                "https://*.example.org".to_owned(),
                "http://chat.lan:8080".to_owned(),
            ],
            &[],
            "homelab",
        );
        assert!(boundary.origin_allowed("http://192.168.1.5:11435", Some("192.168.1.5:11435")));
        assert!(!boundary.origin_allowed("http://192.168.1.6:11435", Some("192.168.1.5:11435")));
        assert!(boundary.origin_allowed("https://ui.example.org", None));
        assert!(boundary.origin_allowed("http://chat.lan:8080", None));
        assert!(!boundary.origin_allowed("http://chat.lan:8081", None));
        assert!(!boundary.origin_allowed("https://example.org.evil.example", None));
        let everyone = Boundary::new(IpAddr::from([0, 0, 0, 0]), &["*".to_owned()], &[], "x");
        assert!(everyone.origin_allowed("http://anything.example", None));
    }

    #[test]
    fn a_loopback_server_accepts_only_local_host_names() {
        let boundary = loopback();
        for host in [
            "localhost",
            "localhost:11435",
            "127.0.0.1:11435",
            "[::1]:11435",
            "0.0.0.0",
            "app.localhost",
            "printer.local",
            "ollama.internal:80",
            "homelab",
            "HomeLab:11435",
            "192.168.1.5",
            "10.0.0.1:1",
            "localhost.",
        ] {
            assert!(boundary.host_allowed(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:11435",
            "localhost.evil.example",
            "8.8.8.8",
            "[2001:db8::1]:80",
            "local",
        ] {
            assert!(!boundary.host_allowed(host), "{host}");
        }
        assert_eq!(
            boundary.check(None, Some("evil.example:11435")),
            Err(Refusal::Host("evil.example:11435".to_owned()))
        );
        assert_eq!(boundary.check(None, None), Ok(()));
    }

    #[test]
    fn beyond_loopback_any_host_unless_a_list_is_configured() {
        let open = Boundary::new(IpAddr::from([0, 0, 0, 0]), &[], &[], "homelab");
        assert!(open.host_allowed("evil.example"));
        let listed = Boundary::new(
            IpAddr::from([0, 0, 0, 0]),
            &[],
            &["sollol.lan".to_owned(), "*.cluster.lan".to_owned()],
            "homelab",
        );
        assert!(listed.host_allowed("sollol.lan:11435"));
        assert!(listed.host_allowed("gpu1.cluster.lan"));
        assert!(listed.host_allowed("192.168.1.5:11435"));
        assert!(!listed.host_allowed("evil.example"));
        assert!(!listed.host_allowed("localhost.evil.example"));
    }

    #[test]
    fn glob_matches_runs() {
        assert!(glob("*", ""));
        assert!(glob("a*c", "abbbc"));
        assert!(glob("a*c", "ac"));
        assert!(!glob("a*c", "acb"));
        assert!(glob("*.x.y", "a.x.y"));
        assert!(!glob("*.x.y", "x.y"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("ab*ba", "aba"));
    }
}
