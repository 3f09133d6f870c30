//! The data directory at start-up: the shard count it was written with, the message-id floor,
//! and every shard's durable log opened and recovered.
//!
//! Addresses are owned by `hash % shards`, so a message logged with one shard count would sit
//! on a shard that no longer owns its address under another. The count is recorded in
//! `<data_dir>/SHARDS`; a start with another count is allowed only when no log of the old count
//! holds an unsettled message, and then ids continue above the highest the old logs may have
//! handed out (`<data_dir>/MESSAGE-ID-FLOOR`), so they stay unique per address.
//! [`open_logs`] runs after the listeners are bound, so a start that cannot run writes nothing.

use std::io;

use crate::broker::ShardId;
use crate::config::Config;
use crate::log;
use crate::logging::Level;
use crate::store::{DurableLog, Recovery};

/// Opens and recovers every shard's log (refusing a changed shard count while the old logs hold
/// unsettled messages), records the shard count when it is new or changed, and returns the logs
/// with the id every shard's message ids continue above.
pub(super) fn open_logs(config: &Config) -> io::Result<(Vec<(DurableLog, Recovery)>, u64)> {
    let recorded_shards = recorded_shard_count(config)?;
    let mut message_id_floor = read_message_id_floor(config)?;
    if let Some(recorded) = recorded_shards.filter(|&recorded| recorded != config.shards) {
        message_id_floor = message_id_floor.max(check_logs_are_settled(config, recorded)?);
    }
    let mut logs = Vec::with_capacity(config.shards);
    for index in 0..config.shards {
        let opened = crate::store::open(config.log_config(), ShardId(index as u16))
            .map_err(|error| io::Error::other(error.to_string()))?;
        logs.push(opened);
    }
    if recorded_shards != Some(config.shards) {
        record_shard_count(config, message_id_floor)?;
        if let Some(recorded) = recorded_shards {
            log!(
                Level::Info,
                "the data directory {} was written with --shards {recorded} and holds no unsettled message: \
                 now used with --shards {}",
                config.data_dir.display(),
                config.shards
            );
        }
    }
    Ok((logs, message_id_floor))
}

/// The shard count `<data_dir>/SHARDS` records, if any. Reads only: nothing is written here.
fn recorded_shard_count(config: &Config) -> io::Result<Option<usize>> {
    let path = config.data_dir.join(SHARDS_FILE);
    match std::fs::read_to_string(&path) {
        Ok(recorded) => match recorded.trim().parse::<usize>() {
            Ok(count) if count > 0 => Ok(Some(count)),
            _ => Err(io::Error::other(format!(
                "{} does not hold a shard count; restore it, or remove it if the data directory holds no \
                 durable message",
                path.display()
            ))),
        },
        Err(error) if error.kind() == io::ErrorKind::NotFound || error.raw_os_error() == Some(libc::ENOTDIR) => {
            Ok(None)
        }
        Err(error) => Err(io::Error::other(format!(
            "cannot read {}: {error}; point --data-dir at a directory this user can read and write",
            path.display()
        ))),
    }
}

/// The shard count's file in the data directory.
const SHARDS_FILE: &str = "SHARDS";
/// The highest message id used under an earlier shard count (written when the count changes):
/// every shard continues above it, so message ids stay unique per address.
const MESSAGE_ID_FLOOR_FILE: &str = "MESSAGE-ID-FLOOR";

fn read_message_id_floor(config: &Config) -> io::Result<u64> {
    let path = config.data_dir.join(MESSAGE_ID_FLOOR_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map_err(|_| {
            io::Error::other(format!(
                "{} does not hold a message id; restore it (message ids would repeat without it)",
                path.display()
            ))
        }),
        Err(error) if error.kind() == io::ErrorKind::NotFound || error.raw_os_error() == Some(libc::ENOTDIR) => Ok(0),
        Err(error) => Err(io::Error::other(format!("cannot read {}: {error}", path.display()))),
    }
}

/// Opens the logs written with `recorded` shards: refuses if any holds an unsettled message,
/// and returns the highest message id they may have handed out.
fn check_logs_are_settled(config: &Config, recorded: usize) -> io::Result<u64> {
    let mut highest_id = 0;
    let mut unsettled = 0;
    for index in 0..recorded {
        let (log, recovery) = crate::store::open(config.log_config(), ShardId(index as u16))
            .map_err(|error| io::Error::other(error.to_string()))?;
        unsettled += recovery.messages.len();
        // The high water covers logged ids and ID_RESERVATIONs: ids of in-memory messages
        // were handed out up to it without being logged one by one.
        highest_id = highest_id.max(recovery.message_id_high_water);
        drop(log); // Releases the shard's lock; it is opened again below if still in use.
    }
    if unsettled > 0 {
        return Err(io::Error::other(format!(
            "--shards {}: the data directory {} was written with --shards {recorded} and holds {unsettled} \
             unsettled durable messages, which must stay on the shard that logged them. Start with --shards \
             {recorded} until they are consumed (then any --shards works), or give this broker another --data-dir",
            config.shards,
            config.data_dir.display()
        )));
    }
    Ok(highest_id)
}

/// Writes `SHARDS` (and `MESSAGE-ID-FLOOR` when ids must continue above one), each replaced
/// atomically (temporary file, fsync, rename, fsync of the directory).
fn record_shard_count(config: &Config, message_id_floor: u64) -> io::Result<()> {
    let write = |name: &str, text: String| -> io::Result<()> {
        use std::io::Write;
        let path = config.data_dir.join(name);
        let temporary = config.data_dir.join(format!("{name}.new"));
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, &path)
    };
    let mut result = write(SHARDS_FILE, format!("{}\n", config.shards));
    if message_id_floor > 0 {
        result = result.and_then(|()| write(MESSAGE_ID_FLOOR_FILE, format!("{message_id_floor}\n")));
    }
    result.and_then(|()| std::fs::File::open(&config.data_dir)?.sync_all()).map_err(|error| {
        io::Error::other(format!(
            "cannot record the shard count in {}: {error}; point --data-dir at a directory this user can \
             write to",
            config.data_dir.display()
        ))
    })
}
