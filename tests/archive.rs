//! The archive against a real nats-server, on the local-directory backend:
//! every message of the coordination stream ends up in exactly one
//! segment, in stream order, across a SIGKILL mid-segment and a restart;
//! `archive verify` passes, and finds a tampered and a missing segment.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use choco_factory::cocoa_butter::archive::ArchiveStore;
use choco_factory::cocoa_butter::archive::segment::{Manifest, read_segment};
use common::steady::{publish_until_stored, write};
use common::*;
use serde_json::json;

fn archive_env(nats_url: &str, dir: &Path, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = conch_env(nats_url);
    env.push((
        "CHOCO_ARCHIVE__DOMAINS".into(),
        r#"["coordination"]"#.into(),
    ));
    env.push(("CHOCO_ARCHIVE__DIR".into(), dir.display().to_string()));
    for (key, value) in extra {
        env.push((key.to_string(), value.to_string()));
    }
    env
}

/// The coordination archive's manifest, from all its chunks (empty until
/// there is one).
async fn manifest(dir: &Path) -> Manifest {
    let store = ArchiveStore::local(dir).expect("the archive directory");
    store
        .manifest("coordination", COORDINATION)
        .await
        .unwrap_or_default()
}

/// Waits until the archive holds the stream up to its last sequence.
async fn archived_to_the_end(js: &async_nats::jetstream::Context, dir: &Path) -> Manifest {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let last = js
            .get_stream(COORDINATION)
            .await
            .expect("stream")
            .info()
            .await
            .expect("info")
            .state
            .last_sequence;
        let manifest = manifest(dir).await;
        if last > 0 && manifest.last() == last {
            return manifest;
        }
        assert!(
            Instant::now() < deadline,
            "archived to {} of {last}",
            manifest.last()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every sequence of the stream is in exactly one segment, with the body
/// the stream holds, and the segments are continuous.
async fn assert_archive_equals_stream(
    js: &async_nats::jetstream::Context,
    dir: &Path,
    manifest: &Manifest,
) {
    assert!(
        manifest.discontinuities().is_empty(),
        "{:?}",
        manifest.discontinuities()
    );
    let stored = read_all(js, COORDINATION, "choco.events.coordination.>").await;
    let mut archived = Vec::new();
    for segment in &manifest.segments {
        let bytes = std::fs::read(dir.join(&segment.key)).expect("segment object");
        archived.extend(read_segment(&bytes).expect("segment reads"));
    }
    assert_eq!(
        archived.len(),
        stored.len(),
        "one archived event per stored message"
    );
    for (event, message) in archived.iter().zip(&stored) {
        assert_eq!(event.subject, message.subject);
        assert_eq!(
            event.body_bytes().expect("base64"),
            message.body.to_vec(),
            "seq {}",
            event.seq
        );
    }
    let sequences: Vec<u64> = archived.iter().map(|e| e.seq).collect();
    let expected: Vec<u64> = (1..=manifest.last()).collect();
    assert_eq!(sequences, expected, "every sequence once, in order");
}

/// DuckDB (installed by scripts/setup.sh from PyPI) on the archive's
/// segments in place: (events per type per day, the event types of one
/// input's chain in stream order).
fn duckdb(dir: &Path, event_id: &str) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/venv-duckdb/bin/python");
    assert!(
        python.exists(),
        "DuckDB is not installed: run scripts/setup.sh (it installs it from PyPI)"
    );
    let segments = dir.join("coordination/*/*/*/*.ndjson.gz");
    let script = format!(
        r#"import duckdb, json
segments = "{segments}"
per_type = duckdb.sql(f"SELECT event_type, strftime(CAST(stored_at AS TIMESTAMP), '%Y-%m-%d') AS day, count(*) AS n FROM read_json_auto('{{segments}}') GROUP BY ALL ORDER BY ALL").fetchall()
chain = duckdb.sql(f"SELECT event_type FROM read_json_auto('{{segments}}') WHERE event_id = '{event_id}' OR correlation_id = '{event_id}' ORDER BY seq").fetchall()
print(json.dumps({{"per_type": [list(r) for r in per_type], "chain": [r[0] for r in chain]}}))"#,
        segments = segments.display()
    );
    let output = std::process::Command::new(python)
        .args(["-c", &script])
        .output()
        .expect("python");
    assert!(output.status.success(), "{output:?}");
    let answer: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON document");
    let list = |key: &str| answer[key].as_array().cloned().unwrap_or_default();
    (list("per_type"), list("chain"))
}

/// `choco-factory archive ARGS` on the coordination archive in `dir` (or
/// wherever `env` puts it): (status, stdout, stderr).
fn archive_command(
    nats_url: &str,
    dir: &Path,
    args: &[&str],
    env: &[(&str, String)],
) -> (Option<i32>, String, String) {
    let output = std::process::Command::new(BIN)
        .arg("archive")
        .args(args)
        .env("CHOCO_NATS__URL", nats_url)
        .env("CHOCO_ARCHIVE__DOMAINS", r#"["coordination"]"#)
        .env("CHOCO_ARCHIVE__DIR", dir)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("run");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn verify(nats_url: &str, dir: &Path) -> (Option<i32>, String, String) {
    archive_command(nats_url, dir, &["verify"], &[])
}

/// The conch serving with the coordination stream archived into `dir`,
/// ready.
async fn archiving(nats: &Nats, dir: &Path, extra: &[(&str, &str)]) -> Factory {
    let factory = Factory::start_with(
        archive_env(&nats.url(), dir, extra),
        &["serve", "--rooms", "conch"],
    )
    .await;
    factory.wait_ready().await;
    factory
}

/// Writes `range` of the load `prefix`, each once stored.
async fn publish_writes(
    js: &async_nats::jetstream::Context,
    prefix: &str,
    range: std::ops::Range<usize>,
) {
    for i in range {
        let event = write(prefix, i);
        publish_until_stored(js, REQUESTED, &event.event_id, event.encode()).await;
    }
}

/// Several thousand messages (the conch's inputs and its outputs) across
/// many segments: the archive equals the stream; `archive verify` passes,
/// then names a tampered segment and a missing one.
#[tokio::test]
async fn the_archive_equals_the_stream_and_verify_finds_what_was_changed() {
    const WRITES: usize = 1500;
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let _factory = archiving(
        &nats,
        dir.path(),
        &[("CHOCO_ARCHIVE__SEGMENT_MAX_EVENTS", "400")],
    )
    .await;
    publish_writes(&js, "archived", 0..WRITES).await;
    exactly(&js, COORDINATION, COMPLETED, WRITES).await;
    let manifest = archived_to_the_end(&js, dir.path()).await;
    assert!(
        manifest.segments.len() >= 7,
        "{} segments",
        manifest.segments.len()
    );
    assert_archive_equals_stream(&js, dir.path(), &manifest).await;
    let (code, out, err) = verify(&nats.url(), dir.path());
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("ok"), "{out}");

    // DuckDB reads the archive in place: events per type per day, and the
    // chain of one input (it and every event that carries its id as the
    // correlation id).
    let first_input = read_all(&js, COORDINATION, REQUESTED).await[0].envelope();
    let (per_type, chain) = duckdb(dir.path(), &first_input.event_id);
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert_eq!(
        per_type,
        vec![
            json!(["coordination.property_sync.completed", today, WRITES]),
            json!(["coordination.property_sync.requested", today, WRITES]),
        ]
    );
    assert_eq!(
        chain,
        vec![
            json!("coordination.property_sync.requested"),
            json!("coordination.property_sync.completed")
        ]
    );

    // A byte changed in one segment, another segment gone.
    let tampered = dir.path().join(&manifest.segments[1].key);
    let mut bytes = std::fs::read(&tampered).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&tampered, bytes).expect("write");
    std::fs::remove_file(dir.path().join(&manifest.segments[3].key)).expect("remove");
    let (code, out, err) = verify(&nats.url(), dir.path());
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains(&format!("{}: its SHA-256", manifest.segments[1].key)),
        "{out}"
    );
    assert!(
        out.contains(&format!("{}: missing", manifest.segments[3].key)),
        "{out}"
    );
}

