//! The environment every session starts with: fixed defaults, then the VM's env from the
//! host's configuration, then the request's own env. Later entries override earlier ones.

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Merges `layers` in order: a key set again replaces the earlier value but keeps its
/// position, so the result is deterministic. Entries with an empty key or a key containing
/// `=` or NUL cannot be represented in an environment and are dropped.
pub fn merge<'a>(
    layers: impl IntoIterator<Item = &'a [(String, String)]>,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for layer in layers {
        for (k, v) in layer {
            if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
                continue;
            }
            match out.iter_mut().find(|(ek, _)| ek == k) {
                Some(entry) => entry.1 = v.clone(),
                None => out.push((k.clone(), v.clone())),
            }
        }
    }
    out
}

/// The fixed part of every session's environment.
pub fn base(hostname: &str, home: &str) -> Vec<(String, String)> {
    [
        ("PATH", DEFAULT_PATH),
        ("HOME", home),
        ("USER", "root"),
        ("LOGNAME", "root"),
        ("SHELL", "/bin/bash"),
        ("LANG", "C.UTF-8"),
        ("HOSTNAME", hostname),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Single-quotes `value` for a POSIX shell.
pub fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// `/run/pen/env` (tmpfs, mode 0600): the VM env as `export K='V'` lines, for shells that
/// were not started by the agent (e.g. `su -`).
pub fn export_script(vars: &[(String, String)]) -> String {
    vars.iter()
        .filter(|(k, _)| k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .map(|(k, v)| format!("export {k}={}\n", shell_quote(v)))
        .collect()
}

pub fn write_env_file(vars: &[(String, String)]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all("/run/pen")?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open("/run/pen/env")?;
    f.write_all(export_script(vars).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn later_layers_override_in_place() {
        let base = kv(&[("PATH", "/bin"), ("HOME", "/root")]);
        let vm = kv(&[("FOO", "vm"), ("PATH", "/opt/bin")]);
        let req = kv(&[("FOO", "req"), ("BAR", "1")]);
        assert_eq!(
            merge([&base[..], &vm[..], &req[..]]),
            kv(&[
                ("PATH", "/opt/bin"),
                ("HOME", "/root"),
                ("FOO", "req"),
                ("BAR", "1")
            ])
        );
    }

    #[test]
    fn unrepresentable_entries_are_dropped() {
        let bad = kv(&[("", "x"), ("A=B", "x"), ("C", "nul\0"), ("OK", "")]);
        assert_eq!(merge([&bad[..]]), kv(&[("OK", "")]));
    }

    #[test]
    fn export_script_quotes() {
        let vars = kv(&[("A", "it's"), ("bad-key", "x")]);
        assert_eq!(export_script(&vars), "export A='it'\\''s'\n");
    }
}
