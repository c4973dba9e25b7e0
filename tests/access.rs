//! Who may talk to a room, and how much: bearer JWTs verified locally
//! (HS256, RS256 from a JWKS, ES256 and EdDSA from PEM keys), scopes per
//! route, and the input limits with their statuses, over HTTP and gRPC
//! against the real binary.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use choco_factory::rooms::conch::pb;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tonic::Code;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwt")
        .join(name)
}

const ISSUER: &str = "choco-auth";
const AUDIENCE: &str = "choco-factory";

/// Starts the conch with `config` (TOML) as its `--config` file.
async fn start_with_config(nats: &Nats, config: &str) -> (Factory, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("factory.toml");
    std::fs::write(&path, config).expect("write config");
    let path = path.to_str().expect("utf-8 path").to_string();
    let factory = Factory::start_with(
        conch_env(&nats.url()),
        &["--config", &path, "serve", "--rooms", "conch"],
    )
    .await;
    factory.wait_ready().await;
    (factory, dir)
}

fn auth_config() -> String {
    format!(
        r#"
[auth]
hs256_secret_file = {hs:?}
public_key_files = [{es:?}, {ed:?}]
jwks_file = {jwks:?}
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
read_scope = "factory:read"
write_scope = "factory:write"
"#,
        hs = fixture("hs256.secret"),
        es = fixture("es256.pub.pem"),
        ed = fixture("eddsa.pub.pem"),
        jwks = fixture("jwks.json"),
    )
}

/// Which key signs a test token.
#[derive(Clone, Copy)]
enum Signer {
    Hs256,
    Rs256Jwks,
    Es256,
    EdDsa,
    /// A secret the factory does not know.
    Stranger,
}

fn mint(signer: Signer, claims: Value) -> String {
    let pem = |name: &str| std::fs::read(fixture(name)).expect("key");
    let (mut header, key) = match signer {
        Signer::Hs256 => (
            Header::new(Algorithm::HS256),
            EncodingKey::from_secret(
                std::fs::read_to_string(fixture("hs256.secret"))
                    .expect("secret")
                    .trim()
                    .as_bytes(),
            ),
        ),
        Signer::Stranger => (
            Header::new(Algorithm::HS256),
            EncodingKey::from_secret(b"not-the-factory-secret-0123456789abcdef"),
        ),
        Signer::Rs256Jwks => (
            Header::new(Algorithm::RS256),
            EncodingKey::from_rsa_pem(&pem("rs256.key.pem")).expect("rsa"),
        ),
        Signer::Es256 => (
            Header::new(Algorithm::ES256),
            EncodingKey::from_ec_pem(&pem("es256.key.pem")).expect("ec"),
        ),
        Signer::EdDsa => (
            Header::new(Algorithm::EdDSA),
            EncodingKey::from_ed_pem(&pem("eddsa.key.pem")).expect("ed"),
        ),
    };
    if matches!(signer, Signer::Rs256Jwks) {
        header.kid = Some("rsa-1".into());
    }
    jsonwebtoken::encode(&header, &claims, &key).expect("mint")
}

fn claims(scope: &str) -> Value {
    json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": "ann", "scope": scope,
        "exp": chrono::Utc::now().timestamp() + 300,
    })
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn sync_body(doc: &str) -> Value {
    sync_payload(doc, "title", json!("t"), 0, "ann", "2026-03-01T10:00:00Z")
}

async fn post_sync(factory: &Factory, token: Option<&str>, body: &Value) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(factory.url("/v1/properties/sync"))
        .json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("send")
}

async fn get(factory: &Factory, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut request = reqwest::Client::new().get(factory.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("send")
}

fn grpc_sync(
    doc: &str,
    value: &str,
    token: Option<&str>,
) -> tonic::Request<pb::SyncPropertyRequest> {
    let mut request = tonic::Request::new(pb::SyncPropertyRequest {
        document_id: doc.into(),
        property: "title".into(),
        value: Some(prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(value.into())),
        }),
        base_revision: 0,
        author_id: "ann".into(),
        updated_at: Some(prost_types::Timestamp {
            seconds: 1_770_000_000,
            nanos: 0,
        }),
        request_id: String::new(),
    });
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().expect("ascii");
        request.metadata_mut().insert("authorization", value);
    }
    request
}

