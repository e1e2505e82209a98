//! Fuzzes what a browser and a peer control in text: the `Origin` and `Host` headers against the
//! browser boundary (`agent/policy/src/browser.rs`, compiled here as it is) and digests that name
//! files (`sollol-shared`'s `Sha256Digest`). Never a panic; a digest that passes never names a path
//! outside its directory.
#![no_main]

#[path = "../../agent/policy/src/browser.rs"]
#[allow(dead_code)]
mod browser;

use sollol_shared::digest::Sha256Digest;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (origin, host) = text.split_once('\n').unwrap_or((&text, ""));
    for bound in [[127, 0, 0, 1], [0, 0, 0, 0]] {
        let boundary = browser::Boundary::new(
            std::net::IpAddr::from(bound),
            &["https://*.example.org".to_owned()],
            &["*.cluster.lan".to_owned()],
            "homelab",
        );
        let _ = boundary.check(Some(origin), Some(host));
        let _ = boundary.check(None, Some(origin));
    }
    if let Ok(digest) = Sha256Digest::parse(&text) {
        let stem = digest.file_stem();
        assert!(!stem.contains('/') && !stem.contains(".."), "{stem}");
        assert_eq!(stem.len(), 71);
    }
});
