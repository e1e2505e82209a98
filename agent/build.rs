//! Embeds the built dashboard (`dashboard/dist/`) into the binary when it exists.
//!
//! A fresh clone compiles without it: the generated table is then empty and
//! the coordinator serves a page that says how to build the dashboard.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let dist = manifest_dir.join("../dashboard/dist");
    println!("cargo:rerun-if-changed={}", dist.display());
    let mut files = Vec::new();
    if dist.join("index.html").is_file() {
        collect(&dist, &mut files);
        files.sort();
    }
    let mut code = String::from(
        "/// (path under /dashboard/, content type, bytes)\npub const ASSETS: &[(&str, &str, &[u8])] = &[\n",
    );
    for path in &files {
        println!("cargo:rerun-if-changed={}", path.display());
        let relative = path
            .strip_prefix(&dist)
            .expect("inside dist")
            .to_string_lossy()
            .replace('\\', "/");
        let absolute = path.canonicalize().expect("canonical path");
        writeln!(
            code,
            "    ({relative:?}, {:?}, include_bytes!({:?})),",
            content_type(path),
            absolute.display().to_string()
        )
        .expect("write to string");
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("dashboard_assets.rs");
    std::fs::write(out, code).expect("write dashboard_assets.rs");
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    println!("cargo:rerun-if-changed={}", dir.display());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(&path, files);
        } else {
            files.push(path);
        }
    }
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|extension| extension.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("wasm") => "application/wasm",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}
