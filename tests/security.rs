//! Who may talk to it: the NATS connection over TLS (custom CA, client
//! certificate) and with every kind of credentials, against a real
//! nats-server set up by the test; refused credentials; secrets kept out of
//! `config show`; the rooms' HTTP and gRPC listeners over (mutual) TLS.
//!
//! Every certificate, key, nkey and JWT is generated here.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use choco_factory::cocoa_butter::nats_server::{self, ManagedNats};
use common::*;
use http_body_util::BodyExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A test CA with a server certificate (localhost, 127.0.0.1) and a client
/// certificate, as PEM files in a temporary folder.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let write = |name: &str, text: String| {
            std::fs::write(dir.path().join(name), text).expect("write PEM");
        };
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "choco-factory test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        write("ca.pem", ca.self_signed(&ca_key).expect("CA").pem());
        let issuer = Issuer::new(ca, ca_key);

        for (name, sans, usage) in [
            (
                "server",
                vec!["localhost".to_string(), "127.0.0.1".to_string()],
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            (
                "client",
                vec!["choco-factory".to_string()],
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
        ] {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(sans).expect("params");
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).expect("sign");
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}-key.pem"), key.serialize_pem());
        }
        // Another CA's client certificate: must be refused where ours is not.
        let stranger =
            rcgen::generate_simple_self_signed(vec!["stranger".to_string()]).expect("stranger");
        write("stranger.pem", stranger.cert.pem());
        write("stranger-key.pem", stranger.signing_key.serialize_pem());
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn path_str(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// A rustls client trusting the test CA, presenting `identity`
    /// ("client", "stranger") or no certificate.
    fn client_config(&self, identity: Option<&str>) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(self.path("ca.pem")).expect("ca") {
            roots.add(cert.expect("ca cert")).expect("root");
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
        match identity {
            Some(name) => {
                let chain = CertificateDer::pem_file_iter(self.path(&format!("{name}.pem")))
                    .expect("cert")
                    .collect::<Result<Vec<_>, _>>()
                    .expect("certs");
                let key = PrivateKeyDer::from_pem_file(self.path(&format!("{name}-key.pem")))
                    .expect("key");
                builder.with_client_auth_cert(chain, key).expect("identity")
            }
            None => builder.with_no_client_auth(),
        }
    }
}

/// A nats-server with `config` added to its configuration file.
struct SecuredNats {
    server: ManagedNats,
    _dir: tempfile::TempDir,
}

impl SecuredNats {
    async fn start(config: &str) -> SecuredNats {
        let dir = tempfile::tempdir().expect("temp dir");
        let binary = nats_server::find_binary().expect("nats-server (run scripts/setup.sh)");
        let server = match ManagedNats::start_configured(binary, dir.path(), 0, false, config).await
        {
            Ok(server) => server,
            Err(err) => {
                let log =
                    std::fs::read_to_string(dir.path().join("nats-server.log")).unwrap_or_default();
                panic!("nats-server does not start: {err}\n{log}\nconfig:\n{config}");
            }
        };
        SecuredNats { server, _dir: dir }
    }

    fn url(&self) -> String {
        self.server.url()
    }
}

/// The conch on ephemeral ports against `nats_url`, plus `extra`.
fn env_with(nats_url: &str, extra: &[(&str, String)]) -> Vec<(String, String)> {
    let mut env = conch_env(nats_url);
    env.push(("CHOCO_LOG__FORMAT".into(), "json".into()));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    env
}

async fn start_conch(env: Vec<(String, String)>) -> Factory {
    Factory::start_with(env, &["serve", "--rooms", "conch"]).await
}

/// `/readyz` as JSON, over plain HTTP.
async fn readyz(factory: &Factory) -> Value {
    reqwest::get(factory.url("/readyz"))
        .await
        .expect("readyz answers")
        .json()
        .await
        .expect("json")
}

/// Connected to NATS, bound and serving: ready.
async fn assert_ready(factory: &Factory) {
    factory.wait_ready().await;
    let ready = readyz(factory).await;
    assert_eq!(ready["nats_connected"], true, "{ready}");
}

