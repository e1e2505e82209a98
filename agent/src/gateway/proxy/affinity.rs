//! Prefix affinity: which conversation a request continues, and which node served it last, so later
//! turns can go where the earlier turns' KV cache is.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use super::fields::{self, Fields};
use super::lock;

/// Conversations remembered for prefix affinity, and how much of a prompt identifies one.
const AFFINITY_ENTRIES: usize = 10_000;
const AFFINITY_PROMPT_CHARS: usize = 256;

/// Identifies a conversation: the model, the system prompt and the first user turn (chat), or the system
/// prompt and the start of the prompt (generate). Later turns of one conversation share it, so they can go
/// where the earlier turns' KV cache is.
pub(super) fn conversation_key(model: &str, request: &Fields<'_>) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    model.hash(&mut hasher);
    let (mut system, mut first_user) = (None, None);
    let chat = fields::each_message(request, |message| match message.role.as_deref() {
        Some("system") if system.is_none() => system = message.content,
        Some("user") if first_user.is_none() => first_user = message.content,
        _ => {}
    });
    if chat {
        let first_user = first_user?;
        system.as_deref().hash(&mut hasher);
        first_user.as_ref().hash(&mut hasher);
    } else {
        let prompt = request.text("prompt")?;
        request.text("system").as_deref().hash(&mut hasher);
        prompt
            .chars()
            .take(AFFINITY_PROMPT_CHARS)
            .collect::<String>()
            .hash(&mut hasher);
    }
    Some(hasher.finish())
}

/// Which node last served each conversation; bounded, oldest forgotten first.
#[derive(Debug, Default)]
pub(super) struct Affinity {
    inner: Mutex<(HashMap<u64, String>, VecDeque<u64>)>,
}

impl Affinity {
    pub(super) fn get(&self, key: u64) -> Option<String> {
        lock(&self.inner).0.get(&key).cloned()
    }

    pub(super) fn remember(&self, key: u64, node_id: &str) {
        let mut inner = lock(&self.inner);
        let (map, order) = &mut *inner;
        if map.insert(key, node_id.to_owned()).is_none() {
            order.push_back(key);
            if order.len() > AFFINITY_ENTRIES
                && let Some(oldest) = order.pop_front()
            {
                map.remove(&oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn conversations_share_a_key_across_turns() {
        let first = json!({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]});
        let next = json!({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]});
        let other = json!({"messages": [{"role": "user", "content": "something else"}]});
        let key_for = |model: &str, request: &Value| {
            let body = request.to_string();
            conversation_key(model, &Fields::parse(body.as_bytes()).expect("object"))
        };
        let key = |request: &Value| key_for("m:1", request);
        assert_eq!(key(&first), key(&next));
        assert_ne!(key(&first), key(&other));
        assert_ne!(key_for("m:2", &first), key(&first));
        assert_eq!(key(&json!({"messages": []})), None);
        assert!(key(&json!({"prompt": "abc"})).is_some());
        let affinity = Affinity::default();
        affinity.remember(1, "node-a");
        assert_eq!(affinity.get(1).as_deref(), Some("node-a"));
        assert_eq!(affinity.get(2), None);
    }
}
