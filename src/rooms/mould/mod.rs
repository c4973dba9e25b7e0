//! the-mould, the Moulding Room (domain `hydration`): gives documents their
//! final shape for the edge.
//!
//! `hydration.requested` `{document_id, source, data, format}` is rendered
//! by `render.rs` (Jinja placeholders, smartblocks from the template
//! library under `config/templates/`, Markdown → sanitized HTML), stored in
//! a JetStream object store keyed by document, and announced with
//! `hydration.completed`. A template error is the author's, not a poison
//! message: it is announced with `hydration.failed` and acknowledged.

mod api;
pub mod render;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::object_store::{self, ObjectMetadata};
use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

pub use api::pb;
use render::{Format, Limits, RenderError, Renderer};

use crate::cocoa_butter::kit::content_hash;
use crate::cocoa_butter::kit::keys::id_too_long;
use crate::cocoa_butter::kit::{
    Action, EventContract, Payload, RoomSettings, reason, room_actions,
};
use crate::cocoa_butter::kit::{
    GrpcService, HandleError, InboundEvent, ObjectBucket, Outbound, Room, RoomContext, RoomError,
    RoomSpec,
};

pub const SPEC: RoomSpec = RoomSpec {
    name: "mould",
    check: |settings| Loaded::load(settings).map(|_| ()),
    build: |ctx| Ok(Arc::new(Mould::new(ctx)?)),
    defaults: || serde_json::to_value(MouldSettings::default()).unwrap_or_default(),
    contracts: || {
        vec![
            EventContract::input::<HydrationRequest>(
                Input::Requested,
                "render a document's template with its data into an artifact",
            ),
            EventContract::output::<HydrationCompleted>(
                Output::Completed,
                "the artifact was rendered and stored",
            ),
            EventContract::output::<HydrationFailed>(
                Output::Failed,
                "the template could not be rendered",
            ),
        ]
    },
};

room_actions! {
    /// What the Moulding Room consumes.
    enum Input: inputs {
        Requested = "requested",
    }
}

room_actions! {
    /// What the Moulding Room publishes.
    enum Output: outputs {
        Completed = "completed",
        Failed = "failed",
    }
}

/// `rooms.mould.settings`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
struct MouldSettings {
    /// One `<slug>.md.j2` per smartblock; relative to the working directory.
    templates_dir: PathBuf,
    /// Object store bucket for artifacts.
    bucket: String,
    max_source_bytes: usize,
    max_output_bytes: usize,
    /// Template instructions one rendering may execute (bounds loops).
    fuel: u64,
    /// Template recursion depth (includes, macros, nesting).
    recursion_limit: usize,
    #[serde(with = "humantime_serde")]
    render_timeout: Duration,
}

impl Default for MouldSettings {
    fn default() -> Self {
        MouldSettings {
            templates_dir: "config/templates".into(),
            bucket: "choco_hydrated".into(),
            max_source_bytes: 1024 * 1024,
            max_output_bytes: 8 * 1024 * 1024,
            fuel: 1_000_000,
            recursion_limit: 64,
            render_timeout: Duration::from_secs(2),
        }
    }
}

struct Loaded {
    settings: MouldSettings,
    renderer: Renderer,
}

impl Loaded {
    fn load(room: &RoomSettings) -> Result<Self, RoomError> {
        let invalid = |field: &str, message: String| room.settings_error(field, message);
        let settings: MouldSettings = room.room_settings()?;
        for (field, zero) in [
            ("max_source_bytes", settings.max_source_bytes == 0),
            ("max_output_bytes", settings.max_output_bytes == 0),
            ("fuel", settings.fuel == 0),
            ("recursion_limit", settings.recursion_limit == 0),
            ("render_timeout", settings.render_timeout.is_zero()),
        ] {
            if zero {
                return Err(invalid(field, "must be greater than zero".into()));
            }
        }
        let dir = &room.resolve_path(&settings.templates_dir);
        let entries = std::fs::read_dir(dir).map_err(|err| {
            invalid(
                "templates_dir",
                format!("cannot read {}: {err}", dir.display()),
            )
        })?;
        let mut library = BTreeMap::new();
        for entry in entries {
            let path = entry
                .map_err(|err| invalid("templates_dir", err.to_string()))?
                .path();
            let Some(slug) = path
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| name.strip_suffix(".md.j2"))
            else {
                continue;
            };
            let source = std::fs::read_to_string(&path)
                .map_err(|err| invalid("templates_dir", format!("{}: {err}", path.display())))?;
            library.insert(slug.to_string(), source);
        }
        let renderer = Renderer::new(
            library,
            Limits {
                fuel: settings.fuel,
                recursion: settings.recursion_limit,
                max_output_bytes: settings.max_output_bytes,
            },
        )
        .map_err(|err| invalid("templates_dir", format!("{}: {err}", dir.display())))?;
        Ok(Loaded { settings, renderer })
    }
}

