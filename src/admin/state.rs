//! What the admin API changed, kept in the data directory so that it survives a restart:
//! declared addresses with their settings, users put through the API, and configuration-file
//! users deleted through it. One small JSON file, [`STATE_FILE`], rewritten whole after each
//! change (write a temporary file, fsync it, rename it over the old one, fsync the directory),
//! so a crash leaves either the old or the new file, never a mix. It holds password hashes:
//! it is created readable by the broker's user only (0600).
//!
//! At start, `mbws-broker` reads it ([`load`]) before the shards start: the users go into the
//! [`Auth`](crate::auth::Auth), the addresses into
//! [`Config::declared_addresses`](crate::config::Config::declared_addresses). A file that does not
//! parse stops the start with its path and the reason (the operator fixes or removes it).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::auth::ApiUsers;
use crate::broker::address::{AddressSettings, Routing};

/// The file's name in the data directory.
pub const STATE_FILE: &str = "admin-state.json";

/// Largest state file read at start (a million declared addresses is far beyond what it is for).
pub const MAX_STATE_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// The file's content.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AdminState {
    /// Declared addresses by name.
    #[serde(default)]
    pub addresses: BTreeMap<String, StoredAddress>,
    #[serde(flatten)]
    pub users: ApiUsers,
}

/// A declared address's settings, as stored (and as `PUT /api/addresses/{name}` takes them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StoredAddress {
    pub routing: String,
    pub durable: bool,
    pub max_queued_messages: u32,
    pub max_queued_bytes: usize,
    pub max_deliveries: u32,
}

impl StoredAddress {
    pub fn of(settings: &AddressSettings) -> StoredAddress {
        StoredAddress {
            routing: settings.routing.name().to_string(),
            durable: settings.durable,
            max_queued_messages: settings.max_queued_messages,
            max_queued_bytes: settings.max_queued_bytes,
            max_deliveries: settings.max_deliveries,
        }
    }

    pub fn settings(&self) -> Result<AddressSettings, String> {
        Ok(AddressSettings {
            routing: Routing::parse(&self.routing)
                .ok_or_else(|| format!("routing {:?} is neither anycast nor multicast", self.routing))?,
            durable: self.durable,
            max_queued_messages: self.max_queued_messages,
            max_queued_bytes: self.max_queued_bytes,
            max_deliveries: self.max_deliveries,
        })
    }
}

/// The state file of `data_dir`.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(STATE_FILE)
}

/// Reads the state file of `data_dir` (empty when there is none yet).
pub fn load(data_dir: &Path) -> Result<AdminState, String> {
    let path = path(data_dir);
    let problem = |reason: String| {
        format!(
            "{}: {reason}; this file holds what the admin API changed (docs/OPERATIONS.md, \"What the admin API \
             keeps\"): fix it, or remove it to start without those changes",
            path.display()
        )
    };
    let text = match std::fs::metadata(&path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(AdminState::default()),
        Err(error) => return Err(problem(format!("cannot read it: {error}"))),
        Ok(metadata) if metadata.len() > MAX_STATE_FILE_BYTES => {
            return Err(problem(format!("it is {} bytes, more than {MAX_STATE_FILE_BYTES}", metadata.len())))
        }
        Ok(_) => std::fs::read_to_string(&path).map_err(|error| problem(format!("cannot read it: {error}")))?,
    };
    let state: AdminState = serde_json::from_str(&text).map_err(|error| problem(format!("not valid: {error}")))?;
    for (name, address) in &state.addresses {
        address.settings().map_err(|error| problem(format!("address {name:?}: {error}")))?;
    }
    Ok(state)
}

/// Writes `state` as the state file of `data_dir`, atomically and durably (see the module docs).
pub fn save(data_dir: &Path, state: &AdminState) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let target = path(data_dir);
    let temporary = data_dir.join(format!("{STATE_FILE}.tmp"));
    let mut text = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    text.push(b'\n');
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temporary)?;
    file.write_all(&text)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, &target)?;
    std::fs::File::open(data_dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{PermissionPatterns, StoredUser};

    #[test]
    fn a_saved_state_loads_back_and_a_missing_file_is_an_empty_state() {
        let dir = std::env::temp_dir().join(format!("mbws-admin-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(load(&dir).unwrap(), AdminState::default());
        let settings = AddressSettings {
            routing: Routing::Multicast,
            durable: true,
            max_queued_messages: 3,
            max_queued_bytes: 4096,
            max_deliveries: 2,
        };
        let mut state = AdminState::default();
        state.addresses.insert("orders".into(), StoredAddress::of(&settings));
        state.users.users.push(StoredUser {
            name: "alice".into(),
            password_hash: "$argon2id$...".into(),
            patterns: PermissionPatterns { send: vec!["orders".into()], ..Default::default() },
        });
        state.users.deleted_users.push("bob".into());
        save(&dir, &state).unwrap();
        assert_eq!(load(&dir).unwrap(), state);
        assert_eq!(state.addresses["orders"].settings(), Ok(settings));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(path(&dir)).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::write(path(&dir), "{\"addresses\": 1}").unwrap();
        assert!(load(&dir).unwrap_err().contains("admin-state.json"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
