//! the-wrapper, the Wrapping Room (domain `resolution`): the last room
//! before delivery. Every `#tag` must name a real tag and every link into a
//! repository must point at something that exists.
//!
//! The index lives in two key-value buckets shared by replicas: tags (one
//! entry per spelling key, pointing at the canonical tag and its aliases)
//! and documents (one entry per repo/path with its anchors, plus one entry
//! per repo listing its paths). `extract.rs` reads a document in one pass;
//! look-ups are deduplicated and issued concurrently.

mod api;
pub mod extract;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use async_nats::jetstream::kv;
use async_trait::async_trait;
use bytes::Bytes;
use futures::future::try_join_all;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use api::pb;
use extract::{RepoLink, extract, github_slug, tag_key};

use crate::cocoa_butter::kit::Kv;
use crate::cocoa_butter::kit::content_hash;
use crate::cocoa_butter::kit::keys::{id_from_kv_key, id_too_long, kv_key};
use crate::cocoa_butter::kit::{
    Action, EventContract, FieldError, Payload, Reason, RoomSettings, Written, reason, room_actions,
};
use crate::cocoa_butter::kit::{
    GrpcService, HandleError, InboundEvent, KvBucket, Outbound, Room, RoomContext, RoomError,
    RoomSpec,
};

pub const SPEC: RoomSpec = RoomSpec {
    name: "wrapper",
    check: |settings| Loaded::load(settings).map(|_| ()),
    build: |ctx| Ok(Arc::new(Wrapper::new(ctx)?)),
    defaults: || serde_json::to_value(WrapperSettings::default()).unwrap_or_default(),
    contracts: || {
        vec![
            EventContract::input::<ResolveRequest>(
                Input::Requested,
                "resolve a document's tags and verify its cross-repository links",
            ),
            EventContract::input::<IndexedDocument>(
                Input::DocumentIndexed,
                "a document of a repository, its anchors and tags, for the link index",
            )
            .about("the indexed document (`<repo>/<path>`)"),
            EventContract::input::<TagRecord>(
                Input::TagRegistered,
                "a canonical tag and the other names it goes by",
            )
            .about("the tag (`tag`)"),
            EventContract::output::<TagResolved>(
                Output::TagResolved,
                "one tag of the document, resolved to its canonical id or not",
            ),
            EventContract::output::<LinkVerified>(
                Output::LinkVerified,
                "one cross-repository link, checked against the index",
            ),
            EventContract::output::<ResolutionCompleted>(
                Output::Completed,
                "every tag and link of the document was handled: the counts",
            ),
        ]
    },
};

room_actions! {
    /// What the Wrapping Room consumes.
    enum Input: inputs {
        Requested = "requested",
        DocumentIndexed = "document_indexed",
        TagRegistered = "tag_registered",
    }
}

room_actions! {
    /// What the Wrapping Room publishes.
    enum Output: outputs {
        TagResolved = "tag_resolved",
        LinkVerified = "cross_repo_link_verified",
        Completed = "completed",
    }
}

/// `rooms.wrapper.settings`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
struct WrapperSettings {
    /// Tags seeded at start; relative to the working directory.
    tags_file: PathBuf,
    /// Repositories known even before any of their documents is indexed.
    known_repos: Vec<String>,
    tags_bucket: String,
    documents_bucket: String,
}

impl Default for WrapperSettings {
    fn default() -> Self {
        WrapperSettings {
            tags_file: "config/tags.toml".into(),
            known_repos: Vec::new(),
            tags_bucket: "choco_wrapper_tags".into(),
            documents_bucket: "choco_wrapper_documents".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TagsFile {
    tags: Vec<TagRecord>,
}

/// A tag: its canonical id and the other names it goes by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TagRecord {
    pub tag: String,
    #[serde(default)]
    pub aliases: Vec<String>,
}

impl Payload for TagRecord {}

/// `resolution.document_indexed` and `PUT /v1/index/{repo}/{path}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct IndexedDocument {
    pub repo: String,
    pub path: String,
    #[serde(default)]
    pub anchors: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

impl Payload for IndexedDocument {}

/// What the documents bucket keeps per repo.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct RepoRecord {
    paths: BTreeSet<String>,
}

/// `resolution.requested` and `Resolve`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct ResolveRequest {
    pub document_id: String,
    pub repo: String,
    pub path: String,
    pub content: String,
}

impl Payload for ResolveRequest {}

/// `resolution.tag_resolved`: one tag of the document, resolved or not.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct TagResolved {
    pub document_id: String,
    #[serde(flatten)]
    pub resolution: TagResolution,
}

