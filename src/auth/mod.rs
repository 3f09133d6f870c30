//! Authentication at OPEN, and the permissions it grants (docs/SECURITY.md).
//!
//! [`Auth`] is the `[auth]` section of the configuration, checked at start: users with
//! argon2id password hashes (PHC strings), static bearer tokens stored as the SHA-256 of the
//! token, the keys of signed tokens (JWT, [`jwt`]: checked inline, their claims carry the
//! permissions and an expiry that ends the session), and what anonymous sessions may do. It decides a connection's [`Access`] from its
//! [`Credentials`] ([`Auth::check`]) without IO, except for the one slow step: an argon2
//! verification, which [`Check::Verify`] hands to the caller, who runs it on the verification
//! threads ([`verifier`]) and never on a shard's event loop. A successful verification is
//! remembered for [`VERIFIED_CACHE_MS`] ([`Auth::verified`]), so a client that reconnects does
//! not pay for the hash again.
//!
//! Every refusal of a password or a static token has the same reason ([`REFUSED`]), so it does
//! not tell an unknown user from a wrong password (a JWT's refusal says what is wrong with it:
//! its signature proves who issued it, so there is nothing to hide); an unknown user is verified against a dummy hash so that
//! it takes as long as a wrong password. Repeated failures from one peer address are slowed
//! down ([`failures`]). The session applies the outcome: 4401 at OPEN, 4403 for a SEND or
//! SUBSCRIBE its [`Permissions`] do not allow.
//!
//! Why SHA-256 for static tokens and argon2 for passwords: a static token is a long random
//! secret the operator generates (`openssl rand -hex 32`), which no guessing can reach, so a fast
//! hash protects it as well as a slow one and lets the check run inline; a password is chosen by
//! a human and needs a slow, salted hash against guessing from a stolen configuration.

pub mod credentials;
pub mod failures;
pub mod jwt;
pub mod permissions;
pub mod verifier;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

pub use credentials::{Credentials, UpgradeCredentials};
pub use permissions::{PermissionLists, Permissions};

use crate::mbws::ErrorCode;

/// The one reason for refused credentials: a wrong password, an unknown user and an unknown
/// token all get it, so that a refusal does not say which users exist.
pub const REFUSED: &str = "OPEN: authentication failed: these credentials are not accepted by this broker";

/// How long a successful password verification is remembered.
pub const VERIFIED_CACHE_MS: u64 = 60_000;

/// Most remembered verifications (an entry is 32 bytes of hash and a deadline).
pub const MAX_VERIFIED_CACHE_ENTRIES: usize = 10_000;

/// What a connection may do, decided before its OPEN is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// These permissions, until the given time (broker clock, ms) if the credentials expire
    /// (a JWT's `exp`): the session ends then (fatal 4401). `None`: for the session's life.
    Granted(Arc<Permissions>, Option<u64>),
    /// The OPEN is answered with this fatal ERROR (4401, or 4429 when the checks are overloaded).
    Refused(ErrorCode, String),
}

impl Access {
    /// Everything allowed: a broker without `[auth]` on loopback, and the unit tests.
    pub fn unrestricted() -> Access {
        Access::Granted(Arc::new(Permissions::everything()), None)
    }

    pub fn refused() -> Access {
        Access::Refused(ErrorCode::Unauthenticated, REFUSED.into())
    }
}

/// One user of the configuration.
#[derive(Debug)]
struct User {
    /// The argon2id PHC string (checked to parse at start).
    password_hash: Arc<str>,
    permissions: Arc<Permissions>,
}

/// The result of [`Auth::check`].
#[derive(Debug)]
pub enum Check {
    Done(Access),
    /// A password to verify against `password_hash` off the event loop; then call
    /// [`Auth::verified`] with the outcome.
    Verify(PasswordCheck),
}

/// A password verification to run on the verification threads.
pub struct PasswordCheck {
    pub password_hash: Arc<str>,
    pub password: String,
    /// The user's permissions, if the user exists (an unknown user is verified against a dummy
    /// hash, and refused whatever the outcome).
    granted: Option<Arc<Permissions>>,
    cache_key: [u8; 32],
}

impl std::fmt::Debug for PasswordCheck {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "PasswordCheck(<redacted>)")
    }
}

