//! Model names as Ollama reads them: `name` alone means `name:latest`.

/// The full name of a model: `name` alone becomes `name:latest`; a name with a tag is kept as it is.
pub fn normalize(name: &str) -> String {
    if name.contains(':') {
        name.to_owned()
    } else {
        format!("{name}:latest")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_without_a_tag_means_latest() {
        fn check(name: &str, expected: &str) {
            assert_eq!(normalize(name), expected);
        }
        check("smollm2", "smollm2:latest");
        check("smollm2:135m", "smollm2:135m");
        check("library/smollm2:latest", "library/smollm2:latest");
    }
}
