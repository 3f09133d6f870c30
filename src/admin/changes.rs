//! What the admin API changes: declared addresses (`PUT`/`DELETE /api/addresses/{name}`) and
//! users (`GET`/`PUT`/`DELETE /api/users/{name}`), each applied where it lives (an address on
//! its owner shard, through its inbox as a purge is; a user in the [`Auth`] and, for its live
//! sessions, on every shard) and then kept in the data directory ([`super::state`]). One
//! change at a time (a mutex), so the state file always matches what is in force.
//!
//! Live sessions of a changed user (docs/OPERATIONS.md, "Users"): new permissions apply to
//! their next SEND and SUBSCRIBE (subscriptions made already stay); a deleted user's sessions
//! are ended with a fatal ERROR 4401 and close 4401. The message path pays nothing for this:
//! each shard swaps the `Arc<Permissions>` its sessions hold when told.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::http::Response;
use super::state::{self, AdminState, StoredAddress};
use super::{shard_did_not_answer, SHARD_ANSWER_TIMEOUT};
use crate::auth::{Auth, PermissionPatterns, UserChanges, UserView};
use crate::broker::address::{AddressSettings, Deleted, Routing};
use crate::broker::ShardId;
use crate::log;
use crate::logging::Level;
use crate::shard::core::{AdminCommand, AdminOutcome};
use crate::shard::Inspector;

/// The broker's limits, for the settings a declaration leaves out, and the ranges it is checked
/// against.
#[derive(Debug, Clone, Copy)]
pub struct AddressDefaults {
    pub max_queued_messages: u32,
    pub max_queued_bytes: usize,
    pub max_deliveries: u32,
    pub max_message_bytes: usize,
}

impl AddressDefaults {
    pub fn from_config(config: &crate::config::Config) -> AddressDefaults {
        AddressDefaults {
            max_queued_messages: config.max_queued_messages,
            max_queued_bytes: config.max_queued_bytes,
            max_deliveries: config.max_deliveries,
            max_message_bytes: config.max_message_bytes,
        }
    }

    fn settings(&self) -> AddressSettings {
        AddressSettings {
            routing: Routing::Anycast,
            durable: false,
            max_queued_messages: self.max_queued_messages,
            max_queued_bytes: self.max_queued_bytes,
            max_deliveries: self.max_deliveries,
        }
    }
}

/// The settings of a declared address as JSON (the keys `PUT` takes).
pub fn settings_json(settings: &AddressSettings) -> Value {
    json!({
        "routing": settings.routing.name(),
        "durable": settings.durable,
        "max-queued-messages": settings.max_queued_messages,
        "max-queued-bytes": settings.max_queued_bytes,
        "max-deliveries": settings.max_deliveries,
    })
}

/// The keys of a `PUT /api/addresses/{name}` body.
const ADDRESS_KEYS: &str = "routing, durable, max-queued-messages, max-queued-bytes, max-deliveries";
/// The keys of a `PUT /api/users/{name}` body.
const USER_KEYS: &str = "password, password-hash, send, consume, deny-send, deny-consume";

pub struct Changes {
    auth: Arc<Auth>,
    data_dir: PathBuf,
    defaults: AddressDefaults,
    /// The declared addresses (what the owners hold), and the lock of every change.
    declared: Mutex<BTreeMap<String, AddressSettings>>,
}

