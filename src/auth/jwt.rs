//! Signed bearer tokens (JWT) from an application's own auth server (sans-IO, checked inline).
//!
//! The `[auth.jwt]` section configures the keys: an HS256 shared secret, and/or one PEM public
//! key (RSA for RS256, EC P-256 for ES256), read once at start. A token is verified with the
//! key of the algorithm its header names, and only if that algorithm is configured: a token
//! signed with HS256 is never checked against a public key (the classic algorithm-confusion
//! attack), and `alg: none` is not an algorithm here at all.
//!
//! Claims (docs/SECURITY.md, "JWT"): `exp` (required, Unix seconds), `nbf` (optional), `iss`
//! and `aud` (checked when configured), `sub` (who the token is for; not needed by the broker),
//! and `mbws`, the permissions, with the four lists of a configured token
//! (`send`, `consume`, `deny-send`, `deny-consume`). A token without `mbws` is refused: a
//! token that grants nothing is a mistake worth saying.
//!
//! Verification costs a signature check (microseconds for HS256 and ES256, tens of
//! microseconds for RS256), so it runs inline, and nothing is cached: a cached verdict could
//! outlive the token's `exp`. Every refusal says what was wrong (expired, bad signature, wrong
//! algorithm, issuer or audience) and never quotes the token.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::Permissions;
use crate::config::file::{GrantSection, JwtSection};

/// Leeway for `exp` and `nbf` when `leeway-secs` is not given: the clocks of the auth server
/// and the broker may differ by this much.
pub const DEFAULT_LEEWAY_SECS: u64 = 30;
/// Most `leeway-secs` accepted (a leeway of hours would make `exp` meaningless).
pub const MAX_LEEWAY_SECS: u64 = 600;
/// Shortest HS256 secret accepted: RFC 7518 (3.2) asks for a key as long as the hash, 256 bits.
pub const MIN_HS256_SECRET_BYTES: usize = 32;
/// Largest public key file read.
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

/// The checked `[auth.jwt]` section (see the module docs).
pub struct JwtVerifier {
    hs256: Option<DecodingKey>,
    /// The public key and the one algorithm it verifies (RS256 for RSA, ES256 for P-256).
    public: Option<(DecodingKey, Algorithm)>,
    /// What the operator accepts; every one of them has its key.
    algorithms: Vec<Algorithm>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_secs: u64,
}

/// What a valid token grants.
#[derive(Debug)]
pub struct JwtGrant {
    pub permissions: Permissions,
    /// `exp` plus the leeway, in Unix milliseconds: the session ends then.
    pub valid_until_unix_ms: u64,
}

/// The claims the broker reads; others are ignored.
#[derive(Deserialize)]
struct Claims {
    /// Required; an `Option` so that a token without it is told so, not that it does not read.
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    nbf: Option<u64>,
    #[serde(default)]
    mbws: Option<GrantSection>,
}

impl JwtVerifier {
    /// Checks the section: at least one key, each algorithm listed has its key, the secret is
    /// long enough, the public key file reads and parses. Errors name the key at fault.
    pub fn from_section(section: &JwtSection) -> Result<JwtVerifier, String> {
        let context = "[auth.jwt]";
        let hs256 = match &section.hs256_secret {
            None => None,
            Some(secret) => {
                let secret = secret.expose();
                if secret == crate::config::file::REDACTED {
                    return Err(format!(
                        "{context} hs256-secret is what --print-config prints in place of a secret: put the secret \
                         itself there"
                    ));
                }
                if secret.len() < MIN_HS256_SECRET_BYTES {
                    return Err(format!(
                        "{context} hs256-secret is {} bytes, shorter than {MIN_HS256_SECRET_BYTES} (RFC 7518 asks for \
                         256 bits); make one with `openssl rand -hex 32`",
                        secret.len()
                    ));
                }
                Some(DecodingKey::from_secret(secret.as_bytes()))
            }
        };
        let public = section.public_key_file.as_deref().map(read_public_key).transpose()?;
        let algorithms = if section.algorithms.is_empty() {
            let mut defaults = Vec::new();
            if hs256.is_some() {
                defaults.push(Algorithm::HS256);
            }
            if let Some((_, algorithm)) = &public {
                defaults.push(*algorithm);
            }
            defaults
        } else {
            let mut listed = Vec::new();
            for name in &section.algorithms {
                let algorithm = match name.as_str() {
                    "HS256" => Algorithm::HS256,
                    "RS256" => Algorithm::RS256,
                    "ES256" => Algorithm::ES256,
                    _ => {
                        return Err(format!(
                            "{context} algorithms: \"{name}\" is not supported; use HS256, RS256 or ES256"
                        ))
                    }
                };
                let has_key = match algorithm {
                    Algorithm::HS256 => hs256.is_some(),
                    _ => public.as_ref().is_some_and(|(_, key_algorithm)| *key_algorithm == algorithm),
                };
                if !has_key {
                    return Err(format!(
                        "{context} algorithms: {name} is listed but no key for it is configured ({})",
                        match algorithm {
                            Algorithm::HS256 => "give hs256-secret",
                            Algorithm::RS256 => "give public-key-file with an RSA public key",
                            _ => "give public-key-file with an EC P-256 public key",
                        }
                    ));
                }
                listed.push(algorithm);
            }
            listed
        };
        if algorithms.is_empty() {
            return Err(format!("{context}: give hs256-secret or public-key-file (or both)"));
        }
        let leeway_secs = section.leeway_secs.unwrap_or(DEFAULT_LEEWAY_SECS);
        if leeway_secs > MAX_LEEWAY_SECS {
            return Err(format!("{context} leeway-secs {leeway_secs} is out of range: use 0..={MAX_LEEWAY_SECS}"));
        }
        Ok(JwtVerifier {
            hs256,
            public,
            algorithms,
            issuer: section.issuer.clone(),
            audience: section.audience.clone(),
            leeway_secs,
        })
    }

