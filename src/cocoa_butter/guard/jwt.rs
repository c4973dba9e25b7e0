//! Local verification of the bearer JWTs the platform's auth service mints:
//! signature against configured keys, then issuer, audience and expiry.
//! No call to the auth service is made, as the platform's other services do.
//!
//! Each key fixes its algorithm (an HS256 secret, an RSA key RS256, a P-256
//! key ES256, an Ed25519 key EdDSA), so a token cannot pick a weaker one by
//! its header: `alg` only selects among keys of that kind.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde_json::Value;

use super::config::{AuthConfig, SettingError};

/// Why a request's token was not accepted. The text goes to the caller and
/// to the log; it never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token (Authorization: Bearer <jwt>)")]
    Missing,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("no configured key verifies {0} tokens")]
    UnknownKey(String),
    #[error("bad token signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("token issued for another audience")]
    WrongAudience,
    #[error("token from an untrusted issuer")]
    WrongIssuer,
    #[error("token lacks the {0} claim")]
    MissingClaim(String),
    #[error("token lacks the scope {0:?}")]
    MissingScope(String),
}

impl AuthError {
    /// Everything but a missing scope means "who are you?" (401); a
    /// missing scope means "not you" (403).
    pub fn is_forbidden(&self) -> bool {
        matches!(self, AuthError::MissingScope(_))
    }
}

/// What a verified token says about its bearer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Principal {
    pub subject: Option<String>,
    pub scopes: BTreeSet<String>,
}

struct VerifyingKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

pub struct Verifier {
    keys: Vec<VerifyingKey>,
    issuer: String,
    audience: String,
    /// The checks for each algorithm a key has, built once: they depend on
    /// the configuration only, not on the token.
    validations: HashMap<Algorithm, Validation>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.keys.len())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

impl Verifier {
    /// Loads every configured key; `None` when no key is configured (tokens
    /// are not required). Errors name the key of the configuration.
    pub fn load(config: &AuthConfig) -> Result<Option<Verifier>, SettingError> {
        if !config.enabled() {
            return Ok(None);
        }
        let mut keys = Vec::new();
        if let Some(path) = &config.hs256_secret_file {
            let secret = read("auth.hs256_secret_file", path)?;
            let secret = secret.trim_ascii();
            // RFC 7518 §3.2: an HS256 key shorter than the hash is weak.
            if secret.len() < 32 {
                return Err(SettingError::new(
                    "auth.hs256_secret_file",
                    format!(
                        "{}: an HS256 secret needs at least 32 bytes",
                        path.display()
                    ),
                ));
            }
            keys.push(VerifyingKey {
                kid: None,
                algorithm: Algorithm::HS256,
                key: DecodingKey::from_secret(secret),
            });
        }
        for (index, path) in config.public_key_files.iter().enumerate() {
            let field = format!("auth.public_key_files[{index}]");
            let pem = read(&field, path)?;
            keys.push(public_key(&pem).map_err(|message| {
                SettingError::new(field, format!("{}: {message}", path.display()))
            })?);
        }
        if let Some(path) = &config.jwks_file {
            let text = read("auth.jwks_file", path)?;
            let set: JwkSet = serde_json::from_slice(&text).map_err(|err| {
                SettingError::new(
                    "auth.jwks_file",
                    format!("{}: not a JWKS document: {err}", path.display()),
                )
            })?;
            for (index, jwk) in set.keys.iter().enumerate() {
                let algorithm = match &jwk.algorithm {
                    AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                        Algorithm::ES256
                    }
                    AlgorithmParameters::OctetKeyPair(okp)
                        if okp.curve == EllipticCurve::Ed25519 =>
                    {
                        Algorithm::EdDSA
                    }
                    _ => {
                        return Err(SettingError::new(
                            "auth.jwks_file",
                            format!(
                                "{}: key {index} is not an RSA, P-256 or Ed25519 public key",
                                path.display()
                            ),
                        ));
                    }
                };
                let key = DecodingKey::from_jwk(jwk).map_err(|err| {
                    SettingError::new(
                        "auth.jwks_file",
                        format!("{}: key {index}: {err}", path.display()),
                    )
                })?;
                keys.push(VerifyingKey {
                    kid: jwk.common.key_id.clone(),
                    algorithm,
                    key,
                });
            }
            if set.keys.is_empty() {
                return Err(SettingError::new(
                    "auth.jwks_file",
                    format!("{}: the key set is empty", path.display()),
                ));
            }
        }
        Ok(Some(Verifier::new(
            keys,
            config.issuer.clone().unwrap_or_default(),
            config.audience.clone().unwrap_or_default(),
            config.leeway.as_secs(),
        )))
    }

    fn new(keys: Vec<VerifyingKey>, issuer: String, audience: String, leeway_seconds: u64) -> Self {
        let mut validations = HashMap::new();
        for key in &keys {
            validations.entry(key.algorithm).or_insert_with(|| {
                let mut validation = Validation::new(key.algorithm);
                validation.set_issuer(&[&issuer]);
                validation.set_audience(&[&audience]);
                validation.set_required_spec_claims(&["exp", "iss", "aud"]);
                validation.leeway = leeway_seconds;
                validation.validate_nbf = true;
                validation
            });
        }
        Verifier {
            keys,
            issuer,
            audience,
            validations,
        }
    }

    /// Verifies `token` and returns its bearer.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|err| AuthError::Malformed(err.to_string()))?;
        let candidates = self.keys.iter().filter(|key| {
            key.algorithm == header.alg
                && match (&header.kid, &key.kid) {
                    (Some(wanted), Some(have)) => wanted == have,
                    _ => true,
                }
        });
        let mut tried = false;
        for key in candidates {
            tried = true;
            let Some(validation) = self.validations.get(&key.algorithm) else {
                continue;
            };
            match jsonwebtoken::decode::<Value>(token, &key.key, validation) {
                Ok(data) => return Ok(principal(&data.claims)),
                // Another key of the same kind may have signed it (rotation).
                Err(err) if matches!(err.kind(), ErrorKind::InvalidSignature) => continue,
                Err(err) => return Err(classify(err.kind())),
            }
        }
        if tried {
            Err(AuthError::BadSignature)
        } else {
            Err(AuthError::UnknownKey(format!("{:?}", header.alg)))
        }
    }
}