impl Changes {
    pub fn new(
        auth: Arc<Auth>,
        data_dir: PathBuf,
        defaults: AddressDefaults,
        declared: &[(Bytes, AddressSettings)],
    ) -> Changes {
        let declared =
            declared.iter().map(|(name, settings)| (String::from_utf8_lossy(name).into_owned(), *settings)).collect();
        Changes { auth, data_dir, defaults, declared: Mutex::new(declared) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, AddressSettings>> {
        self.declared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes the state file; the error answer says the change is in force but not kept.
    fn persist(&self, declared: &BTreeMap<String, AddressSettings>) -> Result<(), Response> {
        let state = AdminState {
            addresses: declared.iter().map(|(name, settings)| (name.clone(), StoredAddress::of(settings))).collect(),
            users: self.auth.api_users(),
        };
        state::save(&self.data_dir, &state).map_err(|error| {
            let path = state::path(&self.data_dir);
            log!(Level::Error, "admin: cannot save {}: {error}", path.display());
            Response::error(
                500,
                format!(
                    "the change is in force, but saving it in {} failed ({error}): it will be lost at a restart; \
                     fix the data directory and repeat the request",
                    path.display()
                ),
            )
        })
    }

    /// `PUT /api/addresses/{name}`.
    pub fn declare_address(&self, inspector: &Inspector, name: &str, body: &[u8]) -> Response {
        if let Err(reason) = check_address_name(name) {
            return Response::error(400, reason);
        }
        let settings = match parse_address_settings(body, &self.defaults) {
            Ok(settings) => settings,
            Err(reason) => return Response::error(400, reason),
        };
        let mut declared = self.lock();
        let owner = crate::broker::owner_of(name.as_bytes(), inspector.shard_count());
        let command = AdminCommand::DeclareAddress(Bytes::copy_from_slice(name.as_bytes()), settings);
        let created = match inspector.command(owner, command, SHARD_ANSWER_TIMEOUT) {
            Some(AdminOutcome::Declared { created }) => created,
            Some(other) => return Response::error(500, format!("shard {} answered {other:?}", owner.0)),
            None => return shard_did_not_answer(owner.0),
        };
        declared.insert(name.to_string(), settings);
        if let Err(refusal) = self.persist(&declared) {
            return refusal;
        }
        log!(Level::Info, "admin: address {name:?} declared"; settings = settings_json(&settings));
        let status = if created { 201 } else { 200 };
        Response::json(status, &json!({ "address": name, "created": created, "settings": settings_json(&settings) }))
    }

    /// `DELETE /api/addresses/{name}[?force=true]`.
    pub fn delete_address(&self, inspector: &Inspector, name: &str, force: bool) -> Response {
        let mut declared = self.lock();
        let owner = crate::broker::owner_of(name.as_bytes(), inspector.shard_count());
        let command = AdminCommand::DeleteAddress { name: Bytes::copy_from_slice(name.as_bytes()), force };
        let (messages, consumers_ended) = match inspector.command(owner, command, SHARD_ANSWER_TIMEOUT) {
            Some(AdminOutcome::Deleted(Deleted::Deleted { messages, consumers_ended })) => (messages, consumers_ended),
            Some(AdminOutcome::Deleted(Deleted::HasConsumers(consumers))) => {
                return Response::error(
                    409,
                    format!(
                        "address {name:?} has {consumers} subscribers: delete it with ?force=true to end their \
                         subscriptions (ERROR 4405) and drop their unacknowledged messages too"
                    ),
                )
            }
            Some(AdminOutcome::Deleted(Deleted::NotFound)) => {
                return Response::error(
                    404,
                    format!("no address {name:?}: it holds no message, has no subscriber and is not declared"),
                )
            }
            Some(other) => return Response::error(500, format!("shard {} answered {other:?}", owner.0)),
            None => return shard_did_not_answer(owner.0),
        };
        if declared.remove(name).is_some() {
            if let Err(refusal) = self.persist(&declared) {
                return refusal;
            }
        }
        log!(
            Level::Info,
            "admin: address {name:?} deleted";
            dropped_messages = messages,
            ended_subscriptions = consumers_ended,
        );
        Response::json(
            200,
            &json!({
                "address": name,
                "deleted": true,
                "dropped_messages": messages,
                "ended_subscriptions": consumers_ended,
            }),
        )
    }

    /// `GET /api/users`.
    pub fn users(&self) -> Response {
        let users: Vec<Value> = self.auth.users().iter().map(user_json).collect();
        Response::json(200, &json!({ "total": users.len(), "users": users }))
    }

    /// `GET /api/users/{name}`.
    pub fn user(&self, name: &str) -> Response {
        match self.auth.user(name) {
            Some(user) => Response::json(200, &user_json(&user)),
            None => Response::error(404, format!("no user {name:?}")),
        }
    }

    /// `PUT /api/users/{name}`: a password is hashed here (the admin thread's, never a shard's).
    pub fn put_user(&self, inspector: &Inspector, name: &str, body: &[u8]) -> Response {
        let (secret, patterns) = match parse_user(body) {
            Ok(parsed) => parsed,
            Err(reason) => return Response::error(400, reason),
        };
        let password_hash = match secret {
            Some(UserSecret::Hash(hash)) => Some(hash),
            Some(UserSecret::Password(password)) => match crate::auth::hash_password(&password) {
                Ok(hash) => Some(hash),
                Err(error) => return Response::error(500, format!("cannot hash the password: {error}")),
            },
            None => None,
        };
        let declared = self.lock();
        let created = self.auth.user(name).is_none();
        let changes = match self.auth.put_user(name, password_hash.as_deref(), patterns) {
            Ok(changes) => changes,
            Err(reason) => return Response::error(400, format!("user {name:?}: {reason}")),
        };
        let (updated, _) = apply_user_changes(inspector, &changes);
        if let Err(refusal) = self.persist(&declared) {
            return refusal;
        }
        log!(Level::Info, "admin: user {name:?} {}", if created { "added" } else { "changed" }; live_sessions_updated = updated);
        let mut answer = user_json(&self.auth.user(name).expect("just put"));
        answer["created"] = json!(created);
        answer["sessions_updated"] = json!(updated);
        Response::json(if created { 201 } else { 200 }, &answer)
    }

    /// `DELETE /api/users/{name}`.
    pub fn delete_user(&self, inspector: &Inspector, name: &str) -> Response {
        let declared = self.lock();
        let Some(changes) = self.auth.delete_user(name) else {
            return Response::error(404, format!("no user {name:?}"));
        };
        let (_, closed) = apply_user_changes(inspector, &changes);
        if let Err(refusal) = self.persist(&declared) {
            return refusal;
        }
        log!(Level::Info, "admin: user {name:?} deleted"; live_sessions_closed = closed);
        Response::json(200, &json!({ "name": name, "deleted": true, "sessions_closed": closed }))
    }
}

/// Tells every shard about changed and removed users, so their live sessions follow (see the
/// module docs); returns the sessions updated and closed. Shards that do not answer within
/// [`SHARD_ANSWER_TIMEOUT`] still apply it when they read their inbox.
pub fn apply_user_changes(inspector: &Inspector, changes: &UserChanges) -> (usize, usize) {
    let (mut updated, mut closed) = (0, 0);
    for (name, permissions) in &changes.sessions {
        for shard in 0..inspector.shard_count() {
            let command = AdminCommand::UserChanged { name: name.clone(), permissions: permissions.clone() };
            if let Some(AdminOutcome::UserSessions { updated: u, closed: c }) =
                inspector.command(ShardId(shard as u16), command, SHARD_ANSWER_TIMEOUT)
            {
                updated += u;
                closed += c;
            }
        }
    }
    (updated, closed)
}

fn user_json(user: &UserView) -> Value {
    json!({
        "name": user.name,
        "source": user.source.name(),
        "send": user.patterns.send,
        "consume": user.patterns.consume,
        "deny-send": user.patterns.deny_send,
        "deny-consume": user.patterns.deny_consume,
    })
}

/// An address name the protocol can carry: 1 to 255 bytes.
fn check_address_name(name: &str) -> Result<(), String> {
    let max = crate::mbws::binary::MAX_STR8_BYTES;
    if name.is_empty() || name.len() > max {
        return Err(format!("address name {name:?} has {} bytes: an address is 1 to {max} bytes", name.len()));
    }
    Ok(())
}

/// A JSON object body (an empty body is an empty object).
fn object(body: &[u8], keys: &str) -> Result<Map<String, Value>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(format!("the body must be a JSON object with some of: {keys}")),
        Err(error) => Err(format!("the body is not JSON ({error}); send an object with some of: {keys}")),
    }
}

/// The settings of a `PUT /api/addresses/{name}` body, the broker's for those left out, each
/// checked against the range of its flag ([`FLAG_RANGES`](crate::config::FLAG_RANGES)).
fn parse_address_settings(body: &[u8], defaults: &AddressDefaults) -> Result<AddressSettings, String> {
    let mut settings = defaults.settings();
    for (key, value) in object(body, ADDRESS_KEYS)? {
        match key.as_str() {
            "routing" => {
                settings.routing = value.as_str().and_then(Routing::parse).ok_or_else(|| {
                    format!("routing = {value} is not valid: use \"anycast\" (the default) or \"multicast\"")
                })?;
            }
            "durable" => {
                settings.durable =
                    value.as_bool().ok_or_else(|| format!("durable = {value} is not valid: use true or false"))?;
            }
            "max-queued-messages" => settings.max_queued_messages = ranged(&key, &value)? as u32,
            "max-queued-bytes" => {
                let bytes = ranged(&key, &value)? as usize;
                if bytes < defaults.max_message_bytes {
                    return Err(format!(
                        "max-queued-bytes = {bytes} is below the broker's max-message-bytes ({}): a message of \
                         the largest size could never be queued; give at least {}",
                        defaults.max_message_bytes, defaults.max_message_bytes
                    ));
                }
                settings.max_queued_bytes = bytes;
            }
            "max-deliveries" => settings.max_deliveries = ranged(&key, &value)? as u32,
            _ => return Err(format!("unknown setting {key:?}: the settings are {ADDRESS_KEYS}")),
        }
    }
    Ok(settings)
}

/// `value` as an integer within the range of flag `--key`.
fn ranged(key: &str, value: &Value) -> Result<u64, String> {
    let flag = format!("--{key}");
    let range = crate::config::FLAG_RANGES.iter().find(|range| range.flag == flag).expect("a flag of each setting");
    value.as_u64().filter(|number| (range.min..=range.max).contains(number)).ok_or_else(|| {
        format!("{key} = {value} is not valid: use an integer in {} ({})", range.range_text(), range.meaning)
    })
}

enum UserSecret {
    Password(String),
    Hash(String),
}

impl std::fmt::Debug for UserSecret {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            UserSecret::Password(_) => "Password(<redacted>)",
            UserSecret::Hash(_) => "Hash(<redacted>)",
        })
    }
}

