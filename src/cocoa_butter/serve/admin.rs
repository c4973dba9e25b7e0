//! Each room's operator routes, next to `/info` on its HTTP port: pause and
//! resume (the room's entry in `choco_control`, see `control.rs`) and its
//! dead letters (the work of `dlq.rs`, scoped to this room), mirroring the
//! CLI's `room` and `dlq` commands.
//!
//! ```text
//! POST /admin/pause   {"reason"?}          POST /admin/resume
//! GET  /admin/dlq?reason=&since=           GET  /admin/dlq/{sequence}
//! POST /admin/dlq/replay {"sequences"?, "reason"?, "since"?, "dry_run"?}
//! POST /admin/dlq/purge  {"sequences"?, "reason"?, "since"?, "confirm": true}
//! ```
//!
//! Bad input is 400 naming the field, an unknown sequence 404.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

use crate::cocoa_butter::api;
use crate::cocoa_butter::api::{JsonError, decode_json};
use crate::cocoa_butter::control::{Control, ControlError, Desired};
use crate::cocoa_butter::dlq::{self, DeadLetters, DlqError, DlqFilter};
use crate::cocoa_butter::status::{RoomInfo, RoomState};

/// How long a pause or resume route waits for this process to follow the
/// bucket before answering (`applied` says whether it did).
const APPLY_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct Admin {
    room: String,
    state: Arc<RoomState>,
}

/// The operator routes of one room. Generic over the outer router's state
/// so that `http_router` merges it in one line.
pub fn router<S>(info: &RoomInfo, state: &Arc<RoomState>) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/admin/pause", post(pause))
        .route("/admin/resume", post(resume))
        .route("/admin/dlq", get(list))
        .route("/admin/dlq/{sequence}", get(show))
        .route("/admin/dlq/replay", post(replay))
        .route("/admin/dlq/purge", post(purge))
        .with_state(Admin {
            room: info.room.clone(),
            state: state.clone(),
        })
}

/// How long `/info` waits for the server to count dead letters before it
/// shows the sampled count: `/info` is what people look at when something
/// is wrong, so it must not hang on NATS.
const COUNT_WAIT: Duration = Duration::from_secs(1);

/// Adds the room's run state to its `/info`: paused (and what the operator
/// asked), dead letters and the last error. The dead letters are counted on
/// the server when it answers in time, else the last sampled count is shown
/// with `"dead_letters_sampled": true`.
pub async fn add_run_state(body: &mut serde_json::Value, room: &str, state: &RoomState) {
    let counted = if state.nats_connected() {
        tokio::time::timeout(
            COUNT_WAIT.min(state.nats_config().request_timeout),
            dlq::count_for_room(state.jetstream(), state.nats_config(), room),
        )
        .await
        .ok()
        .and_then(Result::ok)
    } else {
        None
    };
    let (dead_letters, sampled) = match counted {
        Some(count) => (count, false),
        None => (state.dead_letters(), true),
    };
    body["paused"] = json!(state.paused());
    body["desired"] = json!(state.desired());
    body["dead_letters"] = json!(dead_letters);
    if sampled {
        body["dead_letters_sampled"] = json!(true);
    }
    body["last_error"] = json!(state.last_error());
}