#[tokio::test]
async fn write_routes_need_a_valid_token_with_the_write_scope() {
    let nats = Nats::start().await;
    let (factory, _dir) = start_with_config(&nats, &auth_config()).await;

    let write = claims("factory:read factory:write");
    let expired = with(
        write.clone(),
        "exp",
        json!(chrono::Utc::now().timestamp() - 120),
    );
    let refused = [
        ("missing", None, 401, "Bearer"),
        (
            "expired",
            Some(mint(Signer::Hs256, expired.clone())),
            401,
            "invalid_token",
        ),
        (
            "wrong audience",
            Some(mint(
                Signer::Es256,
                with(write.clone(), "aud", json!("the-vault")),
            )),
            401,
            "invalid_token",
        ),
        (
            "wrong issuer",
            Some(mint(
                Signer::EdDsa,
                with(write.clone(), "iss", json!("mallory")),
            )),
            401,
            "invalid_token",
        ),
        (
            "unknown key",
            Some(mint(Signer::Stranger, write.clone())),
            401,
            "invalid_token",
        ),
        (
            "read scope only",
            Some(mint(Signer::EdDsa, claims("factory:read"))),
            403,
            "insufficient_scope",
        ),
    ];
    for (case, token, status, challenge) in &refused {
        let response = post_sync(&factory, token.as_deref(), &sync_body("doc-auth")).await;
        assert_eq!(response.status().as_u16(), *status, "{case}");
        let header = response
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(header.contains(challenge), "{case}: {header}");
        let body: Value = response.json().await.expect("json");
        let code = if *status == 401 {
            "unauthenticated"
        } else {
            "permission_denied"
        };
        assert_eq!(body["error"]["code"], code, "{case}: {body}");
    }

    // Every kind of configured key signs a token that is accepted.
    for (n, signer) in [
        Signer::Hs256,
        Signer::Rs256Jwks,
        Signer::Es256,
        Signer::EdDsa,
    ]
    .into_iter()
    .enumerate()
    {
        let token = mint(signer, write.clone());
        let response = post_sync(&factory, Some(&token), &sync_body(&format!("doc-ok-{n}"))).await;
        assert!(
            response.status().is_success(),
            "signer {n}: {}",
            response.status()
        );
    }

    // Reads need the read scope; health, readiness and metrics need nothing.
    let reader = mint(Signer::Hs256, claims("factory:read"));
    let path = "/v1/documents/doc-ok-0/properties";
    assert_eq!(get(&factory, path, None).await.status(), 401);
    assert_eq!(get(&factory, path, Some(&reader)).await.status(), 200);
    let no_scope = mint(Signer::Hs256, claims("profile"));
    assert_eq!(get(&factory, path, Some(&no_scope)).await.status(), 403);
    assert_eq!(get(&factory, "/healthz", None).await.status(), 200);
    assert_eq!(get(&factory, "/readyz", None).await.status(), 200);
    let metrics = reqwest::get(format!("http://{}/metrics", factory.metrics))
        .await
        .expect("metrics");
    assert_eq!(metrics.status(), 200);
    // Admin routes take the write scope unless an admin scope is set.
    let writer = mint(Signer::Hs256, write.clone());
    assert_eq!(
        get(&factory, "/admin/log-filter", Some(&reader))
            .await
            .status(),
        403
    );
    assert_eq!(
        get(&factory, "/admin/log-filter", Some(&writer))
            .await
            .status(),
        200
    );

    // The same over gRPC.
    let mut grpc = pb::conch_client::ConchClient::connect(format!("http://{}", factory.grpc))
        .await
        .expect("grpc");
    for (case, token, _, _) in &refused {
        let status = grpc
            .sync_property(grpc_sync("doc-grpc-auth", "x", token.as_deref()))
            .await
            .expect_err(case);
        let code = if case.starts_with("read scope") {
            Code::PermissionDenied
        } else {
            Code::Unauthenticated
        };
        assert_eq!(status.code(), code, "{case}: {status:?}");
    }
    let applied = grpc
        .sync_property(grpc_sync("doc-grpc-auth", "x", Some(&writer)))
        .await
        .expect("a good token is accepted");
    assert_eq!(
        applied.into_inner().outcome,
        pb::SyncOutcome::Applied as i32
    );
    let mut read = tonic::Request::new(pb::GetPropertiesRequest {
        document_id: "doc-grpc-auth".into(),
    });
    read.metadata_mut().insert(
        "authorization",
        format!("Bearer {reader}").parse().expect("ascii"),
    );
    let got = grpc.get_properties(read).await.expect("read scope reads");
    assert_eq!(got.into_inner().properties.len(), 1);
    let unauthenticated_read = grpc
        .get_properties(pb::GetPropertiesRequest {
            document_id: "doc-grpc-auth".into(),
        })
        .await
        .expect_err("no token");
    assert_eq!(unauthenticated_read.code(), Code::Unauthenticated);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", factory.grpc))
        .expect("endpoint")
        .connect()
        .await
        .expect("channel");
    let health = tonic_health::pb::health_client::HealthClient::new(channel);
    // Open without a token (health follows readiness within its poll).
    wait_until(Duration::from_secs(5), || {
        let mut health = health.clone();
        async move {
            health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .is_ok_and(|r| r.into_inner().status == 1)
        }
    })
    .await;

    // The reason is logged; the token never is.
    let refusals = factory.logs_containing("request refused");
    assert!(
        refusals.iter().any(|l| l.contains("token expired")),
        "{refusals:?}"
    );
    for (_, token, _, _) in &refused {
        if let Some(token) = token {
            assert!(factory.logs_containing(token).is_empty(), "token in logs");
        }
    }
}