/// The payload of `hydration.requested`, and the body of `Hydrate`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct HydrationRequest {
    pub document_id: String,
    /// The template source (minijinja).
    pub source: String,
    #[serde(default)]
    pub data: Value,
    /// `html` or `markdown`.
    pub format: String,
}

impl Payload for HydrationRequest {}

/// `hydration.completed`: the rendered artifact and where it is stored.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct HydrationCompleted {
    pub document_id: String,
    pub format: Format,
    pub artifact: ArtifactRef,
}

impl Payload for HydrationCompleted {}

/// `hydration.failed`: the template could not be rendered (never retried).
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct HydrationFailed {
    pub document_id: String,
    pub error: RenderError,
}

impl Payload for HydrationFailed {}

/// Where an artifact is.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct ArtifactRef {
    pub bucket: String,
    pub key: String,
    pub size: u64,
    pub content_hash: String,
}

/// A rendered, stored document.
#[derive(Debug, Clone)]
pub struct Hydrated {
    pub document_id: String,
    pub format: Format,
    pub content_type: &'static str,
    pub content: Vec<u8>,
    pub artifact: ArtifactRef,
}

/// Why a hydration did not produce an artifact.
#[derive(Debug, thiserror::Error)]
pub enum HydrateError {
    /// The request itself is malformed (not the document): names the field.
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// The document could not be rendered.
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error(transparent)]
    Unavailable(HandleError),
}

pub struct Mould {
    settings: MouldSettings,
    renderer: Arc<Renderer>,
    artifacts: ObjectBucket,
}

impl Mould {
    fn new(ctx: RoomContext) -> Result<Self, RoomError> {
        let loaded = Loaded::load(&ctx.settings)?;
        let artifacts = ctx.object_bucket(
            &loaded.settings.bucket,
            "the-mould: hydrated documents, keyed by document id",
        );
        Ok(Mould {
            settings: loaded.settings,
            renderer: Arc::new(loaded.renderer),
            artifacts,
        })
    }

    pub fn bucket(&self) -> &str {
        self.artifacts.name()
    }

    pub fn template_slugs(&self) -> &[String] {
        self.renderer.slugs()
    }

    /// Renders and stores one document: the path of the event and the APIs.
    pub async fn hydrate(&self, request: HydrationRequest) -> Result<Hydrated, HydrateError> {
        if request.document_id.trim().is_empty() {
            return Err(HydrateError::Invalid {
                field: "document_id",
                message: "must not be empty".into(),
            });
        }
        // The document id names the artifact in the object store.
        if let Some(message) = id_too_long(&request.document_id) {
            return Err(HydrateError::Invalid {
                field: "document_id",
                message,
            });
        }
        let Some(format) = Format::parse(&request.format) else {
            return Err(HydrateError::Invalid {
                field: "format",
                message: format!(
                    "{:?} is not supported: use html or markdown",
                    request.format
                ),
            });
        };
        let data = match request.data {
            Value::Null => json!({}),
            Value::Object(map) => Value::Object(map),
            _ => {
                return Err(HydrateError::Invalid {
                    field: "data",
                    message: "must be a JSON object".into(),
                });
            }
        };
        if request.source.len() > self.settings.max_source_bytes {
            return Err(RenderError::new(
                "source_too_large",
                format!(
                    "the source is {} bytes, more than the {} allowed",
                    request.source.len(),
                    self.settings.max_source_bytes
                ),
                None,
            )
            .into());
        }
        // Rendering is CPU work: off the async workers, and bounded in time
        // (fuel bounds the work itself, so a timed-out render still ends).
        let renderer = self.renderer.clone();
        let source = request.source;
        let rendering =
            tokio::task::spawn_blocking(move || renderer.render(&source, &data, format));
        let rendered = match tokio::time::timeout(self.settings.render_timeout, rendering).await {
            Err(_) => {
                return Err(RenderError::new(
                    "render_timeout",
                    format!(
                        "rendering took longer than {:?}",
                        self.settings.render_timeout
                    ),
                    None,
                )
                .into());
            }
            Ok(Err(join)) => {
                return Err(RenderError::new(
                    "render_error",
                    format!("the renderer failed: {join}"),
                    None,
                )
                .into());
            }
            Ok(Ok(result)) => result?,
        };
        let artifact = self
            .store(&request.document_id, format, &rendered.content)
            .await
            .map_err(HydrateError::Unavailable)?;
        Ok(Hydrated {
            document_id: request.document_id,
            format,
            content_type: rendered.content_type,
            content: rendered.content,
            artifact,
        })
    }