impl Payload for TagResolved {}

/// `resolution.cross_repo_link_verified`: one cross-repository link of the
/// document, checked against the index.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct LinkVerified {
    pub document_id: String,
    #[serde(flatten)]
    pub verification: LinkVerification,
}

impl Payload for LinkVerified {}

/// `resolution.completed`: the document's counts, after its tags and links.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ResolutionCompleted {
    pub document_id: String,
    pub tags: usize,
    pub links: usize,
    pub unresolved: usize,
    pub broken: usize,
}

impl Payload for ResolutionCompleted {}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct TagResolution {
    pub tag: String,
    pub canonical: Option<String>,
    pub status: &'static str,
    pub suggestion: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct LinkVerification {
    pub link: String,
    pub repo: String,
    pub path: String,
    pub anchor: Option<String>,
    pub status: &'static str,
    pub suggestion: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Resolution {
    pub document_id: String,
    pub tags: Vec<TagResolution>,
    pub links: Vec<LinkVerification>,
    pub unresolved: usize,
    pub broken: usize,
}

struct Loaded {
    settings: WrapperSettings,
    seed: Vec<TagRecord>,
}

impl Loaded {
    fn load(room: &RoomSettings) -> Result<Self, RoomError> {
        let invalid = |field: &str, message: String| room.settings_error(field, message);
        let settings: WrapperSettings = room.room_settings()?;
        let path = &room.resolve_path(&settings.tags_file);
        let text = std::fs::read_to_string(path).map_err(|err| {
            invalid(
                "tags_file",
                format!("cannot read {}: {err}", path.display()),
            )
        })?;
        let file: TagsFile = toml::from_str(&text)
            .map_err(|err| invalid("tags_file", format!("{}: {err}", path.display())))?;
        for (index, tag) in file.tags.iter().enumerate() {
            if tag_key(&tag.tag).is_empty() || tag.aliases.iter().any(|a| tag_key(a).is_empty()) {
                return Err(invalid(
                    "tags_file",
                    format!("{}: tags[{index}] has an empty name", path.display()),
                ));
            }
        }
        Ok(Loaded {
            settings,
            seed: file.tags,
        })
    }
}

pub struct Wrapper {
    settings: WrapperSettings,
    seed: Vec<TagRecord>,
    tags: KvBucket,
    documents: KvBucket,
}

/// A field that names something in the index (and so becomes part of a
/// key) must be present and at most `MAX_ID_BYTES` long.
fn check_name(field: &'static str, value: &str) -> Result<(), FieldError> {
    let message = if value.trim().is_empty() {
        "must not be empty".to_string()
    } else if let Some(message) = id_too_long(value) {
        message
    } else {
        return Ok(());
    };
    Err(FieldError { field, message })
}

/// A tag to register: a name with a letter or digit, names of bounded length.
fn check_tag(record: &TagRecord) -> Result<(), FieldError> {
    if tag_key(&record.tag).is_empty() {
        return Err(FieldError {
            field: "tag",
            message: "must not be empty".into(),
        });
    }
    check_name("tag", &record.tag)?;
    record
        .aliases
        .iter()
        .try_for_each(|alias| check_name("aliases", alias))
}

fn doc_key(repo: &str, path: &str) -> String {
    format!("d.{}.{}", kv_key(repo), kv_key(path))
}

fn repo_key(repo: &str) -> String {
    format!("r.{}", kv_key(repo))
}

/// The value of the closest candidate key, if it is close enough to be a
/// useful suggestion (edit distance ≤ a third of the length, at least 2).
fn nearest<'a>(
    wanted: &str,
    candidates: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Option<String> {
    let limit = (wanted.chars().count() / 3).max(2);
    candidates
        .into_iter()
        .map(|(key, value)| (strsim::levenshtein(wanted, key), value))
        .filter(|(distance, _)| *distance <= limit)
        .min()
        .map(|(_, value)| value.to_string())
}

/// Candidates whose key is their value.
fn same<'a>(names: impl IntoIterator<Item = &'a str>) -> impl Iterator<Item = (&'a str, &'a str)> {
    names.into_iter().map(|name| (name, name))
}

impl Wrapper {
    fn new(ctx: RoomContext) -> Result<Self, RoomError> {
        let loaded = Loaded::load(&ctx.settings)?;
        Ok(Wrapper {
            tags: ctx.kv_bucket(
                &loaded.settings.tags_bucket,
                "the-wrapper: canonical tags, one entry per spelling",
            ),
            documents: ctx.kv_bucket(
                &loaded.settings.documents_bucket,
                "the-wrapper: indexed documents and their anchors",
            ),
            settings: loaded.settings,
            seed: loaded.seed,
        })
    }

