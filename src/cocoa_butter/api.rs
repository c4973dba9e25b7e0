//! Helpers every room's HTTP and gRPC APIs share, so errors look the same
//! on every port: HTTP `{"error": {"code", "field", "message",
//! "violations"}}`, gRPC status codes with the field first in the message
//! and every bad field in `google.rpc.BadRequest` details (what grpcurl and
//! every gRPC client library decode).

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tonic::Status;

use serde::de::DeserializeOwned;

/// Header (HTTP) and metadata key (gRPC) carrying a caller's correlation id.
pub const CORRELATION_HEADER: &str = "x-correlation-id";

/// The two protocols every room serves its API over: what the request
/// layers (`serve/requests.rs`, `guard/`) answer and observe by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Grpc,
}

/// A JSON document that does not fit the expected type, with the field at
/// fault when there is one (`"body"` when the whole document is unusable).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct JsonError {
    pub field: String,
    pub message: String,
}

/// Parses JSON and names the offending field: its path for a bad value,
/// its name for a missing one.
pub fn decode_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, JsonError> {
    // Decoded first without tracking the path, which clones every key on
    // the way (a profile of the conch counted eight string clones per
    // input): almost every body is good. Only a failure is decoded again,
    // tracked, to name its field.
    let plain = match serde_json::from_slice(bytes) {
        Ok(value) => return Ok(value),
        Err(err) => err,
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let tracked = match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Err(err) => err,
        // A value followed by something else: refused as a whole.
        Ok(_) => {
            return Err(JsonError {
                field: "body".to_string(),
                message: plain.to_string(),
            });
        }
    };
    let path = tracked.path().to_string();
    let message = tracked.into_inner().to_string();
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
        .map(str::to_string);
    let field = match (missing, path.as_str()) {
        (Some(name), "." | "") => name,
        (Some(name), parent) => format!("{parent}.{name}"),
        (None, "." | "") => "body".to_string(),
        (None, path) => path.to_string(),
    };
    Err(JsonError { field, message })
}

pub fn http_error(status: StatusCode, code: &str, field: Option<&str>, message: &str) -> Response {
    let body = json!({ "error": { "code": code, "field": field, "message": message } });
    (status, axum::Json(body)).into_response()
}

/// 400 naming the field.
pub fn bad_request(field: &str, message: &str) -> Response {
    http_error(
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        Some(field),
        message,
    )
}

impl IntoResponse for JsonError {
    fn into_response(self) -> Response {
        bad_request(&self.field, &self.to_string())
    }
}

/// A request field that is unusable, as a room's own checks find it: the
/// field is one of the room's names, so `&'static str`. Answered as a
/// [`FieldViolation`] (`ApiError::field` over both protocols; a
/// `payload_invalid` dead letter on the event path).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        FieldError {
            field,
            message: message.into(),
        }
    }
}

impl From<FieldError> for FieldViolation {
    fn from(err: FieldError) -> Self {
        FieldViolation::new(err.field, err.message)
    }
}

/// One bad field of a request and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub message: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldViolation {
            field: field.into(),
            message: message.into(),
        }
    }

    /// `field: message`, unless the message already starts with the field.
    pub fn text(&self) -> String {
        if self.message.starts_with(&self.field) {
            self.message.clone()
        } else {
            format!("{}: {}", self.field, self.message)
        }
    }
}

/// INVALID_ARGUMENT naming the field.
pub fn invalid_argument(field: &str, message: &str) -> Status {
    invalid_arguments(&[FieldViolation::new(field, message)])
}

/// INVALID_ARGUMENT naming every bad field: each one in the message (the
/// first leading it) and as a `google.rpc.BadRequest` field violation.
pub fn invalid_arguments(violations: &[FieldViolation]) -> Status {
    use tonic_types::{ErrorDetails, StatusExt};
    let text = violations
        .iter()
        .map(FieldViolation::text)
        .collect::<Vec<_>>()
        .join("; ");
    let details = ErrorDetails::with_bad_request(
        violations
            .iter()
            .map(|v| tonic_types::FieldViolation::new(&v.field, &v.message))
            .collect::<Vec<_>>(),
    );
    Status::with_error_details(tonic::Code::InvalidArgument, text, details)
}

/// 400 naming every bad field: the first in `field`, all in `violations`.
pub fn bad_request_fields(violations: &[FieldViolation]) -> Response {
    let text = violations
        .iter()
        .map(FieldViolation::text)
        .collect::<Vec<_>>()
        .join("; ");
    let body = json!({ "error": {
        "code": "invalid_argument",
        "field": violations.first().map(|v| v.field.as_str()),
        "message": text,
        "violations": violations
            .iter()
            .map(|v| json!({ "field": v.field, "message": v.message }))
            .collect::<Vec<_>>(),
    }});
    (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
}

pub fn correlation_http(headers: &HeaderMap) -> Option<String> {
    headers
        .get(CORRELATION_HEADER)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string)
}

pub fn correlation_grpc(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get(CORRELATION_HEADER)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string)
}

/// `google.protobuf.Value` → JSON. Numbers arrive as doubles; whole ones
/// become integers again so `3` round-trips as `3`, not `3.0`.
pub fn json_from_pb(value: prost_types::Value) -> Value {
    use prost_types::value::Kind;
    match value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
                Value::from(n as i64)
            } else {
                serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)
            }
        }
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::ListValue(list)) => {
            Value::Array(list.values.into_iter().map(json_from_pb).collect())
        }
        Some(Kind::StructValue(object)) => Value::Object(
            object
                .fields
                .into_iter()
                .map(|(key, value)| (key, json_from_pb(value)))
                .collect(),
        ),
    }
}

pub fn json_to_pb(value: &Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(json_to_pb).collect(),
        }),
        Value::Object(object) => Kind::StructValue(prost_types::Struct {
            fields: object
                .iter()
                .map(|(key, value)| (key.clone(), json_to_pb(value)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// `google.protobuf.Struct` → a JSON object.
pub fn struct_from_pb(value: prost_types::Struct) -> Value {
    Value::Object(
        value
            .fields
            .into_iter()
            .map(|(key, value)| (key, json_from_pb(value)))
            .collect(),
    )
}

/// `blockId` → `block_id`: the snake_case spelling of a camelCase name
/// (a gRPC field, a serde alias of a camelCase field).
pub fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Outer {
        name: String,
        inner: Inner,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        count: u32,
    }

    #[test]
    fn decode_json_names_the_field_of_a_failure_and_refuses_trailing_bytes() {
        let good: Outer = super::decode_json(br#"{"name":"a","inner":{"count":2}}"#).expect("good");
        assert_eq!(good.inner.count, 2);
        let field = |body: &[u8]| {
            super::decode_json::<Outer>(body)
                .expect_err("refused")
                .field
        };
        assert_eq!(
            field(br#"{"name":"a","inner":{"count":"x"}}"#),
            "inner.count"
        );
        assert_eq!(field(br#"{"name":"a","inner":{}}"#), "inner.count");
        assert_eq!(field(br#"{"inner":{"count":1}}"#), "name");
        assert_eq!(
            field(br#"{"name":"a","inner":{"count":1}} trailing"#),
            "body"
        );
        assert_eq!(field(b"not json"), "body");
    }

    use super::*;

    #[test]
    fn json_round_trips_through_protobuf_values() {
        let value = json!({"n": 3, "f": 1.5, "s": "x", "a": [true, null], "o": {}});
        assert_eq!(json_from_pb(json_to_pb(&value)), value);
    }
}
