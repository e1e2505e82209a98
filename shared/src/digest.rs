//! Content digests as Ollama writes them: `sha256:` and 64 lowercase hexadecimal digits. A digest that
//! arrives from the network is checked with [`Sha256Digest::parse`] before it names anything on disk.

use std::fmt;

/// A well-formed SHA-256 digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Digest(String);

impl Sha256Digest {
    /// `sha256:HEX` (Ollama's API form) or `sha256-HEX` (its blob file names); anything else, a path
    /// separator or `..` included, is refused.
    pub fn parse(text: &str) -> Result<Self, String> {
        let hex = text
            .strip_prefix("sha256:")
            .or_else(|| text.strip_prefix("sha256-"))
            .ok_or_else(|| format!("digest {:?} does not start with sha256:", shorten(text)))?;
        if hex.len() != 64 || !hex.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return Err(format!(
                "digest {:?} is not sha256: and 64 hexadecimal digits",
                shorten(text)
            ));
        }
        Ok(Self(format!("sha256:{}", hex.to_ascii_lowercase())))
    }

    /// `sha256:HEX`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `sha256-HEX`: safe as a file name (no separator, no dot).
    pub fn file_stem(&self) -> String {
        self.0.replace(':', "-")
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// At most 80 characters of untrusted text, for an error message.
fn shorten(text: &str) -> String {
    text.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sha256_and_64_hex_digits_pass() {
        let hex = "ab".repeat(32);
        let parsed = Sha256Digest::parse(&format!("sha256:{hex}")).expect("valid");
        assert_eq!(parsed.file_stem(), format!("sha256-{hex}"));
        assert_eq!(
            Sha256Digest::parse(&format!("sha256-{}", hex.to_uppercase())),
            Ok(parsed)
        );
        for bad in [
            String::new(),
            "sha256:".to_owned(),
            format!("sha256:{}", &hex[..63]),
            format!("sha256:{hex}0"),
            format!("sha256:../../{}", &hex[..58]),
            format!("sha256:{}/x", &hex[..62]),
            "/etc/passwd".to_owned(),
            format!("sha512:{hex}"),
            format!("sha256:{}zz", &hex[..62]),
        ] {
            assert!(Sha256Digest::parse(&bad).is_err(), "{bad}");
        }
    }
}