    /// Whether `token` has the shape of a JWT (three base64url parts), so that it is checked
    /// here rather than as a static token.
    pub fn looks_like_jwt(token: &str) -> bool {
        token.split('.').count() == 3
            && token.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'))
    }

    /// Verifies `token` at `now_unix_ms` (wall clock). `Err` is the reason for a fatal 4401; it
    /// says what is wrong and never quotes the token.
    pub fn verify(&self, token: &str, now_unix_ms: u64) -> Result<JwtGrant, String> {
        let refuse = |problem: &str| format!("OPEN: JWT refused: {problem}");
        let header = jsonwebtoken::decode_header(token).map_err(|_| {
            refuse("its header is not a JWT header with an algorithm this broker knows (HS256, RS256, ES256)")
        })?;
        if !self.algorithms.contains(&header.alg) {
            return Err(refuse(&format!(
                "it is signed with {:?}, which this broker does not accept (it accepts {})",
                header.alg,
                self.algorithms.iter().map(|algorithm| format!("{algorithm:?}")).collect::<Vec<_>>().join(", ")
            )));
        }
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref(),
            algorithm => {
                self.public.as_ref().filter(|(_, key_algorithm)| *key_algorithm == algorithm).map(|(key, _)| key)
            }
        };
        let key = key.expect("every accepted algorithm has its key (checked at start)");
        let mut validation = Validation::new(header.alg);
        // exp and nbf are checked below against the time given (testable, and the deadline
        // needs exp anyway); exp is required.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims = ["exp".to_string()].into_iter().collect();
        validation.leeway = 0;
        match &self.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".into());
        }
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|error| {
            use jsonwebtoken::errors::ErrorKind;
            refuse(&match error.kind() {
                ErrorKind::InvalidSignature => {
                    "its signature does not verify (forged, or signed with another key)".into()
                }
                ErrorKind::InvalidIssuer => {
                    format!("its iss claim is not \"{}\"", self.issuer.as_deref().unwrap_or_default())
                }
                ErrorKind::InvalidAudience => match &self.audience {
                    Some(audience) => format!("its aud claim does not name \"{audience}\""),
                    None => "it has an aud claim and this broker has no audience configured".into(),
                },
                ErrorKind::MissingRequiredClaim(claim) => format!("it has no {claim} claim"),
                ErrorKind::Json(_) => {
                    "its claims do not read: exp and nbf must be numbers, mbws an object of the lists send, \
                     consume, deny-send and deny-consume"
                        .into()
                }
                _ => "it is not a well-formed JWT".into(),
            })
        })?;
        let claims = claims.claims;
        let Some(exp) = claims.exp else { return Err(refuse("it has no exp claim (every token must expire)")) };
        let now_secs = now_unix_ms / 1000;
        if exp.saturating_add(self.leeway_secs) <= now_secs {
            return Err(refuse(&format!(
                "it expired {} s ago (exp {}); get a fresh token from your auth server",
                now_secs.saturating_sub(exp),
                exp
            )));
        }
        if let Some(nbf) = claims.nbf {
            if nbf > now_secs.saturating_add(self.leeway_secs) {
                return Err(refuse(&format!("it is not valid before {nbf} (nbf), {} s from now", nbf - now_secs)));
            }
        }
        let Some(grant) = claims.mbws else {
            return Err(refuse(
                "it has no mbws claim with its permissions (send, consume, deny-send, deny-consume; docs/SECURITY.md)",
            ));
        };
        let permissions =
            Permissions::parse(&grant.lists()).map_err(|error| refuse(&format!("its mbws claim: {error}")))?;
        let valid_until_unix_ms = exp.saturating_add(self.leeway_secs).saturating_mul(1000);
        Ok(JwtGrant { permissions, valid_until_unix_ms })
    }
}