/// Stays not ready for `period`, never connected to NATS.
async fn assert_never_connected(factory: &Factory, period: Duration) {
    let until = Instant::now() + period;
    while Instant::now() < until {
        let ready = readyz(factory).await;
        assert_eq!(ready["ready"], false, "{ready}");
        assert_eq!(ready["nats_connected"], false, "{ready}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_for_log(factory: &Factory, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(line) = factory.logs_containing(needle).into_iter().next() {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no log line contains {needle:?}; logs: {:#?}",
            factory.logs.lock().expect("logs")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn write_file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path.display().to_string()
}

#[tokio::test]
async fn nats_over_mutual_tls_with_a_custom_ca() {
    let pki = Pki::new();
    let nats = SecuredNats::start(&format!(
        "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  timeout: 2\n}}\n",
        pki.path_str("server.pem"),
        pki.path_str("server-key.pem"),
        pki.path_str("ca.pem"),
    ))
    .await;

    let factory = start_conch(env_with(
        &nats.url(),
        &[
            ("CHOCO_NATS__TLS__CA_FILE", pki.path_str("ca.pem")),
            ("CHOCO_NATS__TLS__CERT_FILE", pki.path_str("client.pem")),
            ("CHOCO_NATS__TLS__KEY_FILE", pki.path_str("client-key.pem")),
        ],
    ))
    .await;
    assert_ready(&factory).await;

    // Trusting the CA but presenting no certificate: the server refuses.
    let no_identity = start_conch(env_with(
        &nats.url(),
        &[("CHOCO_NATS__TLS__CA_FILE", pki.path_str("ca.pem"))],
    ))
    .await;
    // A certificate from a CA the server does not trust: refused too.
    let stranger = start_conch(env_with(
        &nats.url(),
        &[
            ("CHOCO_NATS__TLS__CA_FILE", pki.path_str("ca.pem")),
            ("CHOCO_NATS__TLS__CERT_FILE", pki.path_str("stranger.pem")),
            (
                "CHOCO_NATS__TLS__KEY_FILE",
                pki.path_str("stranger-key.pem"),
            ),
        ],
    ))
    .await;
    // Not trusting the server's CA (the system roots do not know it).
    let untrusting = start_conch(env_with(
        &nats.url(),
        &[
            ("CHOCO_NATS__TLS__CA_FILE", pki.path_str("stranger.pem")),
            ("CHOCO_NATS__TLS__CERT_FILE", pki.path_str("client.pem")),
            ("CHOCO_NATS__TLS__KEY_FILE", pki.path_str("client-key.pem")),
        ],
    ))
    .await;
    assert_never_connected(&no_identity, Duration::from_secs(3)).await;
    assert_never_connected(&stranger, Duration::from_millis(500)).await;
    assert_never_connected(&untrusting, Duration::from_millis(500)).await;
    // A rejected certificate reaches the client as an I/O error; with TLS
    // configured the log says where to look.
    wait_for_log(&untrusting, "nats.tls.ca_file").await;
}

#[tokio::test]
async fn nats_tls_required_refuses_a_plain_server() {
    let nats = Nats::start().await;
    let factory = start_conch(env_with(
        &nats.url(),
        &[("CHOCO_NATS__TLS__REQUIRED", "true".into())],
    ))
    .await;
    assert_never_connected(&factory, Duration::from_secs(2)).await;
}

/// An nkey pair's JWT, signed by `issuer` (nats-io/jwt v2 layout).
fn sign_jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: Value) -> String {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let issued = chrono::Utc::now().timestamp();
    let claims = json!({
        "jti": uuid::Uuid::now_v7().simple().to_string().to_uppercase(),
        "iat": issued,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let body = b64(claims.to_string().as_bytes());
    let signature = issuer
        .sign(format!("{header}.{body}").as_bytes())
        .expect("sign");
    format!("{header}.{body}.{}", b64(&signature))
}

/// An operator, an account with JetStream and a user of it: the server's
/// configuration (operator mode, memory resolver) and the user's `.creds`.
fn operator_mode() -> (String, String) {
    let operator = nkeys::KeyPair::new_operator();
    // JetStream needs a system account in operator mode.
    let system = nkeys::KeyPair::new_account();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt = sign_jwt(
        &operator,
        &operator.public_key(),
        "choco-test-operator",
        json!({ "system_account": system.public_key(), "type": "operator", "version": 2 }),
    );
    let system_jwt = sign_jwt(
        &operator,
        &system.public_key(),
        "SYS",
        json!({ "type": "account", "version": 2 }),
    );
    let unlimited = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        // JetStream is on for an account whose storage limits are not zero.
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let account_jwt = sign_jwt(
        &operator,
        &account.public_key(),
        "CHOCO",
        json!({ "limits": unlimited, "type": "account", "version": 2 }),
    );
    let user_jwt = sign_jwt(
        &account,
        &user.public_key(),
        "choco-factory",
        json!({
            "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
            "type": "user", "version": 2,
        }),
    );
    let server = format!(
        "operator: {operator_jwt}\nsystem_account: {sys}\nresolver: MEMORY\n\
         resolver_preload: {{\n  {sys}: {system_jwt}\n  {}: {account_jwt}\n}}\n",
        account.public_key(),
        sys = system.public_key(),
    );
    let creds = format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().expect("seed")
    );
    (server, creds)
}

#[tokio::test]
async fn credentials_file_in_operator_mode() {
    let (server_config, creds) = operator_mode();
    let nats = SecuredNats::start(&server_config).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let creds_file = write_file(dir.path(), "factory.creds", &creds);

    let factory = start_conch(env_with(
        &nats.url(),
        &[("CHOCO_NATS__CREDENTIALS_FILE", creds_file)],
    ))
    .await;
    assert_ready(&factory).await;

    // No credentials at all: the server wants some, and the log says so.
    let anonymous = start_conch(env_with(&nats.url(), &[])).await;
    assert_never_connected(&anonymous, Duration::from_secs(1)).await;
    wait_for_log(
        &anonymous,
        "NATS requires credentials and none are configured",
    )
    .await;
}

#[tokio::test]
async fn nkey_seed_from_a_file() {
    let user = nkeys::KeyPair::new_user();
    let nats = SecuredNats::start(&format!(
        "authorization {{\n  users: [ {{ nkey: {} }} ]\n}}\n",
        user.public_key()
    ))
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let seed_file = write_file(
        dir.path(),
        "seed",
        &format!("{}\n", user.seed().expect("seed")),
    );
    let factory = start_conch(env_with(
        &nats.url(),
        &[("CHOCO_NATS__NKEY_SEED_FILE", seed_file)],
    ))
    .await;
    assert_ready(&factory).await;
}

#[tokio::test]
async fn token_inline_and_from_a_file() {
    // Digits only: taken verbatim, not as a number (which would lose the 0).
    let token = "0123456789";
    let nats = SecuredNats::start(&format!("authorization {{\n  token: \"{token}\"\n}}\n")).await;
    let inline = start_conch(env_with(
        &nats.url(),
        &[("CHOCO_NATS__TOKEN", token.to_string())],
    ))
    .await;
    assert_ready(&inline).await;

    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = write_file(dir.path(), "token", &format!("{token}\n"));
    let from_file = start_conch(env_with(
        &nats.url(),
        &[("CHOCO_NATS__TOKEN_FILE", token_file)],
    ))
    .await;
    assert_ready(&from_file).await;
}

const PASSWORD: &str = "cocoa-nibs-and-secrets";

async fn user_password_nats() -> SecuredNats {
    SecuredNats::start(&format!(
        "authorization {{\n  users: [ {{ user: factory, password: \"{PASSWORD}\" }} ]\n}}\n"
    ))
    .await
}

#[tokio::test]
async fn user_and_password_from_a_file() {
    let nats = user_password_nats().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let password_file = write_file(dir.path(), "password", &format!("{PASSWORD}\n"));
    let factory = start_conch(env_with(
        &nats.url(),
        &[
            ("CHOCO_NATS__USER", "factory".into()),
            ("CHOCO_NATS__PASSWORD_FILE", password_file),
        ],
    ))
    .await;
    assert_ready(&factory).await;
    assert!(
        factory.logs_containing(PASSWORD).is_empty(),
        "the password reached the logs"
    );
}

#[tokio::test]
async fn a_wrong_password_is_reported_not_hung() {
    let nats = user_password_nats().await;
    let wrong = "not-the-password";
    let factory = start_conch(env_with(
        &nats.url(),
        &[
            ("CHOCO_NATS__USER", "factory".into()),
            ("CHOCO_NATS__PASSWORD", wrong.into()),
        ],
    ))
    .await;
    // The room serves, says it is not ready, and the log says why.
    let line = wait_for_log(
        &factory,
        "NATS refused the credentials from nats.user and nats.password (authorization violation)",
    )
    .await;
    let json: Value = serde_json::from_str(&line).expect("json log line");
    assert_eq!(json["level"], "ERROR", "{line}");
    assert_never_connected(&factory, Duration::from_secs(1)).await;
    assert!(
        factory.logs_containing(wrong).is_empty(),
        "the password reached the logs"
    );

    // An operator command does not retry: it fails at once, naming the keys.
    let started = Instant::now();
    let output = tokio::process::Command::new(BIN)
        .args(["dlq", "list"])
        .env("CHOCO_NATS__URL", nats.url())
        .env("CHOCO_NATS__USER", "factory")
        .env("CHOCO_NATS__PASSWORD", wrong)
        .output()
        .await
        .expect("run dlq list");
    assert!(started.elapsed() < Duration::from_secs(15), "it hung");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("NATS refused the credentials from nats.user and nats.password"),
        "{stderr}"
    );
    assert!(!stderr.contains(wrong), "{stderr}");
}

#[tokio::test]
async fn config_show_never_prints_a_secret() {
    let dir = tempfile::tempdir().expect("temp dir");
    let seed = nkeys::KeyPair::new_user().seed().expect("seed");
    let config = write_file(
        dir.path(),
        "factory.toml",
        &format!(
            "[nats]\nnkey_seed = \"{seed}\"\nurl = \"nats://carol:url-secret@127.0.0.1:4222\"\n"
        ),
    );
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (
            vec![("CHOCO_NATS__TOKEN", "t0ken-value".into())],
            "t0ken-value",
        ),
        (
            vec![
                ("CHOCO_NATS__USER", "factory".into()),
                ("CHOCO_NATS__PASSWORD", PASSWORD.into()),
            ],
            PASSWORD,
        ),
        (vec![("CHOCO_CONFIG", config.clone())], seed.as_str()),
        (vec![("CHOCO_CONFIG", config.clone())], "url-secret"),
        // A misspelt key is shown before it is refused: hidden all the same.
        (
            vec![("CHOCO_NATS__PASSWROD", "typo-secret".into())],
            "typo-secret",
        ),
    ];
    for (env, secret) in cases {
        for json in [false, true] {
            let mut command = tokio::process::Command::new(BIN);
            command.args(["config", "show"]);
            if json {
                command.arg("--json");
            }
            let output = command
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .output()
                .await
                .expect("config show");
            let stdout = String::from_utf8_lossy(&output.stdout);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(stdout.contains("<redacted>"), "{env:?}: {stdout}");
            assert!(
                !stdout.contains(secret) && !stderr.contains(secret),
                "{env:?} (json: {json}) printed the secret: {stdout}{stderr}"
            );
        }
    }
}

