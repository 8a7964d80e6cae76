//! VM and profile names: `[a-z0-9][a-z0-9._-]{0,62}`. Checked before any file is made,
//! because names become directory names under `$PEN_HOME`.

use crate::UsageError;

pub const MAX_NAME_LEN: usize = 63;

/// Checks a VM or profile name; `what` ("VM", "profile") goes into the message.
pub fn validate(what: &str, name: &str) -> Result<(), UsageError> {
    let problem = if name.is_empty() {
        Some("is empty".to_string())
    } else if name.len() > MAX_NAME_LEN {
        Some(format!(
            "is {} characters long (at most {MAX_NAME_LEN})",
            name.len()
        ))
    } else if !name.as_bytes()[0].is_ascii_lowercase() && !name.as_bytes()[0].is_ascii_digit() {
        Some("must start with a lowercase letter or a digit".to_string())
    } else {
        name.chars()
            .find(|c| {
                !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
            })
            .map(|c| format!("contains {c:?}"))
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(UsageError::new(format!(
            "invalid {what} name {name:?}: it {problem}; use lowercase letters, digits, '.', '_' and '-', starting with a letter or digit, at most {MAX_NAME_LEN} characters"
        ))),
    }
}

/// The default VM name for a directory: its base name, lowercased, with anything outside the
/// allowed set replaced by '-'. Fails when nothing usable remains.
pub fn from_dir(dir: &std::path::Path) -> Result<String, UsageError> {
    let base = dir
        .file_name()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let mut name: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    name = name
        .trim_start_matches(['.', '_', '-'])
        .chars()
        .take(MAX_NAME_LEN)
        .collect();
    validate("VM", &name).map_err(|_| {
        UsageError::new(format!(
            "cannot derive a VM name from directory {}: give one explicitly, e.g. `pen shell dev`",
            dir.display()
        ))
    })?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_names() {
        for name in ["dev", "a", "0", "my-vm.2_x", &"a".repeat(63)] {
            validate("VM", name).unwrap();
        }
    }

    #[test]
    fn refuses_invalid_names() {
        for name in [
            "",
            "../x",
            "A B",
            "Dev",
            "-x",
            ".x",
            "a/b",
            "a b",
            &"a".repeat(64),
            "é",
        ] {
            let err = validate("VM", name).unwrap_err().to_string();
            assert!(err.starts_with("invalid VM name"), "{name:?}: {err}");
        }
    }

    #[test]
    fn derives_names_from_directories() {
        assert_eq!(
            from_dir("/home/me/My Project".as_ref()).unwrap(),
            "my-project"
        );
        assert_eq!(from_dir("/src/.hidden".as_ref()).unwrap(), "hidden");
        assert!(from_dir("/".as_ref()).is_err());
    }
}