/// The `[auth]` section, checked (see the module docs).
pub struct Auth {
    anonymous: Arc<Permissions>,
    users: HashMap<String, User>,
    /// SHA-256 of each static token, and what it may do.
    tokens: HashMap<[u8; 32], Arc<Permissions>>,
    /// The keys of `[auth.jwt]`, if configured.
    jwt: Option<jwt::JwtVerifier>,
    /// An argon2id hash of nothing anyone knows, verified for unknown users.
    dummy_hash: Arc<str>,
    /// Successful verifications: SHA-256 of (hash, password) and until when (broker clock, ms).
    verified_cache: Mutex<HashMap<[u8; 32], u64>>,
    /// The section as configured, for `--print-config` (secrets print redacted).
    pub section: crate::config::file::AuthSection,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut users: Vec<&String> = self.users.keys().collect();
        users.sort();
        formatter
            .debug_struct("Auth")
            .field("anonymous", &self.anonymous)
            .field("users", &users)
            .field("tokens", &self.tokens.len())
            .field("jwt", &self.jwt.is_some())
            .finish()
    }
}

impl Default for Auth {
    fn default() -> Auth {
        Auth::from_section(&Default::default()).expect("an empty [auth] section is valid")
    }
}

/// A well-formed argon2id hash (argon2's default parameters, as `mbws hash-password` makes)
/// of a password nobody knows: it was made once from a random string that was not kept.
/// Verifying against it costs what a real user's check costs, so an unknown user's refusal
/// takes as long as a wrong password's. A constant: hashing one at start-up would cost every
/// start about 100 million instructions (it showed in scripts/callgrind-broker.sh).
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$aXky35jatRXHlSGm39azfQ$PDBSfUlqK9Su2KtaQSkgwGmMjwwkIBYPaxk57Q1oL7M";

impl Auth {
    /// Checks the `[auth]` section: every password hash is an argon2id PHC string, every token
    /// hash 64 hex digits, every pattern valid, no user or token twice. Errors name the entry.
    pub fn from_section(section: &crate::config::file::AuthSection) -> Result<Auth, String> {
        let anonymous = match &section.anonymous {
            None => Permissions::everything(),
            Some(grant) => Permissions::parse(&grant.lists()).map_err(|error| format!("[auth.anonymous]: {error}"))?,
        };
        let mut users = HashMap::new();
        for user in &section.user {
            let context = format!("[[auth.user]] name = \"{}\"", user.name);
            if user.name.is_empty() || user.name.len() > crate::mbws::binary::MAX_STR8_BYTES {
                return Err(format!(
                    "{context}: a user name is 1 to {} bytes (it travels in OPEN's login)",
                    crate::mbws::binary::MAX_STR8_BYTES
                ));
            }
            check_password_hash(user.password_hash.expose()).map_err(|error| format!("{context}: {error}"))?;
            let permissions = Permissions::parse(&user.lists()).map_err(|error| format!("{context}: {error}"))?;
            let entry = User { password_hash: user.password_hash.expose().into(), permissions: Arc::new(permissions) };
            if users.insert(user.name.clone(), entry).is_some() {
                return Err(format!("{context}: this user is configured twice; keep one entry"));
            }
        }
        let mut tokens = HashMap::new();
        for token in &section.token {
            let context = format!("[[auth.token]] name = \"{}\"", token.name);
            let hash = parse_sha256_hex(token.sha256.expose()).map_err(|error| format!("{context}: {error}"))?;
            let permissions = Permissions::parse(&token.lists()).map_err(|error| format!("{context}: {error}"))?;
            if tokens.insert(hash, Arc::new(permissions)).is_some() {
                return Err(format!("{context}: this token's hash is configured twice; keep one entry"));
            }
        }
        let jwt = section.jwt.as_ref().map(jwt::JwtVerifier::from_section).transpose()?;
        Ok(Auth {
            anonymous: Arc::new(anonymous),
            users,
            tokens,
            jwt,
            dummy_hash: DUMMY_HASH.into(),
            verified_cache: Mutex::new(HashMap::new()),
            section: section.clone(),
        })
    }