#[tokio::test]
async fn missing_or_bad_secret_and_certificate_files_refuse_start() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("missing").display().to_string();
    let empty = write_file(dir.path(), "empty", "\n");
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        (
            "nats.token_file",
            vec![("CHOCO_NATS__TOKEN_FILE", missing.clone())],
        ),
        (
            "nats.token_file",
            vec![("CHOCO_NATS__TOKEN_FILE", empty.clone())],
        ),
        (
            "nats.password_file",
            vec![
                ("CHOCO_NATS__USER", "factory".into()),
                ("CHOCO_NATS__PASSWORD_FILE", missing.clone()),
            ],
        ),
        (
            "nats.credentials_file",
            vec![("CHOCO_NATS__CREDENTIALS_FILE", empty.clone())],
        ),
        (
            "nats.nkey_seed_file",
            vec![("CHOCO_NATS__NKEY_SEED_FILE", missing.clone())],
        ),
        (
            "nats.tls.ca_file",
            vec![("CHOCO_NATS__TLS__CA_FILE", missing.clone())],
        ),
        (
            "tls.key_file",
            vec![
                ("CHOCO_TLS__CERT_FILE", pki.path_str("server.pem")),
                // A certificate where the key should be.
                ("CHOCO_TLS__KEY_FILE", pki.path_str("ca.pem")),
            ],
        ),
        (
            "tls.key_file",
            vec![
                ("CHOCO_TLS__CERT_FILE", pki.path_str("server.pem")),
                // Some key, not the certificate's.
                ("CHOCO_TLS__KEY_FILE", pki.path_str("client-key.pem")),
            ],
        ),
    ];
    for (key, env) in cases {
        // Accepted by mistake, `serve` would run on: bound the wait.
        let serve = tokio::process::Command::new(BIN)
            .args(["serve", "--rooms", "conch"])
            .env("CHOCO_NATS__URL", "nats://127.0.0.1:1")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(20), serve)
            .await
            .unwrap_or_else(|_| panic!("{env:?} was accepted: serve kept running"))
            .expect("serve");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{env:?}: {stderr}");
        assert!(
            stderr.starts_with(&format!("choco-factory: {key}: ")),
            "{env:?} should name {key}: {stderr}"
        );
    }
}