    async fn get_json<T: for<'de> Deserialize<'de>>(
        store: &Kv<'_>,
        key: &str,
    ) -> Result<Option<(T, u64)>, HandleError> {
        match store
            .entry(key.to_string())
            .await
            .map_err(HandleError::bus)?
        {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let value = serde_json::from_slice(&entry.value).map_err(|err| {
                    HandleError::permanent(CORRUPT_INDEX, format!("{key}: {err}"))
                })?;
                Ok(Some((value, entry.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Adds a tag, or grows the aliases of an existing one.
    pub async fn register_tag(&self, record: TagRecord) -> Result<TagRecord, HandleError> {
        let store = self.tags.store()?;
        let canonical_key = kv_key(&tag_key(&record.tag));
        let mut merged = match Self::get_json::<TagRecord>(&store, &canonical_key).await? {
            Some((existing, _)) if tag_key(&existing.tag) == tag_key(&record.tag) => existing,
            _ => TagRecord {
                tag: record.tag.clone(),
                aliases: Vec::new(),
            },
        };
        for alias in record.aliases {
            if tag_key(&alias) != tag_key(&merged.tag)
                && !merged.aliases.iter().any(|a| tag_key(a) == tag_key(&alias))
            {
                merged.aliases.push(alias);
            }
        }
        let bytes = Bytes::from(serde_json::to_vec(&merged).map_err(HandleError::transient)?);
        let names = std::iter::once(&merged.tag).chain(merged.aliases.iter());
        let writes = names.map(|name| store.put(kv_key(&tag_key(name)), bytes.clone()));
        try_join_all(writes).await.map_err(HandleError::bus)?;
        Ok(merged)
    }

    /// Every tag, each once, by canonical id.
    pub async fn list_tags(&self) -> Result<Vec<TagRecord>, HandleError> {
        let store = self.tags.store()?;
        let keys: Vec<String> =
            futures::TryStreamExt::try_collect(store.keys().await.map_err(HandleError::bus)?)
                .await
                .map_err(HandleError::bus)?;
        let records = try_join_all(
            keys.iter()
                .map(|key| Self::get_json::<TagRecord>(&store, key)),
        )
        .await?;
        let mut by_tag: BTreeMap<String, TagRecord> = BTreeMap::new();
        for (record, _) in records.into_iter().flatten() {
            by_tag.entry(record.tag.clone()).or_insert(record);
        }
        Ok(by_tag.into_values().collect())
    }

    /// Adds or replaces one document of the index; its repo becomes known.
    pub async fn register_document(
        &self,
        mut document: IndexedDocument,
    ) -> Result<IndexedDocument, FieldErrorOr> {
        for (field, value) in [("repo", &document.repo), ("path", &document.path)] {
            check_name(field, value).map_err(FieldErrorOr::Field)?;
        }
        document.path = document.path.trim_start_matches('/').to_string();
        document.anchors = document.anchors.iter().map(|a| github_slug(a)).collect();
        let store = self.documents.store().map_err(HandleError::from)?;
        let bytes = Bytes::from(serde_json::to_vec(&document).map_err(HandleError::transient)?);
        store
            .put(doc_key(&document.repo, &document.path), bytes)
            .await
            .map_err(HandleError::bus)?;
        // The repo's path list, compare-and-set so concurrent indexers add both.
        let key = repo_key(&document.repo);
        for _ in 0..16 {
            let (mut record, revision) = match Self::get_json::<RepoRecord>(&store, &key).await? {
                Some((record, revision)) => (record, Some(revision)),
                None => (RepoRecord::default(), None),
            };
            if !record.paths.insert(document.path.clone()) && revision.is_some() {
                return Ok(document);
            }
            let bytes = Bytes::from(serde_json::to_vec(&record).map_err(HandleError::transient)?);
            match store
                .write_if(&key, bytes, revision)
                .await
                .map_err(HandleError::from)?
            {
                Written::Stored(_) => return Ok(document),
                Written::Conflict => continue,
            }
        }
        Err(HandleError::transient(format!("{key} kept changing")).into())
    }

    /// Resolves tags and verifies links: the path of the event and the APIs.
    pub async fn resolve(&self, request: &ResolveRequest) -> Result<Resolution, FieldErrorOr> {
        for (field, value) in [
            ("document_id", &request.document_id),
            ("repo", &request.repo),
            ("path", &request.path),
        ] {
            check_name(field, value).map_err(FieldErrorOr::Field)?;
        }
        let extracted = extract(&request.content, &request.repo, &request.path);
        let tags = self.resolve_tags(&extracted.tags).await?;
        let links = self.verify_links(&extracted.links).await?;
        Ok(Resolution {
            document_id: request.document_id.clone(),
            unresolved: tags.iter().filter(|t| t.status != "resolved").count(),
            broken: links.iter().filter(|l| l.status != "ok").count(),
            tags,
            links,
        })
    }

    async fn resolve_tags(&self, tags: &[String]) -> Result<Vec<TagResolution>, HandleError> {
        let store = self.tags.store()?;
        let found = try_join_all(tags.iter().map(|tag| async move {
            Self::get_json::<TagRecord>(&store, &kv_key(&tag_key(tag))).await
        }))
        .await?;
        // Unknown tags are compared with every known spelling, read from the
        // bucket's keys alone (one entry per spelling); only the nearest one
        // is then fetched, for its canonical id.
        let spellings: Vec<String> = if found.iter().any(Option::is_none) {
            let keys: Vec<String> =
                futures::TryStreamExt::try_collect(store.keys().await.map_err(HandleError::bus)?)
                    .await
                    .map_err(HandleError::bus)?;
            keys.iter().filter_map(|key| id_from_kv_key(key)).collect()
        } else {
            Vec::new()
        };
        let mut resolutions = Vec::with_capacity(tags.len());
        for (tag, record) in tags.iter().zip(found) {
            resolutions.push(match record {
                Some((record, _)) => TagResolution {
                    tag: tag.clone(),
                    canonical: Some(record.tag),
                    status: "resolved",
                    suggestion: None,
                },
                None => {
                    let nearest_spelling =
                        nearest(&tag_key(tag), same(spellings.iter().map(String::as_str)));
                    let suggestion = match nearest_spelling {
                        Some(spelling) => Self::get_json::<TagRecord>(&store, &kv_key(&spelling))
                            .await?
                            .map(|(record, _)| record.tag),
                        None => None,
                    };
                    TagResolution {
                        tag: tag.clone(),
                        canonical: None,
                        status: "unknown",
                        suggestion,
                    }
                }
            });
        }
        Ok(resolutions)
    }

    async fn verify_links(&self, links: &[RepoLink]) -> Result<Vec<LinkVerification>, HandleError> {
        let store = self.documents.store().map_err(HandleError::from)?;
        let repos: BTreeSet<&str> = links.iter().map(|l| l.repo.as_str()).collect();
        let repo_records = try_join_all(repos.iter().map(|repo| async move {
            Self::get_json::<RepoRecord>(&store, &repo_key(repo))
                .await
                .map(|found| (*repo, found.map(|(record, _)| record)))
        }))
        .await?;
        let mut known: HashMap<&str, Option<RepoRecord>> = repo_records.into_iter().collect();
        for repo in &self.settings.known_repos {
            let slot = known.entry(repo.as_str()).or_insert(None);
            if slot.is_none() {
                *slot = Some(RepoRecord::default());
            }
        }
        let wanted_docs: BTreeSet<(&str, &str)> = links
            .iter()
            .filter(|l| known.get(l.repo.as_str()).is_some_and(Option::is_some))
            .map(|l| (l.repo.as_str(), l.path.as_str()))
            .collect();
        let docs: HashMap<(&str, &str), Option<IndexedDocument>> =
            try_join_all(wanted_docs.into_iter().map(|(repo, path)| async move {
                Self::get_json::<IndexedDocument>(&store, &doc_key(repo, path))
                    .await
                    .map(|found| ((repo, path), found.map(|(doc, _)| doc)))
            }))
            .await?
            .into_iter()
            .collect();
        let known_repo_names: Vec<&str> = known
            .iter()
            .filter(|(_, record)| record.is_some())
            .map(|(name, _)| *name)
            .collect();

        Ok(links
            .iter()
            .map(|link| {
                let (status, suggestion) = match known.get(link.repo.as_str()) {
                    Some(Some(repo)) => match docs.get(&(link.repo.as_str(), link.path.as_str())) {
                        Some(Some(doc)) => match &link.anchor {
                            Some(anchor)
                                if !doc.anchors.iter().any(|a| *a == github_slug(anchor)) =>
                            {
                                (
                                    "missing_anchor",
                                    nearest(
                                        &github_slug(anchor),
                                        same(doc.anchors.iter().map(String::as_str)),
                                    ),
                                )
                            }
                            _ => ("ok", None),
                        },
                        _ => (
                            "missing_path",
                            nearest(&link.path, same(repo.paths.iter().map(String::as_str))),
                        ),
                    },
                    _ => (
                        "unknown_repo",
                        nearest(&link.repo, same(known_repo_names.iter().copied())),
                    ),
                };
                LinkVerification {
                    link: link.link.clone(),
                    repo: link.repo.clone(),
                    path: link.path.clone(),
                    anchor: link.anchor.clone(),
                    status,
                    suggestion,
                }
            })
            .collect())
    }
}

/// A request error: the caller's field, or the index being unavailable.
#[derive(Debug, thiserror::Error)]
pub enum FieldErrorOr {
    #[error(transparent)]
    Field(FieldError),
    #[error(transparent)]
    Handle(#[from] HandleError),
}

impl FieldErrorOr {
    fn into_handle_error(self) -> HandleError {
        match self {
            FieldErrorOr::Field(err) => {
                HandleError::permanent(reason::PAYLOAD_INVALID, err.to_string())
            }
            FieldErrorOr::Handle(err) => err,
        }
    }
}

/// The outputs of one resolution. Their ids follow what they say (the
/// document, its content and the result), so the same request resolved
/// twice against the same index publishes nothing new.
fn outputs(request: &ResolveRequest, resolution: &Resolution) -> Vec<Outbound> {
    let doc = &resolution.document_id;
    let content = content_hash(request.content.as_bytes());
    // The runtime adds the output's payload hash to the key: the result
    // need not be written into it.
    let key = format!("{doc}\n{content}");
    let keyed = |output: Outbound| output.with_idempotency_key(key.clone());
    let mut out = Vec::with_capacity(resolution.tags.len() + resolution.links.len() + 1);
    for tag in &resolution.tags {
        out.push(keyed(Outbound::new(
            Output::TagResolved,
            doc,
            TagResolved {
                document_id: doc.clone(),
                resolution: tag.clone(),
            },
        )));
    }
    for link in &resolution.links {
        out.push(keyed(Outbound::new(
            Output::LinkVerified,
            doc,
            LinkVerified {
                document_id: doc.clone(),
                verification: link.clone(),
            },
        )));
    }
    out.push(keyed(Outbound::new(
        Output::Completed,
        doc,
        ResolutionCompleted {
            document_id: doc.clone(),
            tags: resolution.tags.len(),
            links: resolution.links.len(),
            unresolved: resolution.unresolved,
            broken: resolution.broken,
        },
    )));
    out
}

/// An index entry that no longer parses.
const CORRUPT_INDEX: Reason = Reason::new("corrupt_index");

#[async_trait]
impl Room for Wrapper {
    fn dead_letter_reasons(&self) -> &'static [Reason] {
        &[CORRUPT_INDEX]
    }

    fn inputs(&self) -> &'static [&'static str] {
        Input::ALL
    }

    fn outputs(&self) -> &'static [&'static str] {
        Output::ALL
    }

    async fn prepare(&self) -> Result<(), RoomError> {
        self.tags.open().await?;
        self.documents.open().await?;
        for tag in &self.seed {
            self.register_tag(tag.clone())
                .await
                .map_err(|source| RoomError::Prepare {
                    what: format!("seeding tag {}", tag.tag),
                    source,
                })?;
        }
        Ok(())
    }

    async fn handle(&self, event: &InboundEvent) -> Result<Vec<Outbound>, HandleError> {
        match event.input::<Input>()? {
            Input::DocumentIndexed => {
                let document: IndexedDocument = event.payload()?;
                self.register_document(document)
                    .await
                    .map_err(FieldErrorOr::into_handle_error)?;
                Ok(Vec::new())
            }
            Input::TagRegistered => {
                let tag: TagRecord = event.payload()?;
                check_tag(&tag).map_err(|err| {
                    HandleError::permanent(reason::PAYLOAD_INVALID, err.to_string())
                })?;
                self.register_tag(tag).await?;
                Ok(Vec::new())
            }
            Input::Requested => {
                let request: ResolveRequest = event.payload()?;
                let resolution = self
                    .resolve(&request)
                    .await
                    .map_err(FieldErrorOr::into_handle_error)?;
                Ok(outputs(&request, &resolution))
            }
        }
    }

    fn http_routes(self: Arc<Self>) -> axum::Router {
        api::http_routes(self)
    }

    fn grpc_service(self: Arc<Self>) -> GrpcService {
        api::grpc_service(self)
    }
}
