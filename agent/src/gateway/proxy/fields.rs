//! The fields of a request body that routing reads, parsed without building the document.
//!
//! The body is forwarded as the bytes the client sent, so the gateway never needs the whole JSON tree:
//! the top level is read as each field's raw text, borrowed from the body, and only the few fields routing
//! reads (`model`, `stream`, the prompt's size, the conversation's first turns, the embedding inputs) are
//! decoded from those, one list item at a time. At worst (a list of one-digit numbers) that is a 16-byte
//! slice per 2 bytes of text, where a `serde_json::Value` took 32 bytes per element and a copy of every
//! string.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::value::RawValue;

/// A JSON object's top-level fields, each as its raw JSON text (a later duplicate wins, as in Ollama).
#[derive(Debug)]
pub(super) struct Fields<'a> {
    fields: BTreeMap<Cow<'a, str>, &'a RawValue>,
}

impl<'a> Fields<'a> {
    /// The object `body` holds; `Err` says why it is not valid JSON or not an object.
    pub(super) fn parse(body: &'a [u8]) -> Result<Self, String> {
        let raw: &RawValue =
            serde_json::from_slice(body).map_err(|error| format!("invalid JSON: {error}"))?;
        if !raw.get().starts_with('{') {
            return Err("the request body must be a JSON object".to_owned());
        }
        let fields =
            serde_json::from_str(raw.get()).map_err(|error| format!("invalid JSON: {error}"))?;
        Ok(Self { fields })
    }

    pub(super) fn raw(&self, key: &str) -> Option<&'a RawValue> {
        self.fields.get(key).copied()
    }

    /// `key` as a string; `None` when absent or of another type.
    pub(super) fn text(&self, key: &str) -> Option<Cow<'a, str>> {
        self.raw(key).and_then(text)
    }

    /// `key` decoded as `T`; `None` when absent or of another shape.
    pub(super) fn get<T: Deserialize<'a>>(&self, key: &str) -> Option<T> {
        self.raw(key)
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
    }

    /// `key` as a list of raw items; `None` when absent or not a list.
    pub(super) fn list(&self, key: &str) -> Option<Vec<&'a RawValue>> {
        self.get(key)
    }

    /// Calls `each` with every item of the list `key`, without collecting them; whether `key` is a list.
    pub(super) fn each_item(&self, key: &str, each: impl FnMut(&'a RawValue)) -> bool {
        self.raw(key).is_some_and(|raw| each_item(raw, each))
    }

    /// Every field but `key`, to send again with another value for it.
    pub(super) fn without(&self, key: &str) -> BTreeMap<Cow<'a, str>, &'a RawValue> {
        let mut rest = self.fields.clone();
        rest.remove(key);
        rest
    }
}

/// A raw JSON string, borrowed when it has no escapes; `None` for any other JSON.
pub(super) fn text(raw: &RawValue) -> Option<Cow<'_, str>> {
    if let Ok(plain) = serde_json::from_str::<&str>(raw.get()) {
        return Some(Cow::Borrowed(plain));
    }
    serde_json::from_str::<String>(raw.get())
        .ok()
        .map(Cow::Owned)
}

/// One chat message as routing reads it: its role and text content.
#[derive(Debug, Default)]
pub(super) struct Message<'a> {
    pub(super) role: Option<Cow<'a, str>>,
    pub(super) content: Option<Cow<'a, str>>,
}

impl<'a> Message<'a> {
    /// `raw` as a message; one that is not an object has neither.
    pub(super) fn read(raw: &'a RawValue) -> Self {
        #[derive(Deserialize)]
        struct Shape<'a> {
            #[serde(borrow, default)]
            role: Option<&'a RawValue>,
            #[serde(borrow, default)]
            content: Option<&'a RawValue>,
        }
        serde_json::from_str::<Shape<'a>>(raw.get())
            .map(|shape| Self {
                role: shape.role.and_then(text),
                content: shape.content.and_then(text),
            })
            .unwrap_or_default()
    }
}

/// Calls `each` with every item of the list `raw`, one at a time; whether `raw` is a list.
pub(super) fn each_item<'a>(raw: &'a RawValue, mut each: impl FnMut(&'a RawValue)) -> bool {
    struct Items<'f, F>(&'f mut F);
    impl<'de, F: FnMut(&'de RawValue)> serde::de::Visitor<'de> for Items<'_, F> {
        type Value = ();
        fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            formatter.write_str("a list")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
            while let Some(item) = items.next_element::<&'de RawValue>()? {
                (self.0)(item);
            }
            Ok(())
        }
    }
    let mut deserializer = serde_json::Deserializer::from_str(raw.get());
    serde::Deserializer::deserialize_seq(&mut deserializer, Items(&mut each)).is_ok()
}

/// Calls `each` with every message of a chat request, read for routing one at a time; whether
/// `messages` is a list.
pub(super) fn each_message<'a>(fields: &Fields<'a>, mut each: impl FnMut(Message<'a>)) -> bool {
    fields.each_item("messages", |raw| each(Message::read(raw)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_from_the_raw_text_and_keep_their_types() {
        let body = br#"{"model": "m:1", "stream": false, "name": 3, "input": ["a", {"b": 1}],
            "messages": [{"role": "user", "content": "caf\u00e9 \"x\""}, "odd", {"content": 4}],
            "model": "m:2"}"#;
        let fields = Fields::parse(body).expect("object");
        assert_eq!(fields.text("model").as_deref(), Some("m:2"), "last wins");
        assert_eq!(fields.get::<bool>("stream"), Some(false));
        assert_eq!(fields.text("name"), None, "a number is not a name");
        assert_eq!(fields.get::<bool>("model"), None);
        let inputs = fields.list("input").expect("list");
        let mut counted = 0;
        assert!(fields.each_item("input", |_| counted += 1));
        assert_eq!(counted, 2);
        assert!(!fields.each_item("model", |_| counted += 1));
        assert!(!fields.each_item("absent", |_| counted += 1));
        assert_eq!(
            inputs.iter().map(|raw| raw.get()).collect::<Vec<_>>(),
            [r#""a""#, r#"{"b": 1}"#]
        );
        let mut messages: Vec<Message<'_>> = Vec::new();
        assert!(each_message(&fields, |message| messages.push(message)));
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[0].role.as_deref(), Some("user"));
        assert_eq!(messages[0].content.as_deref(), Some("café \"x\""));
        assert!(messages[1].role.is_none() && messages[1].content.is_none());
        assert!(messages[2].content.is_none());
        assert_eq!(
            fields.without("input").keys().collect::<Vec<_>>(),
            ["messages", "model", "name", "stream"]
        );
    }

    #[test]
    fn only_json_objects_are_requests() {
        for body in [
            &b"{"[..],
            b"[1]",
            b"\"text\"",
            b"",
            b"{} trailing",
            b"{\"a\":}",
        ] {
            assert!(
                Fields::parse(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(Fields::parse(b" {} ").is_ok());
    }
}