/// Reads a PEM public key (`BEGIN PUBLIC KEY`, `BEGIN RSA PUBLIC KEY`), RSA or EC P-256, and
/// the algorithm it verifies.
fn read_public_key(path: &Path) -> Result<(DecodingKey, Algorithm), String> {
    use std::io::Read;
    let context = |problem: &str| format!("[auth.jwt] public-key-file {}: {problem}", path.display());
    let mut pem = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_KEY_FILE_BYTES).read_to_end(&mut pem))
        .map_err(|error| context(&format!("cannot read it: {error}")))?;
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((key, Algorithm::RS256));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        return Ok((key, Algorithm::ES256));
    }
    Err(context(
        "not a PEM RSA or EC (P-256) public key; export one with `openssl pkey -in private.pem -pubout` (a private \
         key or a certificate does not do)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::file::Secret;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    const NOW_MS: u64 = 1_800_000_000_000;

    fn verifier(section: JwtSection) -> JwtVerifier {
        JwtVerifier::from_section(&section).unwrap()
    }

    fn hs256() -> JwtVerifier {
        verifier(JwtSection { hs256_secret: Some(Secret::new(SECRET)), ..Default::default() })
    }

    fn token(claims: serde_json::Value) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
    }

    fn now_secs() -> u64 {
        NOW_MS / 1000
    }

    #[test]
    fn a_valid_token_grants_its_claims_until_its_exp() {
        let token = token(serde_json::json!({"sub": "alice", "exp": now_secs() + 60, "mbws": {"send": ["orders.*"]}}));
        let grant = hs256().verify(&token, NOW_MS).unwrap();
        assert!(grant.permissions.may_send(b"orders.eu") && !grant.permissions.may_consume(b"orders.eu"));
        assert_eq!(grant.valid_until_unix_ms, (now_secs() + 60 + DEFAULT_LEEWAY_SECS) * 1000);
    }

    #[test]
    fn refusals_say_what_is_wrong_without_quoting_the_token() {
        let cases = [
            (serde_json::json!({"exp": now_secs() - 100, "mbws": {}}), "expired"),
            (serde_json::json!({"mbws": {}}), "no exp claim"),
            (serde_json::json!({"exp": now_secs() + 60}), "no mbws claim"),
            (serde_json::json!({"exp": now_secs() + 60, "nbf": now_secs() + 600, "mbws": {}}), "not valid before"),
            (serde_json::json!({"exp": now_secs() + 60, "mbws": {"send": ["a*b"]}}), "has a * before its end"),
            (serde_json::json!({"exp": now_secs() + 60, "mbws": {"sends": ["a"]}}), "do not read"),
        ];
        for (claims, says) in cases {
            let token = token(claims);
            let error = hs256().verify(&token, NOW_MS).unwrap_err();
            assert!(error.contains(says) && !error.contains(&token[..20]), "{says}: {error}");
        }
        let mut forged = token(serde_json::json!({"exp": now_secs() + 60, "mbws": {}}));
        forged.pop();
        forged.push('A');
        let error = hs256().verify(&forged, NOW_MS).unwrap_err();
        assert!(error.contains("signature does not verify"), "{error}");
    }

    #[test]
    fn only_configured_algorithms_are_accepted() {
        // alg: none, hand-made (no library makes one).
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJleHAiOjk5OTk5OTk5OTksIm1id3MiOnt9fQ.";
        assert!(hs256().verify(none, NOW_MS).unwrap_err().contains("header"));
        let header = Header::new(Algorithm::HS384);
        let claims = serde_json::json!({"exp": now_secs() + 60, "mbws": {}});
        let hs384 = encode(&header, &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap();
        assert!(hs256().verify(&hs384, NOW_MS).unwrap_err().contains("does not accept"));
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let strict = verifier(JwtSection {
            hs256_secret: Some(Secret::new(SECRET)),
            issuer: Some("https://auth.example.com".into()),
            audience: Some("mbws".into()),
            ..Default::default()
        });
        let good =
            serde_json::json!({"exp": now_secs() + 60, "iss": "https://auth.example.com", "aud": "mbws", "mbws": {}});
        assert!(strict.verify(&token(good), NOW_MS).is_ok());
        let wrong_issuer =
            serde_json::json!({"exp": now_secs() + 60, "iss": "https://evil", "aud": "mbws", "mbws": {}});
        assert!(strict.verify(&token(wrong_issuer), NOW_MS).unwrap_err().contains("iss claim"));
        let wrong_audience =
            serde_json::json!({"exp": now_secs() + 60, "iss": "https://auth.example.com", "aud": "x", "mbws": {}});
        assert!(strict.verify(&token(wrong_audience), NOW_MS).unwrap_err().contains("aud claim"));
    }

    #[test]
    fn bad_sections_are_refused_at_start() {
        let short = JwtSection { hs256_secret: Some(Secret::new("short")), ..Default::default() };
        assert!(JwtVerifier::from_section(&short).err().unwrap().contains("openssl rand -hex 32"));
        let empty = JwtSection::default();
        assert!(JwtVerifier::from_section(&empty).err().unwrap().contains("give hs256-secret or public-key-file"));
        let missing_key = JwtSection {
            hs256_secret: Some(Secret::new(SECRET)),
            algorithms: vec!["RS256".into()],
            ..Default::default()
        };
        assert!(JwtVerifier::from_section(&missing_key).err().unwrap().contains("no key for it"));
        let unknown = JwtSection {
            hs256_secret: Some(Secret::new(SECRET)),
            algorithms: vec!["none".into()],
            ..Default::default()
        };
        assert!(JwtVerifier::from_section(&unknown).err().unwrap().contains("not supported"));
    }
}