/// The process SIGKILLed while a segment fills, then started again: the
/// messages of the unwritten segment come back (nothing of it was acked)
/// and the archive has no gap and no duplicate.
#[tokio::test]
async fn a_kill_mid_segment_leaves_no_gap_and_no_duplicate() {
    const WRITES: usize = 600;
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Short deadlines, so the kill's unacked messages return in seconds.
    let settings = [
        ("CHOCO_ARCHIVE__SEGMENT_MAX_EVENTS", "150"),
        ("CHOCO_ARCHIVE__SEGMENT_MAX_AGE", "2s"),
        ("CHOCO_ARCHIVE__ACK_WAIT", "3s"),
    ];
    let mut factory = archiving(&nats, dir.path(), &settings).await;
    let load = {
        let js = js.clone();
        tokio::spawn(async move {
            for i in 0..WRITES {
                let event = write("killed", i);
                publish_until_stored(&js, REQUESTED, &event.event_id, event.encode()).await;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    // Killed once a segment or two are written and the next one fills.
    wait_until(Duration::from_secs(60), || async {
        manifest(dir.path()).await.segments.len() >= 2
    })
    .await;
    factory.signal(nix::sys::signal::Signal::SIGKILL);
    factory.wait_exit(Duration::from_secs(10)).await;
    let before = manifest(dir.path()).await;
    let _factory = archiving(&nats, dir.path(), &settings).await;
    load.await.expect("publisher");
    exactly(&js, COORDINATION, COMPLETED, WRITES).await;
    let manifest = archived_to_the_end(&js, dir.path()).await;
    assert!(
        manifest.segments.len() > before.segments.len(),
        "the restarted archiver went on"
    );
    assert_archive_equals_stream(&js, dir.path(), &manifest).await;
    let (code, out, err) = verify(&nats.url(), dir.path());
    assert_eq!(code, Some(0), "{out}{err}");
}

/// Storage that fails (the archive's date folder replaced by a file, so no
/// segment can be created in it, whoever runs the test) holds the archiver:
/// nothing more is acknowledged, the backlog waits in the stream; once the
/// folder is back the archiver resumes by itself and the archive equals the
/// stream.
#[tokio::test]
async fn storage_down_holds_the_backlog_in_the_stream_and_resumes() {
    const WRITES: usize = 400;
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = [
        ("CHOCO_ARCHIVE__SEGMENT_MAX_EVENTS", "100"),
        ("CHOCO_ARCHIVE__SEGMENT_MAX_AGE", "1s"),
    ];
    let factory = archiving(&nats, dir.path(), &settings).await;
    publish_writes(&js, "held", 0..WRITES / 2).await;
    let before = archived_to_the_end(&js, dir.path()).await;
    // The folder every segment of today goes into, made unusable.
    let day = dir
        .path()
        .join(&before.segments[0].key)
        .parent()
        .expect("the day's folder")
        .to_path_buf();
    let aside = day.with_extension("aside");
    std::fs::rename(&day, &aside).expect("move the day aside");
    std::fs::write(&day, b"not a folder").expect("a file in its place");

    publish_writes(&js, "held", WRITES / 2..WRITES).await;
    exactly(&js, COORDINATION, COMPLETED, WRITES).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let consumer = js
        .get_stream(COORDINATION)
        .await
        .expect("stream")
        .consumer_info("choco-archive")
        .await
        .expect("the archive consumer")
        .clone();
    assert_eq!(
        consumer.ack_floor.stream_sequence,
        before.last(),
        "nothing acknowledged while storage fails"
    );
    assert_eq!(manifest(dir.path()).await.last(), before.last());
    assert!(
        !factory
            .logs_containing("cannot write the archive; holding")
            .is_empty(),
        "the hold is reported"
    );

    let series = |text: &str, name: &str| -> f64 {
        text.lines()
            .filter(|line| line.starts_with(name) && line.contains(r#"domain="coordination""#))
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    let (status, body) = factory.metrics_get("/archive/readyz").await;
    assert_eq!(status, 503, "{body}");
    let readiness: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(readiness["ready"], false);
    assert!(
        readiness["domains"]["coordination"]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("cannot write the archive")),
        "{body}"
    );
    let during = factory.scrape().await;
    assert_eq!(series(&during, "choco_archive_holding"), 1.0, "{during}");
    assert!(series(&during, "choco_archive_lag_messages") >= WRITES as f64 / 2.0);
    assert!(
        series(
            &during,
            r#"choco_archive_segments_total{domain="coordination",outcome="failed"}"#
        ) >= 1.0
    );

    std::fs::remove_file(&day).expect("remove the file");
    std::fs::rename(&aside, &day).expect("the day's folder back");
    let after = archived_to_the_end(&js, dir.path()).await;
    assert_archive_equals_stream(&js, dir.path(), &after).await;
    let text = factory.scrape().await;
    assert_eq!(series(&text, "choco_archive_holding"), 0.0, "{text}");
    let (status, body) = factory.metrics_get("/archive/readyz").await;
    assert_eq!(status, 200, "ready again by itself: {body}");
    assert_eq!(series(&text, "choco_archive_sequence"), after.last() as f64);
}

fn archive_cli(
    nats_url: &str,
    dir: &Path,
    args: &[&str],
) -> (Option<i32>, serde_json::Value, String) {
    let args: Vec<&str> = args.iter().copied().chain(["--json"]).collect();
    let (code, stdout, stderr) = archive_command(nats_url, dir, &args, &[]);
    (
        code,
        serde_json::from_str(&stdout).unwrap_or_default(),
        stderr,
    )
}

/// `archive replay` republishes the archived inputs with their event ids,
/// so inside the duplicate window it doubles nothing, and leaves outputs
/// to the rooms; `archive restore` rebuilds the stream, inputs and outputs
/// byte for byte in stream order, into a new stream no room consumes.
#[tokio::test]
async fn replay_doubles_nothing_and_restore_rebuilds_the_stream() {
    const WRITES: usize = 200;
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let _factory = archiving(
        &nats,
        dir.path(),
        &[("CHOCO_ARCHIVE__SEGMENT_MAX_EVENTS", "64")],
    )
    .await;
    publish_writes(&js, "replayed", 0..WRITES).await;
    exactly(&js, COORDINATION, COMPLETED, WRITES).await;
    archived_to_the_end(&js, dir.path()).await;

    let url = nats.url();
    let (code, report, err) = archive_cli(
        &url,
        dir.path(),
        &["replay", "--domain", "coordination", "--dry-run"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(report["matched"], 2 * WRITES, "{report}");
    assert_eq!(report["published"], WRITES, "{report}");
    assert_eq!(report["outputs_skipped"], WRITES, "{report}");
    let (code, report, err) =
        archive_cli(&url, dir.path(), &["replay", "--domain", "coordination"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        report["duplicates"], WRITES,
        "inside the duplicate window: {report}"
    );
    assert_eq!(report["published"], 0, "{report}");
    let stored = read_all(&js, COORDINATION, "choco.events.coordination.>").await;
    assert_eq!(stored.len(), 2 * WRITES, "nothing doubled");

    let (code, report, err) = archive_cli(
        &url,
        dir.path(),
        &[
            "restore",
            "--domain",
            "coordination",
            "--into",
            "choco:restored:coordination",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(report["published"], 2 * WRITES, "{report}");
    let restored = read_all(
        &js,
        "choco:restored:coordination",
        "choco.restored.coordination.>",
    )
    .await;
    assert_eq!(restored.len(), stored.len());
    for (copy, original) in restored.iter().zip(&stored) {
        assert_eq!(copy.body, original.body, "byte for byte, in stream order");
        assert_eq!(
            copy.subject.replacen("choco.restored.", "choco.events.", 1),
            original.subject
        );
    }
    let (code, _, err) = archive_cli(
        &url,
        dir.path(),
        &[
            "restore",
            "--domain",
            "coordination",
            "--into",
            "choco:restored:coordination",
        ],
    );
    assert_eq!(code, Some(2), "an existing stream is refused: {err}");
}

/// The archive in S3-compatible storage (a real SeaweedFS): the same
/// segments and manifest, equal to the stream, and `archive verify`
/// against the bucket passes.
#[tokio::test]
async fn the_archive_in_s3_compatible_storage_equals_the_stream() {
    use choco_factory::cocoa_butter::archive::ArchiveStore;
    use choco_factory::cocoa_butter::archive::config::S3Config;
    const WRITES: usize = 300;
    let seaweed = common::seaweed::Seaweed::start("choco-archive").await;
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    // Credentials from files, as a mounted secret gives them (SeaweedFS
    // without identities takes any key).
    let secrets = tempfile::tempdir().expect("tempdir");
    let id_file = secrets.path().join("access_key_id");
    let secret_file = secrets.path().join("secret_access_key");
    std::fs::write(&id_file, "choco\n").expect("write");
    std::fs::write(&secret_file, "choco-secret\n").expect("write");
    let s3_env = [
        ("CHOCO_ARCHIVE__BACKEND", "s3".to_string()),
        ("CHOCO_ARCHIVE__S3__ENDPOINT", seaweed.endpoint()),
        ("CHOCO_ARCHIVE__S3__BUCKET", "choco-archive".to_string()),
        ("CHOCO_ARCHIVE__S3__PATH_STYLE", "true".to_string()),
        (
            "CHOCO_ARCHIVE__S3__ACCESS_KEY_ID_FILE",
            id_file.display().to_string(),
        ),
        (
            "CHOCO_ARCHIVE__S3__SECRET_ACCESS_KEY_FILE",
            secret_file.display().to_string(),
        ),
        ("CHOCO_ARCHIVE__SEGMENT_MAX_EVENTS", "128".to_string()),
    ];
    let mut env = archive_env(&nats.url(), Path::new("unused"), &[]);
    env.extend(s3_env.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let factory = Factory::start_with(env, &["serve", "--rooms", "conch"]).await;
    factory.wait_ready().await;
    publish_writes(&js, "s3", 0..WRITES).await;
    exactly(&js, COORDINATION, COMPLETED, WRITES).await;

    let store = ArchiveStore::s3(&S3Config {
        endpoint: Some(seaweed.endpoint()),
        bucket: "choco-archive".into(),
        path_style: true,
        access_key_id_file: Some(id_file.clone()),
        secret_access_key_file: Some(secret_file.clone()),
        ..S3Config::default()
    });
    let store = match store {
        Ok(store) => store,
        Err(err) => panic!("{err}"),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let manifest = loop {
        let manifest = store
            .manifest("coordination", COORDINATION)
            .await
            .expect("manifest");
        if manifest.last() as usize == 2 * WRITES {
            break manifest;
        }
        assert!(Instant::now() < deadline, "archived to {}", manifest.last());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(manifest.discontinuities().is_empty());
    let mut archived = Vec::new();
    for segment in &manifest.segments {
        let bytes = store.get(&segment.key).await.expect("get").expect("object");
        archived.extend(read_segment(&bytes).expect("segment"));
    }
    let stored = read_all(&js, COORDINATION, "choco.events.coordination.>").await;
    assert_eq!(archived.len(), stored.len());
    for (event, message) in archived.iter().zip(&stored) {
        assert_eq!(event.body_bytes().expect("base64"), message.body.to_vec());
    }
    let (code, out, err) = archive_command(&nats.url(), Path::new("unused"), &["verify"], &s3_env);
    assert_eq!(code, Some(0), "{out}{err}");
}

/// Two replicas of the factory archive the same stream: one archiver
/// receives (the pinned one), the other stands by. SIGKILL the one that
/// archives: the standby takes over within the pin's timeout, and the
/// archive still equals the stream.
#[tokio::test]
async fn a_standby_archiver_takes_over_when_the_archiving_one_dies() {
    const WRITES: usize = 400;
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = [
        ("CHOCO_ARCHIVE__SEGMENT_MAX_EVENTS", "50"),
        ("CHOCO_ARCHIVE__SEGMENT_MAX_AGE", "1s"),
        ("CHOCO_ARCHIVE__ACK_WAIT", "3s"),
    ];
    let mut first = archiving(&nats, dir.path(), &settings).await;
    let mut second = archiving(&nats, dir.path(), &settings).await;
    let written = |text: &str| -> f64 {
        text.lines()
            .filter(|line| {
                line.starts_with("choco_archive_segments_total")
                    && line.contains(r#"outcome="written""#)
            })
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    publish_writes(&js, "standby", 0..WRITES / 2).await;
    archived_to_the_end(&js, dir.path()).await;
    let (by_first, by_second) = (
        written(&first.scrape().await),
        written(&second.scrape().await),
    );
    assert!(
        (by_first > 0.0) != (by_second > 0.0),
        "exactly one archiver wrote: {by_first} and {by_second}"
    );
    let (archiving, standby) = if by_first > 0.0 {
        (&mut first, &mut second)
    } else {
        (&mut second, &mut first)
    };
    archiving.signal(nix::sys::signal::Signal::SIGKILL);
    archiving.wait_exit(Duration::from_secs(10)).await;
    publish_writes(&js, "standby", WRITES / 2..WRITES).await;
    exactly(&js, COORDINATION, COMPLETED, WRITES).await;
    let manifest = archived_to_the_end(&js, dir.path()).await;
    assert!(
        written(&standby.scrape().await) > 0.0,
        "the standby took over"
    );
    assert_archive_equals_stream(&js, dir.path(), &manifest).await;
}
