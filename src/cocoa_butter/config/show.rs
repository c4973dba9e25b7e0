//! What `config show` prints: every leaf value with the layer it came
//! from, secrets and URL credentials redacted.

use figment::Figment;
use figment::value::Value;
use serde::Serialize;

use super::*;

/// A NATS URL (or a comma-separated list) with any `user:password@` or
/// `token@` replaced, for messages and `config show`.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let start = url.find("://").map_or(0, |i| i + 3);
            match url[start..].rfind('@') {
                Some(at) => format!("{}{REDACTED}{}", &url[..start], &url[start + at..]),
                None => url.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether `config show` must hide the value at this key: any part of the
/// path that names a secret, so a misspelt key (`nats.pasword`, shown before
/// it is refused) or a room's own secret setting is hidden too. Keys ending
/// in `_file` hold paths and are shown.
pub fn is_secret_key(path: &str) -> bool {
    const WORDS: &[&str] = &[
        "pass",
        "token",
        "secret",
        "seed",
        "credential",
        "private_key",
        "api_key",
        "apikey",
    ];
    path.split('.').any(|part| {
        let part = part.to_ascii_lowercase();
        !part.ends_with("_file") && WORDS.iter().any(|w| part.contains(w))
    })
}

/// One leaf of the merged configuration and the layer it came from.
#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    pub key: String,
    pub value: serde_json::Value,
    pub source: String,
}

/// Every leaf value of the merged configuration with its origin, for
/// `config show`.
pub fn provenance(figment: &Figment) -> Result<Vec<Provenance>, ConfigError> {
    let mut out = Vec::new();
    let root = figment.find_value("")?;
    walk(figment, "", &root, &mut out);
    Ok(out)
}

pub(super) fn walk(figment: &Figment, prefix: &str, value: &Value, out: &mut Vec<Provenance>) {
    if let Value::Dict(_, dict) = value {
        for (key, child) in dict {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            walk(figment, &path, child, out);
        }
        return;
    }
    let source = figment
        .get_metadata(value.tag())
        .map(|meta| match &meta.source {
            Some(source) => format!("{} ({source})", meta.name),
            // Only the environment layer knows the exact variable.
            None if meta.name.contains("environment") => format!(
                "environment CHOCO_{}",
                prefix.replace('.', "__").to_uppercase()
            ),
            None => meta.name.to_string(),
        })
        .unwrap_or_else(|| "unknown".into());
    let unset = matches!(value, Value::Empty(..));
    let value = if is_secret_key(prefix) && !unset {
        serde_json::Value::String(REDACTED.into())
    } else if prefix == "nats.url" {
        // A string or an array of them: every entry redacted.
        match value.deserialize::<ServerUrls>() {
            Ok(urls) => serde_json::Value::String(urls.redacted()),
            Err(_) => serde_json::Value::Null,
        }
    } else {
        value
            .deserialize::<serde_json::Value>()
            .unwrap_or(serde_json::Value::Null)
    };
    out.push(Provenance {
        key: prefix.to_string(),
        value,
        source,
    });
}
