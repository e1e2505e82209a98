//! Model names as Ollama reads them: `name` alone means `name:latest`; and which names are names at
//! all, so a name that arrives from the network never becomes a path.

/// The full name of a model: `name` alone becomes `name:latest`; a name with a tag is kept as it is.
pub fn normalize(name: &str) -> String {
    if name.contains(':') {
        name.to_owned()
    } else {
        format!("{name}:latest")
    }
}

/// The longest name accepted (Ollama's own limit on a whole name is about this size).
const MAX_NAME: usize = 350;

/// Checks that `name` is a model name, `[host[:port]/][namespace/]model[:tag]`: each `/`-separated part
/// starts with a letter, digit or `_` and holds only letters, digits, `.`, `-`, `_` (and `:` before a
/// port in the host, or before the tag); no empty part, no `.` or `..`, no control character, no `\`,
/// `%` or space. The error says what is wrong, in words for the client.
pub fn validate(name: &str) -> Result<(), String> {
    let shown: String = name.chars().take(80).collect();
    let refuse = |why: &str| Err(format!("invalid model name {shown:?}: {why}"));
    if name.is_empty() {
        return refuse("it is empty");
    }
    if name.len() > MAX_NAME {
        return refuse("it is longer than 350 bytes");
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '/')))
    {
        return refuse(&format!("{bad:?} is not allowed in a model name"));
    }
    let parts: Vec<&str> = name.split('/').collect();
    let last = parts.len() - 1;
    for (index, part) in parts.iter().enumerate() {
        if part.is_empty() {
            return refuse("it has an empty part (a leading, trailing or doubled `/`)");
        }
        if !part.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
            return refuse("each part must start with a letter, a digit or `_`");
        }
        let colons = part.matches(':').count();
        // The host may carry a port, the model part a tag; nothing else holds a `:`.
        let allowed = if index == last || (index == 0 && parts.len() > 1) {
            1
        } else {
            0
        };
        if colons > allowed {
            return refuse("`:` only separates a tag (or a host's port)");
        }
        if index == last
            && let Some((model, tag)) = part.split_once(':')
            && (model.is_empty() || tag.is_empty() || tag.len() > 128)
        {
            return refuse("the tag after `:` must be 1 to 128 characters");
        }
    }
    Ok(())
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

    #[test]
    fn names_with_registries_namespaces_and_tags_are_names() {
        for name in [
            "smollm2",
            "smollm2:135m",
            "library/smollm2:latest",
            "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
            "localhost:5000/team/model:v1.2",
            "_private/x_y.z-1:tag_2",
        ] {
            assert_eq!(validate(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn paths_and_control_characters_are_refused() {
        for name in [
            "",
            "../../etc/passwd",
            "/etc/passwd",
            "registry.example/../../tmp/x:latest",
            "a//b",
            "a/",
            "a/./b",
            "..",
            "a\\b",
            "a%2fb",
            "a b",
            "line\nbreak",
            "nul\0",
            "é",
            "a:b:c",
            "a/b:c/d",
            "model:",
            ":tag",
        ] {
            assert!(validate(name).is_err(), "{name:?} passed");
        }
        assert!(validate(&"a".repeat(351)).is_err());
        assert!(
            validate("a/../b")
                .expect_err("refused")
                .contains("must start with a letter"),
            "the error says why"
        );
    }
}
