//! `--env K=V` and `--env-from-host K`. Values are resolved when the VM starts and travel
//! only over the control channel: this module never writes them anywhere.

use crate::UsageError;

/// A valid environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn valid_key(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses the `--env` values, then the `--env-from-host` names (looked up with `lookup`),
/// in that order; later entries override earlier ones inside the guest.
pub fn resolve(
    pairs: &[String],
    from_host: &[String],
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Vec<(String, String)>, UsageError> {
    let mut env = Vec::new();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(UsageError::new(format!(
                "--env {pair:?} has no '=': write it as --env KEY=VALUE"
            )));
        };
        if !valid_key(key) {
            return Err(UsageError::new(format!(
                "--env {key:?}: not a valid variable name (letters, digits and '_', not starting with a digit)"
            )));
        }
        env.push((key.to_string(), value.to_string()));
    }
    for key in from_host {
        if !valid_key(key) {
            return Err(UsageError::new(format!(
                "--env-from-host {key:?}: not a valid variable name"
            )));
        }
        let value = lookup(key).ok_or_else(|| {
            UsageError::new(format!(
                "--env-from-host {key}: {key} is not set in this shell; export it first or pass --env {key}=VALUE"
            ))
        })?;
        env.push((key.clone(), value));
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_and_host_values() {
        let env = resolve(
            &["A=1".into(), "B=x=y".into(), "C=".into()],
            &["HOSTV".into()],
            |k| (k == "HOSTV").then(|| "h".to_string()),
        )
        .unwrap();
        assert_eq!(
            env,
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "x=y".into()),
                ("C".into(), "".into()),
                ("HOSTV".into(), "h".into())
            ]
        );
    }

    #[test]
    fn refuses_bad_input() {
        assert!(resolve(&["NOEQUALS".into()], &[], |_| None)
            .unwrap_err()
            .0
            .contains("has no '='"));
        assert!(resolve(&["1X=2".into()], &[], |_| None).is_err());
        assert!(resolve(&[], &["UNSET_VAR".into()], |_| None)
            .unwrap_err()
            .0
            .contains("is not set"));
    }
}
