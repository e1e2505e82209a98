//! Dashboard sessions: a browser signs in once with an API key and gets an `HttpOnly`, `SameSite=Strict`
//! cookie naming a random session, so the page's fetches and its event stream (an `EventSource`
//! cannot send headers) carry credentials without the key being readable by any script. The key is
//! checked once and never stored; sessions live in memory, bounded, for `SESSION_LIFETIME`.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::KeyScope;

/// The session cookie's name.
pub const COOKIE: &str = "sollol_session";
/// How long a sign-in lasts.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; the oldest go first.
const MAX_SESSIONS: usize = 1024;

#[derive(Clone, Debug)]
struct Session {
    name: String,
    scope: KeyScope,
    expires: Instant,
}

/// The signed-in browsers, by the SHA-256 of their session id (a memory dump shows no usable id).
#[derive(Debug, Default)]
pub struct Sessions(Mutex<HashMap<[u8; 32], Session>>);

fn digest(id: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    /// Starts a session for the key `name`; returns its id (64 hex digits) for the cookie.
    pub fn start(&self, name: String, scope: KeyScope) -> String {
        use rand::RngCore;
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let id = hex::encode(bytes);
        let now = Instant::now();
        let mut sessions = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        sessions.retain(|_, session| session.expires > now);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, session)| session.expires)
                .map(|(key, _)| *key)
        {
            sessions.remove(&oldest);
        }
        sessions.insert(
            digest(&id),
            Session {
                name,
                scope,
                expires: now + SESSION_LIFETIME,
            },
        );
        id
    }

    /// The key name and scope of a live session.
    pub fn find(&self, id: &str) -> Option<(String, KeyScope)> {
        let sessions = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        sessions
            .get(&digest(id))
            .filter(|session| session.expires > Instant::now())
            .map(|session| (session.name.clone(), session.scope))
    }

    pub fn end(&self, id: &str) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&digest(id));
    }
}

/// The session id in a `Cookie` header, if any.
pub fn cookie_value(cookie_header: &str) -> Option<&str> {
    cookie_header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim())
        .filter(|value| value.len() == 64 && value.bytes().all(|byte| byte.is_ascii_hexdigit()))
}

/// The `Set-Cookie` value that starts (`Some(id)`) or ends (`None`) a session.
pub fn set_cookie(id: Option<&str>) -> String {
    match id {
        Some(id) => format!(
            "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
            SESSION_LIFETIME.as_secs()
        ),
        None => format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_names_its_key_until_it_ends() {
        let sessions = Sessions::default();
        let id = sessions.start("webui".to_owned(), KeyScope::Inference);
        assert_eq!(id.len(), 64);
        assert_eq!(
            sessions.find(&id),
            Some(("webui".to_owned(), KeyScope::Inference))
        );
        assert_eq!(sessions.find(&"0".repeat(64)), None);
        sessions.end(&id);
        assert_eq!(sessions.find(&id), None);
    }

    #[test]
    fn cookies_are_read_strictly() {
        let id = "ab".repeat(32);
        assert_eq!(
            cookie_value(&format!("theme=dark; {COOKIE}={id}; x=1")),
            Some(id.as_str())
        );
        assert_eq!(cookie_value(&format!("{COOKIE}=short")), None);
        assert_eq!(cookie_value("other=1"), None);
        assert!(set_cookie(Some(&id)).contains("HttpOnly; SameSite=Strict"));
        assert!(set_cookie(None).contains("Max-Age=0"));
    }

    #[test]
    fn the_table_stays_bounded() {
        let sessions = Sessions::default();
        for _ in 0..(MAX_SESSIONS + 10) {
            sessions.start("k".to_owned(), KeyScope::Admin);
        }
        assert_eq!(sessions.0.lock().expect("lock").len(), MAX_SESSIONS);
    }
}
