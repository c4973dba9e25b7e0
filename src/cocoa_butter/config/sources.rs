//! Where the configuration comes from, later wins: built-in defaults, the
//! port table, an optional file, `CHOCO_` variables (secrets among them),
//! command-line flags; figment merges them and remembers each value's
//! origin for `config show`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};

use crate::cocoa_butter::telemetry::config::LogFormat;

use super::*;

/// Command-line values that sit on top of every other layer.
#[derive(Debug, Clone, Default)]
pub struct CliOverrides {
    pub nats_url: Option<String>,
    pub bind: Option<IpAddr>,
    pub log_format: Option<LogFormat>,
    /// `--rooms conch,winnower`: run exactly these rooms.
    pub only_rooms: Option<Vec<String>>,
}

/// Where to read the layers from.
#[derive(Debug, Clone, Default)]
pub struct ConfigSources {
    /// `--rooms-file`; when absent, `rooms.toml` in the working directory if
    /// it exists, else the built-in table.
    pub rooms_file: Option<PathBuf>,
    /// `--config`
    pub config_file: Option<PathBuf>,
    pub cli: CliOverrides,
}

/// A provider that renames another one, so `config show` can say
/// "built-in port table" instead of "TOML source string".
pub(super) struct Named<P> {
    name: &'static str,
    inner: P,
}

impl<P: Provider> Provider for Named<P> {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        self.inner.data()
    }
}

/// The secret keys that may come from the environment, as
/// (variable after `CHOCO_`, key path).
pub(super) const SECRET_ENV: &[(&str, [&str; 2])] = &[
    ("NATS__NKEY_SEED", ["nats", "nkey_seed"]),
    ("NATS__TOKEN", ["nats", "token"]),
    ("NATS__PASSWORD", ["nats", "password"]),
];

/// `CHOCO_NATS__TOKEN` and the other secret variables, as plain strings.
pub(super) struct SecretEnv;

impl Provider for SecretEnv {
    fn metadata(&self) -> Metadata {
        // "environment" in the name: `config show` then names the variable.
        Metadata::named("`CHOCO_` environment variable(s)")
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut root = Dict::new();
        for (var, [section, key]) in SECRET_ENV {
            let Some(value) = std::env::var_os(format!("CHOCO_{var}")) else {
                continue;
            };
            let Some(value) = value.to_str() else {
                return Err(figment::Error::from(format!(
                    "CHOCO_{var}: the value is not valid UTF-8"
                )));
            };
            let entry = root
                .entry(section.to_string())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, dict) = entry {
                dict.insert(key.to_string(), Value::from(value.to_string()));
            }
        }
        Ok(Profile::Default.collect(root))
    }
}

impl ConfigSources {
    /// Stacks every layer in order. Files that were asked for by name must exist.
    pub fn figment(&self) -> Result<Figment, ConfigError> {
        let mut figment = Figment::new().merge(Named {
            name: "built-in default",
            inner: Serialized::defaults(FactoryConfig::default()),
        });

        match &self.rooms_file {
            Some(path) => {
                ensure_readable("--rooms-file", path)?;
                figment = figment.merge(Toml::file_exact(path));
            }
            None if Path::new(DEFAULT_ROOMS_FILE).is_file() => {
                figment = figment.merge(Toml::file_exact(DEFAULT_ROOMS_FILE));
            }
            None => {
                figment = figment.merge(Named {
                    name: "built-in port table (rooms.toml)",
                    inner: Toml::string(BUILTIN_ROOMS_TOML),
                });
            }
        }

        if let Some(path) = &self.config_file {
            ensure_readable("--config", path)?;
            figment = figment.merge(Toml::file_exact(path));
        }

        // CHOCO_CONFIG and CHOCO_ROOMS_FILE name files (read by clap), not
        // keys. Secrets are taken verbatim by `SecretEnv`: figment would
        // parse `CHOCO_NATS__TOKEN=0123` as a number (losing the zero) and
        // `[x]` as an array.
        let mut ignored = vec!["CONFIG", "ROOMS_FILE"];
        ignored.extend(SECRET_ENV.iter().map(|(var, _)| *var));
        figment = figment
            .merge(Env::prefixed("CHOCO_").ignore(&ignored).split("__"))
            .merge(SecretEnv);

        let cli = &self.cli;
        if let Some(url) = &cli.nats_url {
            figment = figment.merge(Serialized::default("nats.url", url));
        }
        if let Some(bind) = &cli.bind {
            figment = figment.merge(Serialized::default("bind", bind));
        }
        if let Some(format) = &cli.log_format {
            figment = figment.merge(Serialized::default("log.format", format));
        }
        Ok(figment)
    }

    pub fn load(&self) -> Result<ValidatedConfig, ConfigError> {
        let figment = self.figment()?;
        let factory: FactoryConfig = figment.extract()?;
        let mut config = validate(factory, self.cli.only_rooms.as_deref())?;
        let base_dir = self
            .rooms_file
            .as_deref()
            .and_then(Path::parent)
            .filter(|dir| !dir.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        for room in &mut config.rooms {
            room.base_dir = base_dir.clone();
        }
        Ok(config)
    }
}

pub(super) fn ensure_readable(key: &'static str, path: &Path) -> Result<(), ConfigError> {
    std::fs::metadata(path)
        .and_then(|meta| {
            if meta.is_file() {
                Ok(())
            } else {
                Err(std::io::Error::other("not a regular file"))
            }
        })
        .map_err(|err| ConfigError::Unreadable {
            key,
            path: path.to_path_buf(),
            reason: err.to_string(),
        })
}