    /// Whether any user, token or JWT key is configured.
    pub fn has_credentials(&self) -> bool {
        !self.users.is_empty() || !self.tokens.is_empty() || self.jwt.is_some()
    }

    /// The credentials of a connection ([`credentials::credentials`]), or, on a broker with no
    /// user and no token configured, [`Credentials::Anonymous`] whatever the client sent:
    /// there is nothing to check them against, and they could grant no more than anonymous
    /// access (clients that always send credentials keep working with the one-command start).
    pub fn credentials_of(
        &self,
        open: &crate::mbws::Open,
        upgrade: &UpgradeCredentials,
    ) -> Result<Credentials, String> {
        if self.has_credentials() {
            credentials::credentials(open, upgrade)
        } else {
            Ok(Credentials::Anonymous)
        }
    }

    /// Decides what `credentials` grant (`anonymous_allowed`: the broker's `allow-anonymous`),
    /// at `now_ms` (the broker's clock: the verification cache, a JWT's deadline) and
    /// `now_unix_ms` (the wall clock a JWT's `exp` is compared with). Only a password not
    /// verified recently needs the slow step.
    pub fn check(&self, credentials: Credentials, anonymous_allowed: bool, now_ms: u64, now_unix_ms: u64) -> Check {
        match credentials {
            Credentials::Anonymous if anonymous_allowed => Check::Done(Access::Granted(self.anonymous.clone(), None)),
            Credentials::Anonymous => Check::Done(Access::Refused(
                ErrorCode::Unauthenticated,
                "OPEN: this broker does not allow anonymous sessions; give a user and password or a token \
                 (docs/SECURITY.md)"
                    .into(),
            )),
            Credentials::Token(token) => {
                let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
                Check::Done(match (self.tokens.get(&hash), &self.jwt) {
                    (Some(permissions), _) => Access::Granted(permissions.clone(), None),
                    (None, Some(verifier)) if jwt::JwtVerifier::looks_like_jwt(&token) => {
                        match verifier.verify(&token, now_unix_ms) {
                            // The deadline on the broker's clock: as far from now as exp is.
                            Ok(grant) => Access::Granted(
                                Arc::new(grant.permissions),
                                Some(now_ms.saturating_add(grant.valid_until_unix_ms.saturating_sub(now_unix_ms))),
                            ),
                            Err(reason) => Access::Refused(ErrorCode::Unauthenticated, reason),
                        }
                    }
                    (None, _) => Access::refused(),
                })
            }
            Credentials::Password { user, password } => {
                let (password_hash, granted) = match self.users.get(&user) {
                    Some(known) => (known.password_hash.clone(), Some(known.permissions.clone())),
                    None => (self.dummy_hash.clone(), None),
                };
                let cache_key = verified_key(&password_hash, &password);
                if let Some(granted) = &granted {
                    let cache = self.verified_cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    if cache.get(&cache_key).is_some_and(|&until_ms| now_ms < until_ms) {
                        return Check::Done(Access::Granted(granted.clone(), None));
                    }
                }
                Check::Verify(PasswordCheck { password_hash, password, granted, cache_key })
            }
        }
    }

    /// The outcome of `check`'s verification (`matched`: the password matched its hash).
    pub fn verified(&self, check: PasswordCheck, matched: bool, now_ms: u64) -> Access {
        match (check.granted, matched) {
            (Some(permissions), true) => {
                let mut cache = self.verified_cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                if cache.len() >= MAX_VERIFIED_CACHE_ENTRIES {
                    cache.retain(|_, until_ms| now_ms < *until_ms);
                    if cache.len() >= MAX_VERIFIED_CACHE_ENTRIES {
                        cache.clear();
                    }
                }
                cache.insert(check.cache_key, now_ms + VERIFIED_CACHE_MS);
                Access::Granted(permissions, None)
            }
            _ => Access::refused(),
        }
    }
}

/// The key of a remembered verification: a hash of the stored hash and the password (a fast
/// hash, kept in memory for at most [`VERIFIED_CACHE_MS`]; the password itself is not kept).
fn verified_key(password_hash: &str, password: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(password_hash.as_bytes());
    hasher.update([0]);
    hasher.update(password.as_bytes());
    hasher.finalize().into()
}

