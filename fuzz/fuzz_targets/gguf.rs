//! Fuzzes the engine's GGUF reader (`agent/engine/src/gguf.rs`, compiled here as it is): any input
//! is either an error or a directory whose every tensor lies inside the input. Never a panic, a huge
//! allocation or a read out of bounds.
#![no_main]

#[path = "../../agent/engine/src/gguf.rs"]
#[allow(dead_code)]
mod gguf;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(file) = gguf::Gguf::read(data, data.len() as u64) {
        for tensor in &file.tensors {
            assert!(tensor.offset + tensor.size <= data.len() as u64);
            let mut reader = std::io::Cursor::new(data);
            let (_, bytes) = file
                .tensor_bytes(&mut reader, &tensor.name)
                .expect("a tensor inside the file reads");
            assert_eq!(bytes.len() as u64, tensor.size);
        }
    }
});
