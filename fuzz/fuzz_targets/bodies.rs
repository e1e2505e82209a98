//! Fuzzes the gateway's reading of request bodies (`agent/src/gateway/proxy/fields.rs`, compiled here as
//! it is): any bytes a client sends to a forwarded route are either refused with a reason or read for
//! routing — the model, `stream`, every message and input, the output limit, the fields sent again
//! with an embedding chunk — and never panic.
#![no_main]

#[path = "../../agent/src/gateway/proxy/fields.rs"]
#[allow(dead_code)]
mod fields;

use fields::Fields;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(body) = Fields::parse(data) else {
        return;
    };
    let _ = body.text("model").or_else(|| body.text("name"));
    let _ = body.get::<bool>("stream");
    let _ = body.get::<i64>("max_tokens");
    let mut characters = 0usize;
    fields::each_message(&body, |message| {
        characters += message.content.map_or(0, |text| text.len());
        let _ = message.role;
    });
    let mut counted = 0usize;
    let is_list = body.each_item("input", |item| {
        counted += 1;
        characters += fields::text(item).map_or(0, |text| text.len());
    });
    if let Some(inputs) = body.list("input") {
        assert!(is_list);
        assert_eq!(inputs.len(), counted);
        // An embedding chunk: the other fields as they came, a slice of the inputs; valid JSON again.
        // Checked for syntax only: a number like 1e999 is valid JSON that no f64 holds, and it is
        // passed to the node as the client wrote it.
        let rest = body.without("input");
        let bytes = serde_json::to_vec(&rest).expect("the fields serialise");
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).expect("the fields re-read");
        assert_eq!(bytes.first(), Some(&b'{'));
    }
});
