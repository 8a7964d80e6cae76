//! Which Debian archive the base image is built from. pen names no mirror itself: it takes
//! the host's own apt configuration (the entries for the host's release), or `PEN_MIRROR`.

use std::path::Path;

/// The apt sources handed to mmdebstrap, in one-line `deb` form, plus the suite to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptSources {
    pub suite: String,
    pub lines: Vec<String>,
}

/// Reads `VERSION_CODENAME` out of os-release text.
pub fn codename_from_os_release(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim().trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
}

/// One-line `deb` entries of a `sources.list` file (comments and `deb-src` dropped).
pub fn parse_one_line(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| l.starts_with("deb ") || l.starts_with("deb\t"))
        .map(str::to_string)
        .collect()
}

/// Deb822 `.sources` stanzas turned into one-line entries (with `signed-by` kept).
/// Disabled stanzas (`Enabled: no`) and `deb-src` are dropped.
pub fn parse_deb822(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for stanza in text.split("\n\n") {
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in stanza.lines() {
            if line.starts_with('#') {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                if let Some(last) = fields.last_mut() {
                    last.1.push(' ');
                    last.1.push_str(line.trim());
                }
            } else if let Some((k, v)) = line.split_once(':') {
                fields.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let get = |k: &str| {
            fields
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        if get("enabled").is_some_and(|v| v.eq_ignore_ascii_case("no")) {
            continue;
        }
        if !get("types")
            .unwrap_or("")
            .split_whitespace()
            .any(|t| t == "deb")
        {
            continue;
        }
        let (Some(uris), Some(suites)) = (get("uris"), get("suites")) else {
            continue;
        };
        let components = get("components").unwrap_or("");
        let options = match get("signed-by") {
            Some(key) if key.starts_with('/') => format!("[signed-by={key}] "),
            _ => String::new(),
        };
        for uri in uris.split_whitespace() {
            for suite in suites.split_whitespace() {
                lines.push(
                    format!("deb {options}{uri} {suite} {components}")
                        .trim_end()
                        .to_string(),
                );
            }
        }
    }
    lines
}

/// The suite field of a one-line entry (`deb [opts] URI SUITE COMPONENTS...`).
fn suite_of(line: &str) -> Option<&str> {
    let mut words = line.split_whitespace().skip(1);
    let mut word = words.next()?;
    if word.starts_with('[') {
        while !word.ends_with(']') {
            word = words.next()?;
        }
        word = words.next()?;
    }
    let _uri = word;
    words.next()
}

/// Keeps the entries for `suite` and its companions (`-updates`, `-security`).
pub fn for_suite(lines: Vec<String>, suite: &str) -> Vec<String> {
    lines
        .into_iter()
        .filter(|l| {
            suite_of(l).is_some_and(|s| {
                s == suite
                    || s.strip_prefix(suite)
                        .is_some_and(|rest| rest.starts_with('-'))
            })
        })
        .collect()
}

/// The sources for the base image: `PEN_MIRROR` (a URL) if set, else the host's apt entries
/// for the host's release. `etc` is `/etc` (a parameter for tests).
pub fn host_sources(etc: &Path, mirror_override: Option<&str>) -> anyhow::Result<AptSources> {
    let os_release = std::fs::read_to_string(etc.join("os-release")).unwrap_or_default();
    let suite = codename_from_os_release(&os_release).unwrap_or_else(|| "bookworm".to_string());
    if let Some(mirror) = mirror_override {
        return Ok(AptSources {
            lines: vec![format!("deb {mirror} {suite} main")],
            suite,
        });
    }
    let mut lines = Vec::new();
    let apt = etc.join("apt");
    if let Ok(text) = std::fs::read_to_string(apt.join("sources.list")) {
        lines.extend(parse_one_line(&text));
    }
    let mut parts: Vec<_> = std::fs::read_dir(apt.join("sources.list.d"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    parts.sort();
    for path in parts {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        match path.extension().and_then(|e| e.to_str()) {
            Some("list") => lines.extend(parse_one_line(&text)),
            Some("sources") => lines.extend(parse_deb822(&text)),
            _ => {}
        }
    }
    let lines = for_suite(lines, &suite);
    if lines.is_empty() {
        anyhow::bail!(
            "the host's apt configuration has no entries for the Debian release {suite:?}; set PEN_MIRROR to a Debian mirror URL"
        );
    }
    Ok(AptSources { suite, lines })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "Types: deb\n# comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n\nTypes: deb\nURIs: https://other.example/node\nSuites: nodistro\nComponents: main\n\nEnabled: no\nTypes: deb\nURIs: http://x/\nSuites: bookworm\n";

    #[test]
    fn deb822_becomes_one_line_entries_for_the_suite() {
        let lines = for_suite(parse_deb822(DEB822), "bookworm");
        assert_eq!(
            lines,
            vec![
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example/debian bookworm main",
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example/debian bookworm-updates main",
                "deb http://mirror.example/debian-security bookworm-security main",
            ]
        );
    }

    #[test]
    fn one_line_sources_skip_comments_and_other_suites() {
        let text = "# deb http://x bookworm main\ndeb http://m/debian bookworm main contrib\ndeb-src http://m/debian bookworm main\ndeb [arch=amd64] https://o/apt stable main\n";
        assert_eq!(
            for_suite(parse_one_line(text), "bookworm"),
            vec!["deb http://m/debian bookworm main contrib"]
        );
    }

    #[test]
    fn mirror_override_and_codename() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("os-release"),
            "ID=debian\nVERSION_CODENAME=bookworm\n",
        )
        .unwrap();
        let s = host_sources(dir.path(), Some("http://mirror.example/debian")).unwrap();
        assert_eq!(s.suite, "bookworm");
        assert_eq!(
            s.lines,
            vec!["deb http://mirror.example/debian bookworm main"]
        );
        assert!(host_sources(dir.path(), None).is_err());
    }
}