/// GET `path` over HTTPS; the status and body, or why it failed.
async fn https_get(
    addr: SocketAddr,
    path: &str,
    config: rustls::ClientConfig,
) -> Result<(u16, String), String> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, "localhost")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn grpc_endpoint(addr: SocketAddr) -> tonic::transport::Endpoint {
    tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(3))
}

async fn grpc_health(channel: tonic::transport::Channel) -> Result<i32, tonic::Status> {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|response| response.into_inner().status)
}

#[tokio::test]
async fn http_and_grpc_listeners_serve_mutual_tls_only() {
    let pki = Pki::new();
    let nats = Nats::start().await;
    let factory = start_conch(env_with(
        &nats.url(),
        &[
            ("CHOCO_TLS__CERT_FILE", pki.path_str("server.pem")),
            ("CHOCO_TLS__KEY_FILE", pki.path_str("server-key.pem")),
            ("CHOCO_TLS__CLIENT_CA_FILE", pki.path_str("ca.pem")),
        ],
    ))
    .await;
    let listening = factory.logs_containing("room listening");
    assert!(
        listening
            .iter()
            .any(|line| line.contains(r#""tls":true"#) && line.contains(r#""mutual_tls":true"#)),
        "{listening:?}"
    );

    // /readyz over TLS with our client certificate.
    wait_until(Duration::from_secs(20), || async {
        https_get(factory.http, "/readyz", pki.client_config(Some("client")))
            .await
            .is_ok_and(|(status, _)| status == 200)
    })
    .await;
    let (status, body) = https_get(factory.http, "/readyz", pki.client_config(Some("client")))
        .await
        .expect("readyz over TLS");
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(body["ready"], true);

    // Plain text, no client certificate, another CA's certificate: refused.
    let plain = reqwest::get(factory.url("/readyz")).await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");
    for identity in [None, Some("stranger")] {
        let refused = https_get(factory.http, "/readyz", pki.client_config(identity)).await;
        assert!(refused.is_err(), "{identity:?} was answered: {refused:?}");
    }

    // gRPC health over TLS with our client certificate.
    let ca = std::fs::read(pki.path("ca.pem")).expect("ca");
    let identity = tonic::transport::Identity::from_pem(
        std::fs::read(pki.path("client.pem")).expect("cert"),
        std::fs::read(pki.path("client-key.pem")).expect("key"),
    );
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&ca))
        .domain_name("localhost");
    let channel = grpc_endpoint(factory.grpc)
        .tls_config(tls.clone().identity(identity))
        .expect("tls config")
        .connect()
        .await
        .expect("gRPC over TLS");
    // Health follows readiness every 250 ms: it may lag /readyz a little.
    wait_until(Duration::from_secs(5), || {
        let channel = channel.clone();
        async move {
            grpc_health(channel).await.expect("health over TLS") == ServingStatus::Serving as i32
        }
    })
    .await;

    // gRPC in plain text, or without a client certificate: refused.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", factory.grpc))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(3));
    let plain_health = match plain.connect().await {
        Ok(channel) => grpc_health(channel).await.map_err(|e| e.to_string()),
        Err(err) => Err(err.to_string()),
    };
    assert!(plain_health.is_err(), "plain gRPC was answered");
    let anonymous = match grpc_endpoint(factory.grpc).tls_config(tls) {
        Ok(endpoint) => match endpoint.connect().await {
            Ok(channel) => grpc_health(channel).await.map_err(|e| e.to_string()),
            Err(err) => Err(err.to_string()),
        },
        Err(err) => Err(err.to_string()),
    };
    assert!(
        anonymous.is_err(),
        "gRPC without a client certificate was answered"
    );

    // The metrics listener stays plain.
    let metrics = reqwest::get(format!("http://{}/metrics", factory.metrics))
        .await
        .expect("metrics");
    assert_eq!(metrics.status(), 200);
}

#[tokio::test]
async fn listener_tls_without_client_ca_serves_any_client() {
    let pki = Pki::new();
    let nats = Nats::start().await;
    let factory = start_conch(env_with(
        &nats.url(),
        &[
            ("CHOCO_TLS__CERT_FILE", pki.path_str("server.pem")),
            ("CHOCO_TLS__KEY_FILE", pki.path_str("server-key.pem")),
        ],
    ))
    .await;
    wait_until(Duration::from_secs(20), || async {
        https_get(factory.http, "/readyz", pki.client_config(None))
            .await
            .is_ok_and(|(status, _)| status == 200)
    })
    .await;
    let ca = std::fs::read(pki.path("ca.pem")).expect("ca");
    let channel = grpc_endpoint(factory.grpc)
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&ca))
                .domain_name("localhost"),
        )
        .expect("tls config")
        .connect()
        .await
        .expect("gRPC over TLS");
    wait_until(Duration::from_secs(5), || {
        let channel = channel.clone();
        async move {
            grpc_health(channel).await.expect("health over TLS") == ServingStatus::Serving as i32
        }
    })
    .await;
    assert!(reqwest::get(factory.url("/readyz")).await.is_err());
}