/// The password or hash and the permissions of a `PUT /api/users/{name}` body.
fn parse_user(body: &[u8]) -> Result<(Option<UserSecret>, PermissionPatterns), String> {
    let mut secret = None;
    let mut patterns = PermissionPatterns::default();
    for (key, value) in object(body, USER_KEYS)? {
        let text = || value.as_str().map(str::to_string).ok_or_else(|| format!("{key} must be a string"));
        match key.as_str() {
            "password" | "password-hash" if secret.is_some() => {
                return Err("give password or password-hash, not both".into());
            }
            "password" => {
                let password = text()?;
                let max = crate::mbws::binary::MAX_STR8_BYTES;
                if password.is_empty() || password.len() > max {
                    return Err(format!(
                        "password has {} bytes: a password is 1 to {max} bytes (it travels in OPEN)",
                        password.len()
                    ));
                }
                secret = Some(UserSecret::Password(password));
            }
            "password-hash" => {
                let hash = text()?;
                crate::auth::check_password_hash(&hash)?;
                secret = Some(UserSecret::Hash(hash));
            }
            "send" | "consume" | "deny-send" | "deny-consume" => {
                let list = value
                    .as_array()
                    .and_then(|items| items.iter().map(|item| item.as_str().map(str::to_string)).collect())
                    .ok_or_else(|| format!("{key} must be a list of address patterns (strings)"))?;
                match key.as_str() {
                    "send" => patterns.send = list,
                    "consume" => patterns.consume = list,
                    "deny-send" => patterns.deny_send = list,
                    _ => patterns.deny_consume = list,
                }
            }
            _ => return Err(format!("unknown key {key:?}: a user has {USER_KEYS}")),
        }
    }
    Ok((secret, patterns))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: AddressDefaults = AddressDefaults {
        max_queued_messages: 100,
        max_queued_bytes: 1 << 20,
        max_deliveries: 0,
        max_message_bytes: 1024,
    };

    #[test]
    fn address_settings_are_checked_with_the_field_the_value_and_the_limit() {
        let parse = |body: &str| parse_address_settings(body.as_bytes(), &DEFAULTS);
        assert_eq!(parse("").unwrap(), DEFAULTS.settings());
        let settings = parse(r#"{"routing": "multicast", "durable": true, "max-queued-messages": 3}"#).unwrap();
        assert_eq!((settings.routing, settings.durable, settings.max_queued_messages), (Routing::Multicast, true, 3));
        let error = parse(r#"{"max-queued-messages": 0}"#).unwrap_err();
        assert!(error.contains("max-queued-messages = 0") && error.contains("1..=100000000"), "{error}");
        let error = parse(r#"{"max-queued-bytes": 1024000000000000}"#).unwrap_err();
        assert!(error.contains("max-queued-bytes"), "{error}");
        assert!(parse(r#"{"max-queued-bytes": 1000}"#).unwrap_err().contains("max-message-bytes"));
        assert!(parse(r#"{"routing": "broadcast"}"#).unwrap_err().contains("routing = \"broadcast\""));
        assert!(parse(r#"{"max-queue": 1}"#).unwrap_err().contains("unknown setting \"max-queue\""));
        assert!(parse("[1]").unwrap_err().contains("JSON object"));
        assert!(parse("{").unwrap_err().contains("not JSON"));
    }

    #[test]
    fn a_user_body_takes_one_secret_and_lists_of_patterns() {
        let (secret, patterns) = parse_user(br#"{"password": "s3cret", "send": ["orders.*"]}"#).unwrap();
        assert!(matches!(secret, Some(UserSecret::Password(_))));
        assert_eq!(patterns.send, ["orders.*"]);
        assert!(parse_user(br#"{"password": "a", "password-hash": "b"}"#).is_err());
        assert!(parse_user(br#"{"password-hash": "plain"}"#).unwrap_err().contains("PHC"));
        assert!(parse_user(br#"{"send": "orders"}"#).unwrap_err().contains("list"));
        assert!(parse_user(br#"{"admin": true}"#).unwrap_err().contains("unknown key"));
        assert!(parse_user(br#"{"password": ""}"#).unwrap_err().contains("1 to 255"));
    }
}