/// Why an operator request was refused; each is one HTTP answer.
#[derive(Debug, thiserror::Error)]
enum Refused {
    /// 400 naming the field.
    #[error("{field}: {message}")]
    Field { field: String, message: String },
    #[error(transparent)]
    Json(#[from] JsonError),
    #[error(transparent)]
    Dlq(#[from] DlqError),
    #[error(transparent)]
    Control(#[from] ControlError),
}

fn field(field: &str, message: impl Into<String>) -> Refused {
    Refused::Field {
        field: field.to_string(),
        message: message.into(),
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let message = self.to_string();
        match self {
            Refused::Field { field, message } => api::bad_request(&field, &message),
            Refused::Json(err) => err.into_response(),
            Refused::Dlq(DlqError::NotFound(_) | DlqError::OtherRoom { .. }) => api::http_error(
                StatusCode::NOT_FOUND,
                "not_found",
                Some("sequence"),
                &message,
            ),
            Refused::Dlq(DlqError::NotReplayable { .. }) => api::http_error(
                StatusCode::CONFLICT,
                "not_replayable",
                Some("sequence"),
                &message,
            ),
            Refused::Dlq(DlqError::Bus(_)) | Refused::Control(_) => api::http_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                None,
                &message,
            ),
        }
    }
}

type Answer = Result<axum::Json<serde_json::Value>, Refused>;

/// A JSON object body, where an empty body means `{}`.
fn body_or_empty<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Refused> {
    let bytes: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    Ok(decode_json(bytes)?)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PauseBody {
    reason: Option<String>,
}

async fn pause(State(admin): State<Admin>, body: Bytes) -> Answer {
    let body: PauseBody = body_or_empty(&body)?;
    set_desired(admin, Desired::new(true, body.reason, "http")).await
}

async fn resume(State(admin): State<Admin>, body: Bytes) -> Answer {
    let body: PauseBody = body_or_empty(&body)?;
    set_desired(admin, Desired::new(false, body.reason, "http")).await
}

/// Writes the room's desired state for every replica, then waits a moment
/// for this process to follow it, so that an answer with `"applied": true`
/// means it applies here already.
async fn set_desired(admin: Admin, desired: Desired) -> Answer {
    let control = Control::new(
        admin.state.jetstream().clone(),
        admin.state.bucket_storage().clone(),
    );
    control.open().await?;
    control.set(&admin.room, &desired).await?;
    let paused = desired.paused;
    let mut watching = admin.state.watch_desired();
    let applied = tokio::time::timeout(APPLY_WAIT, watching.wait_for(|d| d.paused == paused))
        .await
        .is_ok_and(|seen| seen.is_ok());
    Ok(axum::Json(json!({
        "room": admin.room,
        "paused": paused,
        "applied": applied,
        "desired": desired,
    })))
}

/// The filter of a request: always this room, plus `reason` and `since`.
fn filter(room: &str, reason: Option<String>, since: Option<&str>) -> Result<DlqFilter, Refused> {
    let since = match since {
        Some(text) => Some(humantime::parse_duration(text).map_err(|err| {
            field(
                "since",
                format!("expected a duration like 1h or 30m: {err}"),
            )
        })?),
        None => None,
    };
    if reason.as_deref() == Some("") {
        return Err(field("reason", "must not be empty"));
    }
    Ok(DlqFilter {
        room: Some(room.to_string()),
        reason,
        since,
    })
}

type QueryParams = Result<Query<HashMap<String, String>>, QueryRejection>;

/// The query's parameters, each of them one of `allowed`.
fn query_params(query: QueryParams, allowed: &[&str]) -> Result<HashMap<String, String>, Refused> {
    let Query(params) = query.map_err(|err| field("query", err.body_text()))?;
    if let Some(unknown) = params.keys().find(|key| !allowed.contains(&key.as_str())) {
        return Err(field(
            unknown,
            format!("unknown query parameter (known: {})", allowed.join(", ")),
        ));
    }
    Ok(params)
}

async fn open_letters(state: &RoomState) -> Result<DeadLetters, Refused> {
    Ok(DeadLetters::open(
        state.jetstream().clone(),
        state.nats_config().clone(),
        state.bucket_storage().clone(),
    )
    .await?)
}

async fn list(State(admin): State<Admin>, query: QueryParams) -> Answer {
    let mut params = query_params(query, &["reason", "since"])?;
    let since = params.remove("since");
    let filter = filter(&admin.room, params.remove("reason"), since.as_deref())?;
    let records = open_letters(&admin.state).await?.list(&filter).await?;
    Ok(axum::Json(json!({
        "room": admin.room,
        "count": records.len(),
        "dead_letters": records,
    })))
}

async fn show(State(admin): State<Admin>, Path(sequence): Path<String>) -> Answer {
    let sequence: u64 = sequence
        .parse()
        .map_err(|_| field("sequence", "expected a stream sequence number"))?;
    let only_this_room = DlqFilter {
        room: Some(admin.room.clone()),
        ..DlqFilter::default()
    };
    let records = open_letters(&admin.state)
        .await?
        .select(&[sequence], &only_this_room)
        .await?;
    let record = records.first().ok_or(DlqError::NotFound(sequence))?;
    Ok(axum::Json(
        json!({ "dead_letter": record, "body": record.decoded() }),
    ))
}

/// Which dead letters a replay or purge applies to.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Selection {
    #[serde(default)]
    sequences: Vec<u64>,
    reason: Option<String>,
    since: Option<String>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    confirm: bool,
}

async fn selected(
    admin: &Admin,
    selection: &Selection,
) -> Result<(DeadLetters, Vec<dlq::DeadLetterRecord>), Refused> {
    let filter = filter(
        &admin.room,
        selection.reason.clone(),
        selection.since.as_deref(),
    )?;
    let letters = open_letters(&admin.state).await?;
    let records = letters.select(&selection.sequences, &filter).await?;
    Ok((letters, records))
}

async fn replay(State(admin): State<Admin>, body: Bytes) -> Answer {
    let selection: Selection = body_or_empty(&body)?;
    if selection.confirm {
        return Err(field("confirm", "only a purge takes confirm"));
    }
    let (letters, records) = selected(&admin, &selection).await?;
    if selection.dry_run {
        let would: Vec<_> = records
            .iter()
            .map(|r| json!({ "sequence": r.sequence, "subject": r.original_subject }))
            .collect();
        return Ok(axum::Json(
            json!({ "dry_run": true, "count": would.len(), "dead_letters": would }),
        ));
    }
    let replayed = letters.replay_all(&records, |_| {}).await?;
    Ok(axum::Json(json!({
        "dry_run": false,
        "count": replayed.len(),
        "dead_letters": replayed,
    })))
}

async fn purge(State(admin): State<Admin>, query: QueryParams, body: Bytes) -> Answer {
    let mut selection: Selection = body_or_empty(&body)?;
    // `?confirm=true` counts as much as `"confirm": true` in the body.
    match query_params(query, &["confirm"])?
        .get("confirm")
        .map(String::as_str)
    {
        Some("true") => selection.confirm = true,
        Some("false") | None => {}
        Some(_) => return Err(field("confirm", "expected true or false")),
    }
    if selection.dry_run {
        return Err(field("dry_run", "a purge has no dry run; list first"));
    }
    if !selection.confirm {
        return Err(field(
            "confirm",
            "a purge deletes dead letters for good: send \"confirm\": true",
        ));
    }
    let (letters, records) = selected(&admin, &selection).await?;
    let mut purged = Vec::with_capacity(records.len());
    let count = letters
        .purge_all(&records, |sequence| purged.push(sequence))
        .await?;
    Ok(axum::Json(json!({ "count": count, "sequences": purged })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_since_names_the_field() {
        let Err(refused) = filter("conch", None, Some("soon")) else {
            panic!("accepted");
        };
        assert!(refused.to_string().starts_with("since:"), "{refused}");
        assert_eq!(refused.into_response().status(), StatusCode::BAD_REQUEST);
    }
}
