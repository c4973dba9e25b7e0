//! The configuration's unit tests.

use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};

use super::secrets::*;
use super::*;

fn builtin() -> FactoryConfig {
    Figment::new()
        .merge(Serialized::defaults(FactoryConfig::default()))
        .merge(Toml::string(BUILTIN_ROOMS_TOML))
        .extract()
        .expect("the built-in table parses")
}

#[test]
fn builtin_table_is_the_port_table() {
    let config = validate(builtin(), None).expect("valid");
    let conch = config
        .rooms
        .iter()
        .find(|r| r.name == "conch")
        .expect("conch");
    assert_eq!(conch.label, "Fudge Room");
    assert_eq!(conch.stream, "choco:events:coordination");
    assert_eq!(conch.subject_base, "choco.events.coordination.");
    assert_eq!(conch.grpc_addr.port(), 7077);
    assert_eq!(conch.durable_name, "choco-conch");
    assert_eq!(config.rooms.len(), 4);
}

#[test]
fn two_rooms_on_one_port_name_both_keys() {
    let mut factory = builtin();
    factory.rooms.get_mut("winnower").expect("winnower").enabled = true;
    factory.rooms.get_mut("conch").expect("conch").grpc_port = Some(8086);
    let err = validate(factory, None).expect_err("conflict");
    let text = err.to_string();
    assert!(text.contains("rooms.winnower.http_port"), "{text}");
    assert!(text.contains("8086"), "{text}");
}

#[test]
fn disabled_rooms_may_share_ports() {
    let mut factory = builtin();
    factory.rooms.get_mut("conch").expect("conch").grpc_port = Some(8086);
    validate(factory, Some(&["conch".to_string()])).expect("winnower is off");
}