#[tokio::test]
async fn every_limit_answers_with_its_status() {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let config = r#"
[limits]
max_http_body_bytes = 1024
max_grpc_message_bytes = 1024
max_envelope_bytes = 2048
max_concurrent_requests = 2
request_timeout = "500ms"
"#;
    let (factory, _dir) = start_with_config(&nats, config).await;
    let big = "x".repeat(2000);

    // Body and message size.
    let response = post_sync(
        &factory,
        None,
        &sync_payload(
            "doc-big",
            "title",
            json!(big),
            0,
            "ann",
            "2026-03-01T10:00:00Z",
        ),
    )
    .await;
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
    let mut grpc = pb::conch_client::ConchClient::connect(format!("http://{}", factory.grpc))
        .await
        .expect("grpc");
    let status = grpc
        .sync_property(grpc_sync("doc-big", &big, None))
        .await
        .expect_err("too large");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // Requests within the limits pass.
    assert!(
        post_sync(&factory, None, &sync_body("doc-small"))
            .await
            .status()
            .is_success()
    );
    grpc.sync_property(grpc_sync("doc-small-grpc", "x", None))
        .await
        .expect("small message");

    // An envelope over the limit is dead-lettered unread, with its reason.
    let oversized = envelope(
        "coordination.property_sync.requested",
        "doc-huge",
        &sync_payload(
            "doc-huge",
            "title",
            json!("y".repeat(3000)),
            0,
            "ann",
            "2026-03-01T10:00:00Z",
        ),
    );
    publish(&js, REQUESTED, &oversized).await;
    let letters = exactly(&js, "choco:dlq", "choco.dlq.>", 1).await;
    assert_eq!(
        letters[0].header("Choco-Dlq-Reason").as_deref(),
        Some("envelope_too_large")
    );

    // A hung dependency: NATS stops answering, so syncs hang in the room.
    nats.server.freeze();
    let hanging: Vec<_> = (0..2)
        .map(|n| {
            let url = factory.url("/v1/properties/sync");
            tokio::spawn(async move {
                reqwest::Client::new()
                    .post(url)
                    .json(&sync_body(&format!("doc-hang-{n}")))
                    .send()
                    .await
                    .expect("send")
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Both slots are taken: HTTP and gRPC are refused at once, probes are not.
    let busy = post_sync(&factory, None, &sync_body("doc-busy")).await;
    assert_eq!(busy.status(), 429);
    assert_eq!(
        busy.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let status = grpc
        .sync_property(grpc_sync("doc-busy", "x", None))
        .await
        .expect_err("busy");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_ne!(get(&factory, "/healthz", None).await.status(), 429);
    assert_eq!(get(&factory, "/healthz", None).await.status(), 200);
    // Readiness is outside the limits too (503 is fair: NATS is frozen).
    assert_ne!(get(&factory, "/readyz", None).await.status(), 429);
    // The hung ones time out.
    for request in hanging {
        let response = request.await.expect("join");
        assert_eq!(response.status(), 504);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["error"]["code"], "deadline_exceeded", "{body}");
    }
    let status = grpc
        .sync_property(grpc_sync("doc-slow", "x", None))
        .await
        .expect_err("times out");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    nats.server.unfreeze();

    // Once the dependency answers again, so does the room.
    wait_until(Duration::from_secs(10), || async {
        post_sync(&factory, None, &sync_body("doc-after"))
            .await
            .status()
            .is_success()
    })
    .await;
}

#[tokio::test]
async fn a_bad_auth_or_limit_setting_refuses_start_naming_the_key() {
    let cases = [
        (
            format!(
                "[auth]\npublic_key_files = [{:?}]\n",
                fixture("es256.pub.pem")
            ),
            "auth.issuer",
        ),
        (
            format!(
                "[auth]\nissuer = \"i\"\naudience = \"a\"\npublic_key_files = [{:?}]\n",
                fixture("README.md")
            ),
            "auth.public_key_files[0]",
        ),
        (
            "[auth]\nissuer = \"i\"\naudience = \"a\"\njwks_file = \"/nonexistent/jwks.json\"\n"
                .to_string(),
            "auth.jwks_file",
        ),
        (
            "[limits]\nmax_concurrent_requests = 0\n".to_string(),
            "limits.max_concurrent_requests",
        ),
    ];
    for (config, key) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("factory.toml");
        std::fs::write(&path, &config).expect("write");
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_choco-factory"))
            .args(["--config", path.to_str().expect("utf-8"), "config", "check"])
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        // `config check` answers with 1 for a bad configuration (its
        // input); `serve` refuses the same with 2.
        assert_eq!(output.status.code(), Some(1), "{config}: {stderr}");
        assert!(stderr.contains(key), "{key} not named: {stderr}");
    }
}
