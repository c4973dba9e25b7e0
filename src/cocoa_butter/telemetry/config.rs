//! Telemetry's section of the configuration: `[log]` and `[tracing]`.
//! Telemetry owns it; `config.rs` layers it in with the rest.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stdout is not a terminal, human-readable when it is.
    Auto,
    Json,
    Pretty,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// An `EnvFilter` directive; `RUST_LOG` wins when set.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Auto,
            filter: "info,async_nats=warn".into(),
        }
    }
}

/// The OTLP protocols the exporter speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OtlpProtocol {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// Where traces go. The standard `OTEL_*` variables apply too and win over
/// these keys, as the OpenTelemetry specification asks of every SDK:
/// `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL`,
/// `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`,
/// `OTEL_SDK_DISABLED`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// OTLP endpoint (`http://collector:4317` for gRPC,
    /// `http://collector:4318` for HTTP). Unset: no export.
    pub endpoint: Option<String>,
    /// Unset: `OTEL_EXPORTER_OTLP_PROTOCOL`, else gRPC.
    pub protocol: Option<OtlpProtocol>,
    /// Unset: `OTEL_SERVICE_NAME`, else `choco-factory`.
    pub service_name: Option<String>,
    /// PEM CA certificate(s) an `https://` endpoint's certificate must chain
    /// to. Unset: `OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE` or
    /// `OTEL_EXPORTER_OTLP_CERTIFICATE`, else the system's trusted roots.
    pub ca_file: Option<PathBuf>,
}