#[test]
fn malformed_subjects_are_refused() {
    for bad in [
        "choco.events.coordination",
        "choco..x.>",
        "choco.*.x.>",
        "a b.>",
        ">",
    ] {
        let mut factory = builtin();
        factory
            .rooms
            .get_mut("conch")
            .expect("conch")
            .subject_prefix = Some(bad.into());
        let err = validate(factory, None).expect_err(bad).to_string();
        assert!(
            err.starts_with("rooms.conch.subject_prefix"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn nats_url_takes_a_list_as_a_string_or_an_array() {
    let parse = |toml: &str| -> Result<ValidatedConfig, ConfigError> {
        let factory: FactoryConfig = Figment::from(Serialized::defaults(builtin()))
            .merge(Toml::string(toml))
            .extract()
            .map_err(ConfigError::from)?;
        validate(factory, None)
    };
    let string = parse("[nats]\nurl = \"nats://a:4222, nats://b:4223,tls://u:p@c:4224\"")
        .expect("comma-separated");
    assert_eq!(
        string.factory.nats.url.as_slice(),
        ["nats://a:4222", "nats://b:4223", "tls://u:p@c:4224"]
    );
    assert_eq!(
        string.factory.nats.url.redacted(),
        "nats://a:4222,nats://b:4223,tls://<redacted>@c:4224"
    );
    let array = parse("[nats]\nurl = [\"nats://a:4222\", \"nats://b:4223\"]").expect("array");
    assert_eq!(
        array.factory.nats.url.as_slice(),
        ["nats://a:4222", "nats://b:4223"]
    );
    let err = parse("[nats]\nurl = []").map(|_| ()).expect_err("empty");
    assert!(
        err.to_string().starts_with("nats.url: names no server"),
        "{err}"
    );
    let err = parse("[nats]\nurl = \"nats://a:4222,,nats://b:1\"")
        .map(|_| ())
        .expect_err("hole");
    assert!(err.to_string().starts_with("nats.url:"), "{err}");
    let err = parse("[nats]\nurl = \"nats://a:notaport\"")
        .map(|_| ())
        .expect_err("port");
    assert!(err.to_string().contains("nats://a:notaport"), "{err}");
}

#[test]
fn streams_settings_resolve_per_room_and_for_the_dlq() {
    let mut factory = builtin();
    factory.streams.replicas = 3;
    factory.streams.dlq.max_age = Some(Duration::from_secs(86_400));
    factory
        .rooms
        .get_mut("conch")
        .expect("conch")
        .streams
        .replicas = Some(5);
    let config = validate(factory, None).expect("valid");
    let conch = config
        .rooms
        .iter()
        .find(|r| r.name == "conch")
        .expect("conch");
    assert_eq!(
        (conch.streams.replicas, conch.streams.key.as_str()),
        (5, "rooms.conch.streams")
    );
    let mould = config
        .rooms
        .iter()
        .find(|r| r.name == "mould")
        .expect("mould");
    assert_eq!(
        (mould.streams.replicas, mould.streams.key.as_str()),
        (3, "streams")
    );
    assert_eq!(conch.dlq, config.dlq_storage);
    assert_eq!(config.dlq_storage.max_age, Duration::from_secs(86_400));
    assert_eq!(config.bucket_storage.replicas, 3);
    let mut factory = builtin();
    factory.streams.replicas = 0;
    let err = validate(factory, None).map(|_| ()).expect_err("0 replicas");
    assert!(
        err.to_string()
            .starts_with("streams.replicas: 0 is not 1–5"),
        "{err}"
    );
}

#[test]
fn connection_and_retention_limits_are_checked_against_each_other() {
    let mut factory = builtin();
    factory.limits.idle_timeout = Duration::from_secs(5);
    let err = validate(factory, None)
        .map(|_| ())
        .expect_err("request >= idle");
    assert!(
        err.to_string().starts_with("limits.request_timeout:"),
        "{err}"
    );
    let mut factory = builtin();
    factory.limits.max_connections_per_listener = factory.limits.max_connections + 1;
    let err = validate(factory, None)
        .map(|_| ())
        .expect_err("listener > process");
    assert!(
        err.to_string()
            .starts_with("limits.max_connections_per_listener:"),
        "{err}"
    );
    let mut factory = builtin();
    factory
        .rooms
        .get_mut("mould")
        .expect("mould")
        .streams
        .max_age = Some(Duration::from_secs(60));
    let err = validate(factory, None)
        .map(|_| ())
        .expect_err("age < window");
    assert!(
        err.to_string().starts_with("rooms.mould.streams.max_age:"),
        "{err}"
    );
}

#[test]
fn unknown_rooms_are_refused() {
    let mut factory = builtin();
    factory.rooms.insert(
        "conchh".into(),
        RoomConfig {
            enabled: false,
            service: None,
            label: None,
            domain: None,
            subject_prefix: None,
            stream: None,
            bind: None,
            http_port: None,
            grpc_port: None,
            metrics_port: None,
            consumer: ConsumerOverrides::default(),
            streams: StreamOverrides::default(),
            publish_previous_major: false,
            settings: Default::default(),
        },
    );
    let err = validate(factory, None).expect_err("unknown").to_string();
    assert!(err.starts_with("rooms.conchh: unknown room"), "{err}");
    let err = validate(builtin(), Some(&["nope".into()]))
        .expect_err("unknown")
        .to_string();
    assert!(err.contains("--rooms") && err.contains("nope"), "{err}");
}

#[test]
fn room_consumer_overrides_only_what_they_set() {
    let mut factory = builtin();
    factory
        .rooms
        .get_mut("conch")
        .expect("conch")
        .consumer
        .max_deliver = Some(7);
    let config = validate(factory, None).expect("valid");
    let conch = config
        .rooms
        .iter()
        .find(|r| r.name == "conch")
        .expect("conch");
    assert_eq!(conch.consumer.max_deliver, 7);
    assert_eq!(conch.consumer.batch, 10);
}

fn with_nats(edit: impl FnOnce(&mut NatsConfig)) -> Result<ValidatedConfig, ConfigError> {
    let mut factory = builtin();
    edit(&mut factory.nats);
    validate(factory, None)
}

#[test]
fn secrets_never_show_in_debug_or_serialisation() {
    let config = with_nats(|nats| {
        nats.user = Some("factory".into());
        nats.password = Some(Secret::new("hunter2-cocoa"));
    })
    .expect("valid");
    let debug = format!("{config:?}");
    assert!(!debug.contains("hunter2-cocoa"), "{debug}");
    assert!(debug.contains(REDACTED), "{debug}");
    let json = serde_json::to_string(&config.factory).expect("json");
    assert!(!json.contains("hunter2-cocoa"), "{json}");
    assert_eq!(
        config.nats_auth,
        NatsAuth::UserPassword {
            user: "factory".into(),
            password: Secret::new("hunter2-cocoa"),
            from: "nats.password",
        }
    );
}

#[test]
fn a_secret_of_another_type_is_refused_without_quoting_it() {
    let err = Figment::new()
        .merge(Serialized::defaults(FactoryConfig::default()))
        .merge(Toml::string("[nats]\ntoken = 987654321\n"))
        .extract::<FactoryConfig>()
        .expect_err("not a string")
        .to_string();
    assert!(!err.contains("987654321"), "{err}");
    assert!(err.contains("quote it"), "{err}");
}

#[test]
fn one_way_to_authenticate_and_each_secret_once() {
    let err = with_nats(|nats| {
        nats.token = Some(Secret::new("t"));
        nats.user = Some("u".into());
    })
    .expect_err("two ways")
    .to_string();
    assert!(err.starts_with("nats.user: nats.token is set too"), "{err}");

    let err = with_nats(|nats| {
        nats.token = Some(Secret::new("t"));
        nats.token_file = Some("token".into());
    })
    .expect_err("inline and file")
    .to_string();
    assert!(
        err.starts_with("nats.token_file: nats.token is set too"),
        "{err}"
    );

    let err = with_nats(|nats| nats.password = Some(Secret::new("p")))
        .expect_err("no user")
        .to_string();
    assert!(err.starts_with("nats.user: is required"), "{err}");

    let err = with_nats(|nats| nats.user = Some("u".into()))
        .expect_err("no password")
        .to_string();
    assert!(err.starts_with("nats.password: is required"), "{err}");
}

#[test]
fn a_bad_nkey_seed_is_refused_without_quoting_it() {
    for seed in ["SUnotaseed", "not even close"] {
        let err = with_nats(|nats| nats.nkey_seed = Some(Secret::new(seed)))
            .expect_err(seed)
            .to_string();
        assert!(
            err.starts_with("nats.nkey_seed: is not a user nkey seed"),
            "{err}"
        );
        assert!(!err.contains(seed), "{err}");
    }
    // An account seed is a seed, but not one a client logs in with.
    let account = nkeys::KeyPair::new_account().seed().expect("seed");
    let err = with_nats(|nats| nats.nkey_seed = Some(Secret::new(account.clone())))
        .expect_err("account seed")
        .to_string();
    assert!(!err.contains(&account), "{err}");
    let user = nkeys::KeyPair::new_user().seed().expect("seed");
    let config = with_nats(|nats| nats.nkey_seed = Some(Secret::new(user))).expect("user");
    assert!(matches!(config.nats_auth, NatsAuth::NKey { .. }));
}

#[test]
fn secret_files_lose_one_trailing_line_break() {
    let dir = std::env::temp_dir().join(format!("choco-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("token");
    std::fs::write(&file, "abc \r\n").expect("write");
    let config = with_nats(|nats| nats.token_file = Some(file.clone())).expect("valid");
    assert_eq!(
        config.nats_auth,
        NatsAuth::Token {
            token: Secret::new("abc "),
            from: "nats.token_file",
        }
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tls_keys_come_in_pairs() {
    let err = with_nats(|nats| nats.tls.cert_file = Some("c.pem".into()))
        .expect_err("no key")
        .to_string();
    assert!(err.starts_with("nats.tls.key_file: is required"), "{err}");
    let mut factory = builtin();
    factory.tls.client_ca_file = Some("ca.pem".into());
    let err = validate(factory, None).expect_err("no cert").to_string();
    assert!(err.starts_with("tls.client_ca_file: needs"), "{err}");
}

#[test]
fn urls_and_secret_keys_are_redacted_for_show() {
    assert_eq!(
        redact_url("nats://a:b@h:4222, tls://tok@h2:4222,nats://h3:4222"),
        "nats://<redacted>@h:4222, tls://<redacted>@h2:4222,nats://h3:4222"
    );
    assert_eq!(redact_url("u:p@h:4222"), "<redacted>@h:4222");
    for secret in [
        "nats.token",
        "nats.password",
        "nats.nkey_seed",
        "nats.passwrod",
        "rooms.x.settings.api_key",
    ] {
        assert!(is_secret_key(secret), "{secret}");
    }
    for shown in [
        "nats.token_file",
        "nats.credentials_file",
        "nats.tls.key_file",
        "nats.user",
        "nats.url",
    ] {
        assert!(!is_secret_key(shown), "{shown}");
    }
}

#[test]
fn pinned_ordering_is_per_room_and_its_ttl_must_outlast_four_heartbeats() {
    let mut factory = builtin();
    let conch = factory.rooms.get_mut("conch").expect("conch");
    conch.consumer.ordering = Some(ReplicaOrdering::Pinned);
    conch.consumer.pinned_ttl = Some(Duration::from_secs(8));
    conch.consumer.heartbeat = Some(Duration::from_secs(2));
    let config = validate(factory, None).expect("valid");
    for room in &config.rooms {
        let wanted = if room.name == "conch" {
            ReplicaOrdering::Pinned
        } else {
            ReplicaOrdering::PerProcess
        };
        assert_eq!(room.consumer.ordering, wanted, "{}", room.name);
    }
    let conch = config
        .rooms
        .iter()
        .find(|r| r.name == "conch")
        .expect("conch");
    // Pulls expire within half the ttl, so a live replica keeps its pin.
    assert_eq!(
        conch.consumer.pull_expiry(Some(conch.consumer.pinned_ttl)),
        Duration::from_secs(4)
    );
    assert_eq!(conch.consumer.pull_expiry(None), Duration::from_secs(12));

    let mut factory = builtin();
    factory.consumer.ordering = ReplicaOrdering::Pinned;
    factory.consumer.pinned_ttl =
        factory.consumer.heartbeat.saturating_mul(4) - Duration::from_secs(1);
    let err = validate(factory, None).expect_err("short ttl").to_string();
    assert!(err.starts_with("consumer.pinned_ttl"), "{err}");
}

#[test]
fn a_zero_handler_timeout_is_refused_and_rooms_may_override_it() {
    let mut factory = builtin();
    factory.consumer.handler_timeout = Duration::ZERO;
    let err = validate(factory, None).expect_err("zero").to_string();
    assert!(err.starts_with("consumer.handler_timeout"), "{err}");

    let mut factory = builtin();
    let conch = factory.rooms.get_mut("conch").expect("conch");
    conch.consumer.handler_timeout = Some(Duration::ZERO);
    let err = validate(factory, None).expect_err("zero").to_string();
    assert!(
        err.starts_with("rooms.conch.consumer.handler_timeout"),
        "{err}"
    );

    let mut factory = builtin();
    let conch = factory.rooms.get_mut("conch").expect("conch");
    conch.consumer.handler_timeout = Some(Duration::from_secs(5));
    let config = validate(factory, None).expect("valid");
    let timeout = |name: &str| {
        config
            .rooms
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.consumer.handler_timeout)
    };
    assert_eq!(timeout("conch"), Some(Duration::from_secs(5)));
    assert_eq!(timeout("mould"), Some(Duration::from_secs(30)));
}
