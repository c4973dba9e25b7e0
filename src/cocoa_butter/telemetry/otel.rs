//! The OpenTelemetry tracer provider: OTLP over gRPC or HTTP/protobuf,
//! configured by `[tracing]` and the standard `OTEL_*` variables.

use std::path::PathBuf;

use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::resource::EnvResourceDetector;
use opentelemetry_sdk::trace::{SdkTracerProvider, span_processor_with_async_runtime};

use super::TelemetryError;
use super::config::{OtlpProtocol, TracingConfig};

const DEFAULT_SERVICE_NAME: &str = "choco-factory";

fn env(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .filter(|value| !value.trim().is_empty())
}

/// Builds the provider, or `None` when no endpoint is configured or the SDK
/// is disabled (`OTEL_SDK_DISABLED=true`, `OTEL_TRACES_EXPORTER=none`).
pub(super) fn tracer_provider(
    config: &TracingConfig,
) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
    {
        return Ok(None);
    }
    let env_endpoint =
        env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"));
    // The standard variables win over the file, as the specification asks;
    // the exporter reads them itself when given no endpoint.
    let configured = match (&env_endpoint, &config.endpoint) {
        (Some(_), _) => None,
        (None, Some(endpoint)) => Some(endpoint.clone()),
        (None, None) => return Ok(None),
    };
    let protocol = match env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .map(|v| ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", v))
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL").map(|v| ("OTEL_EXPORTER_OTLP_PROTOCOL", v)))
    {
        Some((key, value)) => match value.as_str() {
            "grpc" => OtlpProtocol::Grpc,
            "http/protobuf" => OtlpProtocol::HttpProtobuf,
            other => {
                return Err(TelemetryError::Tracing {
                    key,
                    message: format!("{other:?} is not supported (grpc, http/protobuf)"),
                });
            }
        },
        None => config.protocol.unwrap_or(OtlpProtocol::Grpc),
    };

    let effective = configured.clone().or(env_endpoint).unwrap_or_default();
    let https = effective
        .get(..8)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"));
    let built = match protocol {
        OtlpProtocol::Grpc => {
            let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            if let Some(endpoint) = configured {
                builder = builder.with_endpoint(endpoint);
            }
            if https {
                builder = builder.with_tls_config(client_tls(config)?);
            }
            builder.build()
        }
        // The HTTP exporter runs on a plain hyper client (no TLS stack of
        // its own, so no second one in the build); https goes over gRPC.
        OtlpProtocol::HttpProtobuf if https => {
            return Err(TelemetryError::Tracing {
                key: "tracing.protocol",
                message: format!(
                    "{effective}: https is supported with protocol \"grpc\" only; \
                     http/protobuf is sent in the clear"
                ),
            });
        }
        OtlpProtocol::HttpProtobuf => {
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
            if let Some(endpoint) = configured {
                // Like OTEL_EXPORTER_OTLP_ENDPOINT, the key names the
                // receiver; the traces path is the signal's.
                let base = endpoint.trim_end_matches('/');
                let full = if base.ends_with("/v1/traces") {
                    base.to_string()
                } else {
                    format!("{base}/v1/traces")
                };
                builder = builder.with_endpoint(full);
            }
            builder.build()
        }
    };
    let exporter = built.map_err(|err| TelemetryError::Tracing {
        key: "tracing.endpoint",
        message: err.to_string(),
    })?;

    // Exports on the Tokio runtime rather than on the SDK's own thread,
    // which has no reactor for tonic or hyper to run on.
    let processor = span_processor_with_async_runtime::BatchSpanProcessor::builder(
        exporter,
        opentelemetry_sdk::runtime::Tokio,
    )
    .build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource(config))
            .build(),
    ))
}

/// TLS for an `https://` gRPC endpoint: the CA file of `tracing.ca_file`
/// or the OTLP certificate variables when one is set, else the system's
/// roots (the container image carries Debian's bundle).
fn client_tls(config: &TracingConfig) -> Result<tonic::transport::ClientTlsConfig, TelemetryError> {
    let (key, ca_file) = match env("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE")
        .map(|file| ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", PathBuf::from(file)))
        .or_else(|| {
            env("OTEL_EXPORTER_OTLP_CERTIFICATE")
                .map(|file| ("OTEL_EXPORTER_OTLP_CERTIFICATE", PathBuf::from(file)))
        }) {
        Some(found) => (found.0, Some(found.1)),
        None => ("tracing.ca_file", config.ca_file.clone()),
    };
    let tls = tonic::transport::ClientTlsConfig::new();
    match ca_file {
        None => Ok(tls.with_native_roots()),
        Some(path) => {
            let pem = std::fs::read(&path).map_err(|err| TelemetryError::Tracing {
                key,
                message: format!("cannot read {}: {err}", path.display()),
            })?;
            Ok(tls.ca_certificate(tonic::transport::Certificate::from_pem(pem)))
        }
    }
}

/// service.name (OTEL_SERVICE_NAME > OTEL_RESOURCE_ATTRIBUTES > config >
/// default), service.version and service.instance.id (host and pid, so two
/// replicas on one host differ).
fn resource(config: &TracingConfig) -> Resource {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_else(|| "unknown-host".into());
    let instance = format!("{host}:{}", std::process::id());
    let mut builder = Resource::builder_empty()
        .with_service_name(
            config
                .service_name
                .clone()
                .unwrap_or_else(|| DEFAULT_SERVICE_NAME.into()),
        )
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", instance),
            KeyValue::new("host.name", host),
        ])
        .with_detector(Box::new(EnvResourceDetector::new()));
    if let Some(name) = env("OTEL_SERVICE_NAME") {
        builder = builder.with_service_name(name);
    }
    builder.build()
}
