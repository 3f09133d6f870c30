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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};

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

/// One user (of the configuration file or of the admin API).
#[derive(Debug, Clone)]
struct User {
    /// The argon2id PHC string (checked to parse when it was given).
    password_hash: Arc<str>,
    permissions: Arc<Permissions>,
    /// The patterns `permissions` was made from (for the admin API's answers).
    patterns: PermissionPatterns,
}

impl User {
    fn new(name: &str, password_hash: &str, patterns: PermissionPatterns) -> Result<User, String> {
        if name.is_empty() || name.len() > crate::mbws::binary::MAX_STR8_BYTES {
            return Err(format!(
                "a user name is 1 to {} bytes (it travels in OPEN's login); {name:?} is {}",
                crate::mbws::binary::MAX_STR8_BYTES,
                name.len()
            ));
        }
        check_password_hash(password_hash)?;
        let permissions = Permissions::parse(&patterns.lists())?;
        Ok(User { password_hash: password_hash.into(), permissions: Arc::new(permissions), patterns })
    }
}

/// The permission patterns of a user as given (the configuration's syntax, docs/SECURITY.md
/// "Permissions"): the four lists of `[auth.anonymous]` and of a user in the file, so the
/// admin API's users and its persisted state read and write exactly the file's form.
pub type PermissionPatterns = crate::config::file::GrantSection;

impl PermissionPatterns {
    fn of(lists: &PermissionLists<'_>) -> PermissionPatterns {
        PermissionPatterns {
            send: lists.send.to_vec(),
            consume: lists.consume.to_vec(),
            deny_send: lists.deny_send.to_vec(),
            deny_consume: lists.deny_consume.to_vec(),
        }
    }
}

/// Where a user comes from: a user of the admin API takes precedence over a file user of the
/// same name (docs/OPERATIONS.md, "Users").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserSource {
    File,
    Api,
}

impl UserSource {
    pub fn name(self) -> &'static str {
        match self {
            UserSource::File => "file",
            UserSource::Api => "api",
        }
    }
}

/// A user as the admin API shows it: never its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserView {
    pub name: String,
    pub source: UserSource,
    pub patterns: PermissionPatterns,
}

/// A user the admin API put, as persisted in the data directory (with its hash).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StoredUser {
    pub name: String,
    pub password_hash: String,
    #[serde(flatten)]
    pub patterns: PermissionPatterns,
}

/// What the admin API changed in the users: put users, and file users it deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ApiUsers {
    #[serde(default)]
    pub users: Vec<StoredUser>,
    #[serde(default)]
    pub deleted_users: Vec<String>,
}

/// How the effective users changed: names added, removed, and whose hash or permissions
/// changed, with each changed or added user's permissions (`None`: removed).
#[derive(Debug, Clone, Default)]
pub struct UserChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    /// Every user in the three lists with what its live sessions get (`None`: closed).
    pub sessions: Vec<(Arc<str>, Option<Arc<Permissions>>)>,
}

impl UserChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// The users and tokens in force. Users: the admin API's ([`Auth::put_user`]) take precedence
/// over the configuration file's of the same name; a file user deleted through the API stays
/// deleted (also after a SIGHUP or a restart) until the API puts it again. Tokens come from the
/// file only.
#[derive(Debug, Default)]
struct Directory {
    file_users: HashMap<String, User>,
    api_users: BTreeMap<String, User>,
    deleted: BTreeSet<String>,
    tokens: HashMap<[u8; 32], Arc<Permissions>>,
}

impl Directory {
    fn user(&self, name: &str) -> Option<(&User, UserSource)> {
        if let Some(user) = self.api_users.get(name) {
            return Some((user, UserSource::Api));
        }
        if self.deleted.contains(name) {
            return None;
        }
        self.file_users.get(name).map(|user| (user, UserSource::File))
    }

    fn effective(&self) -> BTreeMap<String, (User, UserSource)> {
        let names = self.file_users.keys().chain(self.api_users.keys());
        names.filter_map(|name| Some((name.clone(), self.user(name).map(|(u, s)| (u.clone(), s))?))).collect()
    }
}