fn read(field: &str, path: &Path) -> Result<Vec<u8>, SettingError> {
    std::fs::read(path)
        .map_err(|err| SettingError::new(field, format!("cannot read {}: {err}", path.display())))
}

type ParsePem = fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>;

/// A PEM public key, its algorithm told by its type.
fn public_key(pem: &[u8]) -> Result<VerifyingKey, String> {
    let attempts: [(Algorithm, ParsePem); 3] = [
        (Algorithm::RS256, DecodingKey::from_rsa_pem),
        (Algorithm::ES256, DecodingKey::from_ec_pem),
        (Algorithm::EdDSA, DecodingKey::from_ed_pem),
    ];
    for (algorithm, parse) in attempts {
        if let Ok(key) = parse(pem) {
            return Ok(VerifyingKey {
                kid: None,
                algorithm,
                key,
            });
        }
    }
    Err("not a PEM RSA, EC P-256 or Ed25519 public key".into())
}

fn classify(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::MissingRequiredClaim(claim) => AuthError::MissingClaim(claim.clone()),
        other => AuthError::Malformed(format!("{other:?}")),
    }
}

/// Scopes the way OAuth servers write them: `scope` as a space-separated
/// string (RFC 8693), or `scp` / `scopes` as a list or a string.
fn principal(claims: &Value) -> Principal {
    let mut scopes = BTreeSet::new();
    for name in ["scope", "scp", "scopes"] {
        match claims.get(name) {
            Some(Value::String(text)) => {
                scopes.extend(text.split_whitespace().map(str::to_string));
            }
            Some(Value::Array(items)) => {
                scopes.extend(items.iter().filter_map(Value::as_str).map(str::to_string));
            }
            _ => {}
        }
    }
    Principal {
        subject: claims
            .get("sub")
            .and_then(Value::as_str)
            .map(str::to_string),
        scopes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const SECRET: &[u8] = b"a-shared-secret-of-at-least-32-bytes!";

    fn verifier() -> Verifier {
        Verifier::new(
            vec![VerifyingKey {
                kid: None,
                algorithm: Algorithm::HS256,
                key: DecodingKey::from_secret(SECRET),
            }],
            "choco-auth".into(),
            "choco-factory".into(),
            0,
        )
    }

    fn token(claims: Value, secret: &[u8]) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .expect("encodes")
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    #[test]
    fn a_good_token_yields_its_subject_and_scopes() {
        let claims = json!({"iss": "choco-auth", "aud": "choco-factory", "exp": now() + 60,
            "sub": "ann", "scope": "factory:read factory:write", "scp": ["extra"]});
        let principal = verifier().verify(&token(claims, SECRET)).expect("accepted");
        assert_eq!(principal.subject.as_deref(), Some("ann"));
        assert!(principal.scopes.contains("factory:write"));
        assert!(principal.scopes.contains("extra"));
    }

    #[test]
    fn each_bad_token_is_refused_for_its_own_reason() {
        let base = |patch: Value| {
            let mut claims =
                json!({"iss": "choco-auth", "aud": "choco-factory", "exp": now() + 60});
            if let (Some(claims), Some(patch)) = (claims.as_object_mut(), patch.as_object()) {
                for (k, v) in patch {
                    claims.insert(k.clone(), v.clone());
                }
            }
            claims
        };
        let v = verifier();
        assert_eq!(
            v.verify(&token(base(json!({"exp": now() - 10})), SECRET)),
            Err(AuthError::Expired)
        );
        assert_eq!(
            v.verify(&token(base(json!({"aud": "other"})), SECRET)),
            Err(AuthError::WrongAudience)
        );
        assert_eq!(
            v.verify(&token(base(json!({"iss": "mallory"})), SECRET)),
            Err(AuthError::WrongIssuer)
        );
        assert_eq!(
            v.verify(&token(
                base(json!({})),
                b"another-secret-of-at-least-32-bytes!!"
            )),
            Err(AuthError::BadSignature)
        );
        assert!(matches!(
            v.verify("not.a.jwt"),
            Err(AuthError::Malformed(_))
        ));
        let no_exp = json!({"iss": "choco-auth", "aud": "choco-factory"});
        assert_eq!(
            v.verify(&token(no_exp, SECRET)),
            Err(AuthError::MissingClaim("exp".into()))
        );
    }
}
