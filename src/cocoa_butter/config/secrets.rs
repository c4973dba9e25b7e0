//! Secrets in the configuration: the redacting [`Secret`], and reading
//! a secret given inline or in a file (the NATS credentials), checked at
//! start so a bad file is refused once rather than at every reconnect.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::*;

/// What `config show`, `Debug` and serialisation print instead of a secret.
pub const REDACTED: &str = "<redacted>";

/// A secret from the configuration (a token, a password, an nkey seed).
///
/// A newtype rather than the `secrecy` crate: what is needed is that the
/// value never reaches a log line, an error or `config show`, which a
/// redacting `Debug` and `Serialize` give; the value lives as long as the
/// process anyway (the client keeps its own copy to reconnect), so wiping
/// it on drop would buy little.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    /// Only a string; any other type is refused without quoting it, since
    /// serde's usual "invalid type: integer `123`" would print the secret.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        const QUOTE: &str =
            "a secret must be a string (quote it); the value is not shown because it is a secret";
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Secret, E> {
                Ok(Secret(v))
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Secret, E> {
                Err(E::custom(QUOTE))
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Secret, E> {
                Err(E::custom(QUOTE))
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Secret, E> {
                Err(E::custom(QUOTE))
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Secret, E> {
                Err(E::custom(QUOTE))
            }
            fn visit_char<E: serde::de::Error>(self, v: char) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_bytes<E: serde::de::Error>(self, _: &[u8]) -> Result<Secret, E> {
                Err(E::custom(QUOTE))
            }
        }
        deserializer.deserialize_string(Visitor)
    }
}

/// A secret from its own file. One trailing line break is not part of it:
/// `echo "$TOKEN" > file` writes one.
pub(super) fn read_secret(key: &'static str, path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Unreadable {
        key,
        path: path.to_path_buf(),
        reason: err.to_string(),
    })?;
    let value = text
        .strip_suffix('\n')
        .map(|line| line.strip_suffix('\r').unwrap_or(line))
        .unwrap_or(&text);
    if value.is_empty() {
        return Err(ConfigError::invalid(
            key,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(Secret::new(value))
}

/// A secret given inline or in a file, not both; `None` when neither.
pub(super) fn inline_or_file(
    inline_key: &'static str,
    inline: Option<&Secret>,
    file_key: &'static str,
    file: Option<&Path>,
) -> Result<Option<(Secret, &'static str)>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(ConfigError::invalid(
            file_key,
            format!("{inline_key} is set too; give the secret one way"),
        )),
        (Some(secret), None) if secret.expose().is_empty() => {
            Err(ConfigError::invalid(inline_key, "is empty"))
        }
        (Some(secret), None) => Ok(Some((secret.clone(), inline_key))),
        (None, Some(path)) => Ok(Some((read_secret(file_key, path)?, file_key))),
        (None, None) => Ok(None),
    }
}

/// One way to authenticate, its secret read and checked: a bad file is
/// refused at start rather than by the server at every reconnect.
pub(super) fn resolve_nats_auth(nats: &NatsConfig) -> Result<NatsAuth, ConfigError> {
    let mut ways = Vec::new();
    if nats.credentials_file.is_some() {
        ways.push("nats.credentials_file");
    }
    if nats.nkey_seed.is_some() {
        ways.push("nats.nkey_seed");
    } else if nats.nkey_seed_file.is_some() {
        ways.push("nats.nkey_seed_file");
    }
    if nats.token.is_some() {
        ways.push("nats.token");
    } else if nats.token_file.is_some() {
        ways.push("nats.token_file");
    }
    if nats.user.is_some() || nats.password.is_some() || nats.password_file.is_some() {
        ways.push("nats.user");
    }
    if let [first, second, ..] = ways[..] {
        return Err(ConfigError::invalid(
            second,
            format!("{first} is set too; configure one way to authenticate"),
        ));
    }

    if let Some(path) = &nats.credentials_file {
        let key = "nats.credentials_file";
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Unreadable {
            key,
            path: path.to_path_buf(),
            reason: err.to_string(),
        })?;
        // The parser's message is not passed on: it could quote the file.
        if async_nats::ConnectOptions::with_credentials(&text).is_err() {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "{} is not a NATS credentials file (a user JWT and its nkey seed)",
                    path.display()
                ),
            ));
        }
        return Ok(NatsAuth::CredentialsFile(path.clone()));
    }
    if let Some((seed, from)) = inline_or_file(
        "nats.nkey_seed",
        nats.nkey_seed.as_ref(),
        "nats.nkey_seed_file",
        nats.nkey_seed_file.as_deref(),
    )? {
        let is_user = nkeys::KeyPair::from_seed(seed.expose())
            .is_ok_and(|pair| pair.public_key().starts_with('U'));
        if !is_user {
            return Err(ConfigError::invalid(
                from,
                "is not a user nkey seed (one starts with SU)",
            ));
        }
        return Ok(NatsAuth::NKey { seed, from });
    }
    if let Some((token, from)) = inline_or_file(
        "nats.token",
        nats.token.as_ref(),
        "nats.token_file",
        nats.token_file.as_deref(),
    )? {
        return Ok(NatsAuth::Token { token, from });
    }
    let password = inline_or_file(
        "nats.password",
        nats.password.as_ref(),
        "nats.password_file",
        nats.password_file.as_deref(),
    )?;
    match (&nats.user, password) {
        (None, None) => Ok(NatsAuth::None),
        (Some(user), _) if user.trim().is_empty() => {
            Err(ConfigError::invalid("nats.user", "is empty"))
        }
        (Some(user), Some((password, from))) => Ok(NatsAuth::UserPassword {
            user: user.clone(),
            password,
            from,
        }),
        (Some(_), None) => Err(ConfigError::invalid(
            "nats.password",
            "is required with nats.user (or nats.password_file)",
        )),
        (None, Some((_, from))) => Err(ConfigError::invalid(
            "nats.user",
            format!("is required with {from}"),
        )),
    }
}
