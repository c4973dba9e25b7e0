//! NATS service discovery per room (`$SRV.PING|INFO|STATS`), its stats
//! from the room's state and metrics.

use futures::StreamExt;
use tracing::Instrument;

use crate::cocoa_butter::consumer::Engine;
use crate::cocoa_butter::metrics::RoomMetrics;
use crate::cocoa_butter::status::RoomState;

/// What the room says about itself to NATS service discovery: the `data` of
/// its endpoint in `$SRV.STATS`, and the reply of that endpoint. Built from
/// what the runtime already keeps (the sampled gauges, the room's state),
/// because the stats handler runs inside the discovery task and must not
/// wait on the server.
pub(super) fn discovery_data(state: &RoomState, metrics: &RoomMetrics) -> serde_json::Value {
    serde_json::json!({
        "pending": metrics.consumer_pending.get(),
        "ack_pending": metrics.consumer_ack_pending.get(),
        "redeliveries": metrics.consumer_redelivered.get(),
        "dead_letters": state.dead_letters(),
        "paused": state.paused(),
        "ready": state.ready(),
        "last_error": state.last_error(),
    })
}

/// Registers the room with the NATS micro protocol, so `nats micro ls` and
/// `$SRV.PING` list it with its label, domain, stream and consumer.
pub(super) async fn announce(
    engine: &Engine,
) -> Result<async_nats::service::Service, async_nats::Error> {
    use async_nats::service::ServiceExt;
    let settings = &engine.settings;
    let metadata = [
        ("room", settings.name.as_str()),
        ("factory.room", settings.label.as_str()),
        ("domain", settings.domain.as_str()),
        ("subject_prefix", settings.subject_prefix.as_str()),
        ("stream", settings.stream.as_str()),
        ("consumer", settings.durable_name.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let (state, metrics) = (engine.state.clone(), engine.metrics.clone());
    let service = engine
        .js
        .client()
        .service_builder()
        .description(format!("{} ({})", settings.service, settings.label))
        .metadata(metadata)
        .stats_handler(move |_endpoint, _stats| discovery_data(&state, &metrics))
        .start(settings.service.clone(), env!("CARGO_PKG_VERSION"))
        .await?;
    // `$SRV.STATS` reports custom data per endpoint, so the room has one:
    // `choco.factory.<room>.status` answers with the same data on request.
    let mut status = service
        .endpoint_builder()
        .name("status")
        .add(format!("choco.factory.{}.status", settings.name))
        .await?;
    let (state, metrics) = (engine.state.clone(), engine.metrics.clone());
    tokio::spawn(
        async move {
            while let Some(request) = status.next().await {
                let body = discovery_data(&state, &metrics).to_string();
                if let Err(err) = request.respond(Ok(body.into())).await {
                    tracing::debug!(error = %err, "cannot answer a status request");
                }
            }
        }
        .instrument(tracing::Span::current()),
    );
    Ok(service)
}