/// The changes from `before` to `after` (see [`UserChanges`]).
fn user_changes(
    before: &BTreeMap<String, (User, UserSource)>,
    after: &BTreeMap<String, (User, UserSource)>,
) -> UserChanges {
    let mut changes = UserChanges::default();
    for (name, (user, _)) in after {
        match before.get(name) {
            None => changes.added.push(name.clone()),
            Some((old, _)) if old.password_hash != user.password_hash || old.patterns != user.patterns => {
                changes.changed.push(name.clone());
                changes.sessions.push((name.as_str().into(), Some(user.permissions.clone())));
            }
            Some(_) => {}
        }
    }
    for name in before.keys().filter(|name| !after.contains_key(*name)) {
        changes.removed.push(name.clone());
        changes.sessions.push((name.as_str().into(), None));
    }
    changes
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
    /// Users and tokens (SHA-256 of each static token, and what it may do): read at every
    /// OPEN with credentials, written by the admin API and a SIGHUP reload.
    directory: RwLock<Directory>,
    /// The keys of `[auth.jwt]`, if configured (not reloaded by SIGHUP: a restart changes them).
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
        let directory = self.read();
        let users: Vec<String> = directory.effective().into_keys().collect();
        formatter
            .debug_struct("Auth")
            .field("anonymous", &self.anonymous)
            .field("users", &users)
            .field("tokens", &directory.tokens.len())
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
        let (file_users, tokens) = file_credentials(section)?;
        let jwt = section.jwt.as_ref().map(jwt::JwtVerifier::from_section).transpose()?;
        Ok(Auth {
            anonymous: Arc::new(anonymous),
            directory: RwLock::new(Directory { file_users, tokens, ..Directory::default() }),
            jwt,
            dummy_hash: DUMMY_HASH.into(),
            verified_cache: Mutex::new(HashMap::new()),
            section: section.clone(),
        })
    }

    /// Whether any user, token or JWT key is configured (or a user put by the admin API).
    pub fn has_credentials(&self) -> bool {
        let directory = self.read();
        self.jwt.is_some()
            || !directory.tokens.is_empty()
            || !directory.api_users.is_empty()
            || directory.file_users.keys().any(|name| !directory.deleted.contains(name))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Directory> {
        self.directory.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Directory> {
        self.directory.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every user in force, by name, without hashes.
    pub fn users(&self) -> Vec<UserView> {
        let effective = self.read().effective();
        effective.into_iter().map(|(name, (user, source))| UserView { name, source, patterns: user.patterns }).collect()
    }

    /// User `name`, without its hash.
    pub fn user(&self, name: &str) -> Option<UserView> {
        let directory = self.read();
        let (user, source) = directory.user(name)?;
        Some(UserView { name: name.to_string(), source, patterns: user.patterns.clone() })
    }

    /// Puts user `name` through the admin API (its hash checked, its patterns parsed; errors
    /// say which and why); without a hash, the user in force keeps its own. It takes precedence
    /// over a file user of that name.
    pub fn put_user(
        &self,
        name: &str,
        password_hash: Option<&str>,
        patterns: PermissionPatterns,
    ) -> Result<UserChanges, String> {
        let mut directory = self.write();
        let kept = directory.user(name).map(|(user, _)| user.password_hash.clone());
        let password_hash = match (password_hash, &kept) {
            (Some(hash), _) => hash,
            (None, Some(kept)) => kept,
            (None, None) => return Err("a new user needs a password or a password-hash".into()),
        };
        let user = User::new(name, password_hash, patterns)?;
        let before = directory.effective();
        directory.deleted.remove(name);
        directory.api_users.insert(name.to_string(), user);
        Ok(user_changes(&before, &directory.effective()))
    }

    /// Deletes user `name` (an API user, and a file user of that name until the API puts it
    /// again); `None` if there is no such user.
    pub fn delete_user(&self, name: &str) -> Option<UserChanges> {
        let mut directory = self.write();
        directory.user(name)?;
        let before = directory.effective();
        directory.api_users.remove(name);
        if directory.file_users.contains_key(name) {
            directory.deleted.insert(name.to_string());
        }
        Some(user_changes(&before, &directory.effective()))
    }

    /// What the admin API changed, to persist.
    pub fn api_users(&self) -> ApiUsers {
        let directory = self.read();
        ApiUsers {
            users: directory
                .api_users
                .iter()
                .map(|(name, user)| StoredUser {
                    name: name.clone(),
                    password_hash: user.password_hash.to_string(),
                    patterns: user.patterns.clone(),
                })
                .collect(),
            deleted_users: directory.deleted.iter().cloned().collect(),
        }
    }

    /// Re-applies what the admin API changed (at start, from the data directory).
    pub fn restore_api_users(&self, stored: &ApiUsers) -> Result<(), String> {
        let mut directory = self.write();
        for entry in &stored.users {
            let user = User::new(&entry.name, &entry.password_hash, entry.patterns.clone())
                .map_err(|error| format!("user {:?}: {error}", entry.name))?;
            directory.api_users.insert(entry.name.clone(), user);
        }
        directory.deleted.extend(stored.deleted_users.iter().cloned());
        Ok(())
    }

    /// Replaces the configuration file's users and tokens with `section`'s (SIGHUP); the
    /// admin API's changes stay on top. Nothing changes if `section` is not valid.
    pub fn reload_file(&self, section: &crate::config::file::AuthSection) -> Result<(UserChanges, usize), String> {
        let (file_users, tokens) = file_credentials(section)?;
        let mut directory = self.write();
        let before = directory.effective();
        directory.file_users = file_users;
        directory.tokens = tokens;
        Ok((user_changes(&before, &directory.effective()), directory.tokens.len()))
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
                let static_token = self.read().tokens.get(&hash).cloned();
                Check::Done(match (static_token, &self.jwt) {
                    (Some(permissions), _) => Access::Granted(permissions, None),
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
                let known =
                    self.read().user(&user).map(|(known, _)| (known.password_hash.clone(), known.permissions.clone()));
                let (password_hash, granted) = match known {
                    Some((password_hash, permissions)) => (password_hash, Some(permissions)),
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

/// The users and tokens of an `[auth]` section, checked (errors name the entry).
type FileCredentials = (HashMap<String, User>, HashMap<[u8; 32], Arc<Permissions>>);

fn file_credentials(section: &crate::config::file::AuthSection) -> Result<FileCredentials, String> {
    let mut users = HashMap::new();
    for user in &section.user {
        let context = format!("[[auth.user]] name = \"{}\"", user.name);
        let patterns = PermissionPatterns::of(&user.lists());
        let entry = User::new(&user.name, user.password_hash.expose(), patterns)
            .map_err(|error| format!("{context}: {error}"))?;
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
    Ok((users, tokens))
}

/// An argon2id hash of `password` with a fresh random salt and argon2's default cost, as `mbws
/// hash-password` makes (the admin API's `PUT /api/users/{name}` with a password; slow by
/// design: never on a shard's event loop).
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let mut salt = [0u8; 16];
    // SAFETY: getrandom writes at most 16 bytes into the live array.
    let filled = unsafe { libc::getrandom(salt.as_mut_ptr().cast(), salt.len(), 0) };
    if filled != salt.len() as isize {
        return Err(format!("no random salt: getrandom failed ({})", std::io::Error::last_os_error()));
    }
    let salt = SaltString::encode_b64(&salt).map_err(|error| format!("salt: {error}"))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|error| format!("argon2: {error}"))
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
pub fn check_password_hash(text: &str) -> Result<(), String> {
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
    fn api_users_take_precedence_and_a_deleted_file_user_stays_deleted_across_a_reload() {
        let auth = auth();
        let only_x = PermissionPatterns { send: vec!["x".into()], ..Default::default() };
        let changes = auth.put_user("alice", None, only_x.clone()).unwrap();
        assert_eq!((changes.added.len(), changes.changed.as_slice()), (0, ["alice".to_string()].as_slice()));
        let alice = auth.user("alice").unwrap();
        assert_eq!((alice.source, alice.patterns.clone()), (UserSource::Api, only_x.clone()));
        let (access, _) = run(&auth, password("alice", "s3cret"), 0);
        assert!(matches!(access, Access::Granted(ref p, _) if p.may_send(b"x") && !p.may_send(b"orders")), "kept hash");
        assert!(auth.put_user("zed", None, only_x).unwrap_err().contains("needs a password"));
        let changes = auth.delete_user("alice").unwrap();
        assert_eq!(changes.removed, ["alice"]);
        assert_eq!(auth.user("alice"), None);
        assert!(auth.delete_user("alice").is_none());
        let section = auth.section.clone();
        let (changes, tokens) = auth.reload_file(&section).unwrap();
        assert!(changes.is_empty() && tokens == 1, "{changes:?}");
        assert_eq!(auth.user("alice"), None, "deleted through the API: the file does not bring it back");
        assert_eq!(auth.api_users().deleted_users, ["alice"]);
        assert!(format!("{:?}", auth.api_users()).contains("deleted_users"));
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