    /// Stores the artifact unless the same bytes are already there.
    async fn store(
        &self,
        document_id: &str,
        format: Format,
        content: &[u8],
    ) -> Result<ArtifactRef, HandleError> {
        let store = self.artifacts.store()?;
        let hash = content_hash(content);
        let artifact = ArtifactRef {
            bucket: self.artifacts.name().to_string(),
            key: document_id.to_string(),
            size: content.len() as u64,
            content_hash: hash.clone(),
        };
        if let Ok(info) = store.info(document_id).await
            && !info.deleted
            && info.metadata.get("content_hash") == Some(&hash)
        {
            return Ok(artifact);
        }
        let metadata = ObjectMetadata {
            name: document_id.to_string(),
            description: Some(format!("{} artifact of {document_id}", format.as_str())),
            metadata: [
                ("content_hash".to_string(), hash),
                ("format".to_string(), format.as_str().to_string()),
                (
                    "content_type".to_string(),
                    format.content_type().to_string(),
                ),
            ]
            .into(),
            ..Default::default()
        };
        let mut reader = content;
        store
            .put(metadata, &mut reader)
            .await
            .map_err(HandleError::bus)?;
        Ok(artifact)
    }

    /// The stored artifact of a document, if any.
    pub async fn artifact(
        &self,
        document_id: &str,
    ) -> Result<Option<(Vec<u8>, BTreeMap<String, String>)>, HandleError> {
        let store = self.artifacts.store()?;
        let mut object = match store.get(document_id).await {
            Ok(object) => object,
            Err(err) if err.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(HandleError::bus(err)),
        };
        let metadata: BTreeMap<String, String> = object.info.metadata.clone().into_iter().collect();
        let mut content = Vec::with_capacity(object.info.size);
        object
            .read_to_end(&mut content)
            .await
            .map_err(HandleError::bus)?;
        Ok(Some((content, metadata)))
    }
}

#[async_trait]
impl Room for Mould {
    fn inputs(&self) -> &'static [&'static str] {
        Input::ALL
    }

    fn outputs(&self) -> &'static [&'static str] {
        Output::ALL
    }

    async fn prepare(&self) -> Result<(), RoomError> {
        Ok(self.artifacts.open().await?)
    }

    async fn handle(&self, event: &InboundEvent) -> Result<Vec<Outbound>, HandleError> {
        match event.input::<Input>()? {
            Input::Requested => self.handle_requested(event).await,
        }
    }

    fn http_routes(self: Arc<Self>) -> axum::Router {
        api::http_routes(self)
    }

    fn grpc_service(self: Arc<Self>) -> GrpcService {
        api::grpc_service(self)
    }
}

impl Mould {
    async fn handle_requested(&self, event: &InboundEvent) -> Result<Vec<Outbound>, HandleError> {
        let request: HydrationRequest = event.payload()?;
        let document_id = request.document_id.clone();
        match self.hydrate(request).await {
            Ok(hydrated) => Ok(vec![Outbound::new(
                Output::Completed,
                &document_id,
                HydrationCompleted {
                    document_id: hydrated.document_id,
                    format: hydrated.format,
                    artifact: hydrated.artifact,
                },
            )]),
            Err(HydrateError::Render(error)) => Ok(vec![Outbound::new(
                Output::Failed,
                &document_id,
                HydrationFailed {
                    document_id: document_id.clone(),
                    error,
                },
            )]),
            Err(err @ HydrateError::Invalid { .. }) => Err(HandleError::permanent(
                reason::PAYLOAD_INVALID,
                err.to_string(),
            )),
            Err(HydrateError::Unavailable(err)) => Err(err),
        }
    }
}