/// Verifies `password` against the argon2 PHC string `password_hash` (slow: tens of
/// milliseconds by design; call it on a verification thread only).
pub fn verify_password(password_hash: &str, password: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    let Ok(parsed) = PasswordHash::new(password_hash) else { return false };
    argon2::Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok()
}

/// An argon2id PHC string (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`), as `mbws
/// hash-password` prints.
fn check_password_hash(text: &str) -> Result<(), String> {
    let parsed = argon2::password_hash::PasswordHash::new(text)
        .map_err(|error| format!("password-hash is not a PHC string ({error}); make one with `mbws hash-password`"))?;
    if parsed.algorithm.as_str() != "argon2id" {
        return Err(format!(
            "password-hash uses {}, not argon2id; make one with `mbws hash-password`",
            parsed.algorithm.as_str()
        ));
    }
    argon2::Params::try_from(&parsed)
        .map_err(|error| format!("password-hash has parameters argon2 refuses ({error})"))?;
    if parsed.hash.is_none() || parsed.salt.is_none() {
        return Err("password-hash has no salt or no hash; make one with `mbws hash-password`".into());
    }
    Ok(())
}

/// 64 hex digits (SHA-256 of a token: `printf %s "$TOKEN" | sha256sum`).
fn parse_sha256_hex(text: &str) -> Result<[u8; 32], String> {
    let bad =
        || "sha256 must be 64 hex digits, the SHA-256 of the token (printf %s \"$TOKEN\" | sha256sum)".to_string();
    if text.len() != 64 {
        return Err(bad());
    }
    let mut hash = [0u8; 32];
    for (index, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[index * 2..index * 2 + 2], 16).map_err(|_| bad())?;
    }
    Ok(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dummy hash is a valid argon2id hash with the parameters real ones have, so an
    /// unknown user's check costs what a known user's does.
    #[test]
    fn the_dummy_hash_is_a_real_argon2id_hash_with_default_parameters() {
        assert_eq!(check_password_hash(DUMMY_HASH), Ok(()));
        let parsed = argon2::password_hash::PasswordHash::new(DUMMY_HASH).expect("a PHC string");
        let params = argon2::Params::try_from(&parsed).expect("parameters");
        let default = argon2::Params::default();
        assert_eq!(
            (params.m_cost(), params.t_cost(), params.p_cost()),
            (default.m_cost(), default.t_cost(), default.p_cost())
        );
    }
    use crate::config::file::Secret;
    use crate::config::file::{AuthSection, TokenSection, UserSection};

    fn hash(password: &str) -> String {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        // Small parameters: the tests check the logic, not the cost.
        let argon = argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            argon2::Params::new(1024, 1, 1, None).unwrap(),
        );
        argon.hash_password(password.as_bytes(), &salt).unwrap().to_string()
    }

    fn auth() -> Auth {
        let token_hash: String = Sha256::digest(b"tok").iter().map(|byte| format!("{byte:02x}")).collect();
        Auth::from_section(&AuthSection {
            user: vec![UserSection {
                name: "alice".into(),
                password_hash: Secret::new(hash("s3cret")),
                send: vec!["orders".into()],
                ..Default::default()
            }],
            token: vec![TokenSection {
                name: "billing".into(),
                sha256: Secret::new(token_hash),
                consume: vec!["*".into()],
                ..Default::default()
            }],
            ..Default::default()
        })
        .unwrap()
    }

    fn password(user: &str, password: &str) -> Credentials {
        Credentials::Password { user: user.into(), password: password.into() }
    }

    fn run(auth: &Auth, credentials: Credentials, now_ms: u64) -> (Access, bool) {
        match auth.check(credentials, false, now_ms, 0) {
            Check::Done(access) => (access, false),
            Check::Verify(check) => {
                let matched = verify_password(&check.password_hash, &check.password);
                (auth.verified(check, matched, now_ms), true)
            }
        }
    }

    #[test]
    fn passwords_are_verified_then_remembered_briefly() {
        let auth = auth();
        let (access, slow) = run(&auth, password("alice", "s3cret"), 0);
        assert!(matches!(access, Access::Granted(ref p, None) if p.may_send(b"orders")) && slow);
        let (access, slow) = run(&auth, password("alice", "s3cret"), 1000);
        assert!(matches!(access, Access::Granted(..)) && !slow, "remembered");
        let (_, slow) = run(&auth, password("alice", "s3cret"), VERIFIED_CACHE_MS + 1);
        assert!(slow, "forgotten after VERIFIED_CACHE_MS");
    }

    #[test]
    fn a_wrong_password_and_an_unknown_user_get_the_same_refusal_and_both_take_the_slow_path() {
        let auth = auth();
        let (wrong, slow_wrong) = run(&auth, password("alice", "guess"), 0);
        let (unknown, slow_unknown) = run(&auth, password("mallory", "guess"), 0);
        assert_eq!(wrong, Access::refused());
        assert_eq!(unknown, wrong);
        assert!(slow_wrong && slow_unknown);
        // The dummy hash's password is refused too for an unknown user.
        let (unknown, _) = run(&auth, password("mallory", "no password verifies against this"), 0);
        assert_eq!(unknown, Access::refused());
    }

    #[test]
    fn tokens_are_checked_inline_by_their_hash() {
        let auth = auth();
        let (access, slow) = run(&auth, Credentials::Token("tok".into()), 0);
        assert!(matches!(access, Access::Granted(ref p, None) if p.may_consume(b"x") && !p.may_send(b"x")) && !slow);
        assert_eq!(run(&auth, Credentials::Token("tok2".into()), 0).0, Access::refused());
    }

    #[test]
    fn a_jwt_grants_its_claims_until_its_exp_on_the_broker_clock() {
        use jsonwebtoken::{encode, EncodingKey, Header};
        let secret = "0123456789abcdef0123456789abcdef";
        let section = AuthSection {
            jwt: Some(crate::config::file::JwtSection {
                hs256_secret: Some(Secret::new(secret)),
                leeway_secs: Some(0),
                ..Default::default()
            }),
            ..Default::default()
        };
        let auth = Auth::from_section(&section).unwrap();
        assert!(auth.has_credentials());
        let now_unix_ms = 1_800_000_000_000;
        let claims = serde_json::json!({"exp": now_unix_ms / 1000 + 90, "mbws": {"consume": ["*"]}});
        let token = encode(&Header::default(), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap();
        let Check::Done(Access::Granted(permissions, Some(until_ms))) =
            auth.check(Credentials::Token(token), false, 5_000, now_unix_ms)
        else {
            panic!("a valid JWT is granted with a deadline")
        };
        assert!(permissions.may_consume(b"x") && !permissions.may_send(b"x"));
        assert_eq!(until_ms, 5_000 + 90_000, "exp is 90 s away on the broker's clock too");
        let Check::Done(refused) = auth.check(Credentials::Token("a.b.c".into()), false, 0, now_unix_ms) else {
            panic!("no slow step for a JWT")
        };
        assert!(matches!(refused, Access::Refused(ErrorCode::Unauthenticated, ref reason) if reason.contains("JWT")));
    }

    #[test]
    fn anonymous_sessions_only_when_allowed() {
        let auth = auth();
        assert!(matches!(run(&auth, Credentials::Anonymous, 0).0, Access::Refused(ErrorCode::Unauthenticated, _)));
        let Check::Done(Access::Granted(everything, None)) = auth.check(Credentials::Anonymous, true, 0, 0) else {
            panic!("allowed anonymous sessions are granted")
        };
        assert!(everything.may_send(b"x") && everything.may_consume(b"DLQ.x"), "by default, everything");
    }

    #[test]
    fn bad_entries_are_refused_at_start_with_their_name() {
        let section = |user: UserSection| AuthSection { user: vec![user], ..Default::default() };
        let bad_hash = UserSection { name: "bob".into(), password_hash: Secret::new("plain"), ..Default::default() };
        let error = Auth::from_section(&section(bad_hash)).unwrap_err();
        assert!(error.contains("name = \"bob\"") && error.contains("mbws hash-password"), "{error}");
        let token = TokenSection { name: "t".into(), sha256: Secret::new("abc"), ..Default::default() };
        let error = Auth::from_section(&AuthSection { token: vec![token], ..Default::default() }).unwrap_err();
        assert!(error.contains("64 hex digits"), "{error}");
    }
}
