//! Tool calls in a model's answer, in the shapes common chat templates teach their models:
//! `<tool_call>{...}</tool_call>` (Hermes, Qwen 2.5 and 3, SmolLM3), `[TOOL_CALLS][...]` (Mistral),
//! `<|python_tag|>{...}` (Llama 3.1), or an answer that is nothing but a JSON call or list of calls
//! (Llama 3.2). A call is `{"name": ..., "arguments": {...}}` (`parameters` for Llama's). Only names
//! among the request's tools count; anything else is the answer's text.

use serde_json::Value;

/// One call, as Ollama's `message.tool_calls[].function` holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// A JSON object (Ollama sends it as an object, OpenAI as a string of it).
    pub arguments: Value,
}

/// The calls `text` makes of the tools named `known`; `None` when it is not (only) tool calls.
pub fn parse(text: &str, known: &[&str]) -> Option<Vec<ToolCall>> {
    let text = text.trim();
    let mut calls = Vec::new();
    if text.contains("<tool_call>") {
        let mut rest = text;
        while let Some(start) = rest.find("<tool_call>") {
            // Only whitespace may stand between calls.
            if !rest[..start].trim().is_empty() {
                return None;
            }
            let after = &rest[start + "<tool_call>".len()..];
            let (body, next) = match after.find("</tool_call>") {
                Some(end) => (&after[..end], &after[end + "</tool_call>".len()..]),
                // A model that stopped before closing its last call.
                None => (after, ""),
            };
            calls.extend(calls_in(body.trim(), known)?);
            rest = next;
        }
        if !rest.trim().is_empty() {
            return None;
        }
    } else if let Some(body) = text
        .strip_prefix("[TOOL_CALLS]")
        .or_else(|| text.strip_prefix("<|python_tag|>"))
    {
        calls = calls_in(body.trim(), known)?;
    } else if text.starts_with('{') || text.starts_with('[') {
        calls = calls_in(text, known)?;
    }
    (!calls.is_empty()).then_some(calls)
}

/// A JSON call, a list of them, or several objects one after another.
fn calls_in(text: &str, known: &[&str]) -> Option<Vec<ToolCall>> {
    let mut calls = Vec::new();
    let values = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    for value in values {
        match value.ok()? {
            Value::Array(items) => {
                for item in items {
                    calls.push(call_of(item, known)?);
                }
            }
            item => calls.push(call_of(item, known)?),
        }
    }
    Some(calls)
}

fn call_of(value: Value, known: &[&str]) -> Option<ToolCall> {
    let mut object = match value {
        Value::Object(object) => object,
        _ => return None,
    };
    // OpenAI-style `{"function": {"name", "arguments"}}` wrappers too.
    if let Some(Value::Object(function)) = object.remove("function") {
        object = function;
    }
    let name = object.get("name")?.as_str()?.to_owned();
    if !known.contains(&name.as_str()) {
        return None;
    }
    let arguments = match object
        .remove("arguments")
        .or_else(|| object.remove("parameters"))
    {
        None | Some(Value::Null) => Value::Object(serde_json::Map::new()),
        // Some models write the arguments as a JSON string.
        Some(Value::String(text)) => serde_json::from_str(&text).ok()?,
        Some(arguments @ Value::Object(_)) => arguments,
        Some(_) => return None,
    };
    Some(ToolCall { name, arguments })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KNOWN: &[&str] = &["weather", "time"];

    fn call(name: &str, arguments: Value) -> ToolCall {
        ToolCall {
            name: name.to_owned(),
            arguments,
        }
    }

    #[test]
    fn the_common_shapes_are_read() {
        let paris = || call("weather", json!({"city": "Paris"}));
        for text in [
            r#"<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>"#,
            "<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n",
            r#"<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}"#,
            r#"[TOOL_CALLS][{"name": "weather", "arguments": {"city": "Paris"}}]"#,
            r#"<|python_tag|>{"name": "weather", "parameters": {"city": "Paris"}}"#,
            r#"{"name": "weather", "parameters": {"city": "Paris"}}"#,
            r#"{"name": "weather", "arguments": "{\"city\": \"Paris\"}"}"#,
            r#"{"function": {"name": "weather", "arguments": {"city": "Paris"}}}"#,
        ] {
            assert_eq!(parse(text, KNOWN), Some(vec![paris()]), "{text}");
        }
        let two = r#"<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>
<tool_call>{"name": "time", "arguments": {}}</tool_call>"#;
        assert_eq!(
            parse(two, KNOWN),
            Some(vec![paris(), call("time", json!({}))])
        );
        assert_eq!(
            parse(
                r#"[{"name": "time"}, {"name": "weather", "arguments": {"city": "Paris"}}]"#,
                KNOWN
            ),
            Some(vec![call("time", json!({})), paris()])
        );
    }

    #[test]
    fn prose_unknown_tools_and_broken_json_are_text() {
        for text in [
            "The weather in Paris is sunny.",
            r#"I will call {"name": "weather"}"#,
            r#"{"name": "launch_missiles", "arguments": {}}"#,
            r#"{"name": "weather", "arguments": {"city": "Par"#,
            r#"<tool_call>{"name": "weather", "arguments": {}}</tool_call> and some words"#,
            r#"{"city": "Paris"}"#,
            r#"{"name": "weather", "arguments": [1, 2]}"#,
            "",
        ] {
            assert_eq!(parse(text, KNOWN), None, "{text}");
        }
    }
}
