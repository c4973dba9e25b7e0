//! Loading the configuration for a command, and connecting an operator
//! command to NATS.

use anyhow::Context;

use super::Refused;
use crate::cocoa_butter::config::{ConfigSources, RoomSettings, ValidatedConfig};
use crate::cocoa_butter::{nats, runtime};
use crate::rooms::REGISTRY;

/// The whole configuration, the rooms' own settings checked as `serve`
/// checks them; refused (exit 2) when invalid.
pub(super) fn load(sources: &ConfigSources) -> anyhow::Result<ValidatedConfig> {
    let config = sources.load().map_err(Refused::new)?;
    runtime::check_rooms(&config, REGISTRY).map_err(Refused::new)?;
    Ok(config)
}

/// The configuration an operator command needs: NATS, not the rooms' files.
pub(super) fn load_bus_only(sources: &ConfigSources) -> anyhow::Result<ValidatedConfig> {
    Ok(sources.load().map_err(Refused::new)?)
}

/// The configured room called `name`; an unknown name is a usage error
/// (exit 2) listing the rooms, never an empty answer.
pub(super) fn configured_room<'a>(
    config: &'a ValidatedConfig,
    name: &str,
) -> Result<&'a RoomSettings, Refused> {
    config
        .rooms
        .iter()
        .find(|room| room.name == name)
        .ok_or_else(|| {
            let known: Vec<&str> = config.rooms.iter().map(|r| r.name.as_str()).collect();
            Refused(format!(
                "unknown room {name:?} (rooms: {})",
                known.join(", ")
            ))
        })
}

/// Runs an operator command against NATS: connects once, fails fast.
pub(super) fn with_nats<F, Fut>(config: &ValidatedConfig, command: F) -> anyhow::Result<()>
where
    F: FnOnce(async_nats::Client) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let nats = &config.factory.nats;
    let shown_url = nats.url.redacted();
    runtime.block_on(async move {
        let options = nats::connect_options(nats, &config.nats_auth, &config.nats_tls)
            .await
            .map_err(Refused::new)?;
        let client = match options
            .name("choco-factory-cli")
            .connection_timeout(std::time::Duration::from_secs(5))
            .connect(nats.url.as_slice())
            .await
        {
            Ok(client) => client,
            // Without retries a refused login fails here, at once; say
            // which keys to look at rather than only the server's words.
            Err(err) => {
                let reason = err.to_string();
                return Err(
                    match nats::explain_connect_failure(&reason, &config.nats_auth) {
                        Some(hint) => {
                            anyhow::anyhow!(
                                "cannot connect to NATS at {shown_url}: {hint}: {reason}"
                            )
                        }
                        None => anyhow::anyhow!("cannot connect to NATS at {shown_url}: {reason}"),
                    },
                );
            }
        };
        let result = command(client.clone()).await;
        let _ = client.flush().await;
        result
    })
}

/// Publishes `message` to `subject` and waits until JetStream stored it.
pub(super) async fn publish_stored(
    js: &async_nats::jetstream::Context,
    subject: String,
    message: async_nats::jetstream::message::PublishMessage,
) -> anyhow::Result<async_nats::jetstream::publish::PublishAck> {
    js.send_publish(subject.clone(), message)
        .await
        .with_context(|| format!("publishing to {subject}"))?
        .await
        .with_context(|| format!("no stream stored {subject}"))
}
