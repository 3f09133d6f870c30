//! A minimal leveled logger writing one line per event to stderr, as text or as JSON.
//!
//! Text lines look like `2026-11-28T20:16:22.123Z INFO  shard 1: connection closed
//! peer=127.0.0.1:40412 reason="client closed (1000)"`: the time, the level, the message and the
//! event's fields as `key=value` (quoted when the value has a space, a quote or is empty). JSON
//! lines (`--log-format json`) are one object each: `{"ts":"...","level":"info","target":"shard",
//! "shard":1,"msg":"connection closed","peer":"127.0.0.1:40412","reason":"..."}`. A message of a
//! shard begins with `shard N: ` in the text format; the JSON format lifts that prefix into
//! `"target":"shard","shard":N` (other lines have `"target":"broker"`), and writes a field whose
//! text is a decimal number as a JSON number.
//!
//! The level and the format are process-wide and set once at start-up; a disabled level costs
//! one relaxed atomic load. Every line is one `write` to stderr, so lines from different shards
//! never interleave.

use std::fmt::{Display, Write as _};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Level {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
}

impl Level {
    pub fn parse(text: &str) -> Option<Level> {
        match text.to_ascii_lowercase().as_str() {
            "error" => Some(Level::Error),
            "warn" | "warning" => Some(Level::Warn),
            "info" => Some(Level::Info),
            "debug" => Some(Level::Debug),
            _ => None,
        }
    }

    /// The level as `--log-level` takes it: `info`.
    pub fn name(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warn => "WARN ",
            Level::Info => "INFO ",
            Level::Debug => "DEBUG",
        }
    }
}

/// How each line is written: `--log-format text|json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum LogFormat {
    Text = 0,
    Json = 1,
}

impl LogFormat {
    pub fn parse(text: &str) -> Option<LogFormat> {
        match text {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }

    /// The format as `--log-format` takes it.
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

static MAX_LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);
static FORMAT: AtomicU8 = AtomicU8::new(LogFormat::Text as u8);

pub fn set_level(level: Level) {
    MAX_LEVEL.store(level as u8, Ordering::Relaxed);
}

pub fn set_format(format: LogFormat) {
    FORMAT.store(format as u8, Ordering::Relaxed);
}

fn format() -> LogFormat {
    if FORMAT.load(Ordering::Relaxed) == LogFormat::Json as u8 {
        LogFormat::Json
    } else {
        LogFormat::Text
    }
}

#[inline]
pub fn enabled(level: Level) -> bool {
    level as u8 <= MAX_LEVEL.load(Ordering::Relaxed)
}

/// One field of an event: its key and its value's text.
pub type Field<'a> = (&'static str, &'a dyn Display);

/// Writes one line; use the [`log!`](crate::log) macro instead of calling this.
pub fn write_line(level: Level, args: std::fmt::Arguments<'_>) {
    write_event(level, args, &[]);
}

/// Writes one event with its fields; use the [`log!`](crate::log) macro
/// (`log!(Level::Info, "shard {}: connection closed", id; peer = peer, reason = reason)`).
pub fn write_event(level: Level, args: std::fmt::Arguments<'_>, fields: &[Field<'_>]) {
    use std::io::Write;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let line = format_event(format(), now.as_millis() as u64, level, &args.to_string(), fields);
    // One write per line so that lines from different shards do not interleave.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// One line (with its newline) in `format`.
fn format_event(format: LogFormat, epoch_ms: u64, level: Level, message: &str, fields: &[Field<'_>]) -> String {
    let mut line = String::with_capacity(64 + message.len());
    match format {
        LogFormat::Text => {
            let _ = write!(line, "{} {} {message}", format_utc(epoch_ms), level.label());
            for (key, value) in fields {
                let value = value.to_string();
                let quote = value.is_empty() || value.contains([' ', '"', '=']);
                if quote {
                    let _ = write!(line, " {key}=\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""));
                } else {
                    let _ = write!(line, " {key}={value}");
                }
            }
        }
        LogFormat::Json => {
            let _ = write!(line, "{{\"ts\":\"{}\",\"level\":\"{}\"", format_utc(epoch_ms), level.name());
            let (shard, message) = split_shard_prefix(message);
            match shard {
                Some(shard) => {
                    let _ = write!(line, ",\"target\":\"shard\",\"shard\":{shard}");
                }
                None => line.push_str(",\"target\":\"broker\""),
            }
            line.push_str(",\"msg\":");
            push_json_string(&mut line, message);
            for (key, value) in fields {
                let value = value.to_string();
                let _ = write!(line, ",\"{key}\":");
                if is_decimal_number(&value) {
                    line.push_str(&value);
                } else {
                    push_json_string(&mut line, &value);
                }
            }
            line.push('}');
        }
    }
    line.push('\n');
    line
}

/// `shard 3: rest` is `(Some(3), "rest")`; any other message has no shard.
fn split_shard_prefix(message: &str) -> (Option<u16>, &str) {
    let parsed = message.strip_prefix("shard ").and_then(|rest| {
        let (number, rest) = rest.split_once(": ")?;
        Some((number.parse().ok()?, rest))
    });
    match parsed {
        Some((shard, rest)) => (Some(shard), rest),
        None => (None, message),
    }
}

/// `12`, `-3`, `0.25`: written as a JSON number (no leading zeros, which JSON forbids).
fn is_decimal_number(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, "1"));
    let all_digits = |part: &str| !part.is_empty() && part.bytes().all(|byte| byte.is_ascii_digit());
    all_digits(whole) && all_digits(fraction) && (whole == "0" || !whole.starts_with('0'))
}

/// Appends `text` as a JSON string (RFC 8259 escapes).
fn push_json_string(line: &mut String, text: &str) {
    line.push('"');
    for character in text.chars() {
        match character {
            '"' => line.push_str("\\\""),
            '\\' => line.push_str("\\\\"),
            '\n' => line.push_str("\\n"),
            '\r' => line.push_str("\\r"),
            '\t' => line.push_str("\\t"),
            control if u32::from(control) < 0x20 => {
                let _ = write!(line, "\\u{:04x}", u32::from(control));
            }
            other => line.push(other),
        }
    }
    line.push('"');
}

/// RFC 3339 UTC timestamp with milliseconds, from milliseconds since the Unix epoch.
fn format_utc(epoch_ms: u64) -> String {
    let seconds = epoch_ms / 1000;
    let (days, day_seconds) = (seconds / 86_400, seconds % 86_400);
    // Civil-from-days (proleptic Gregorian), after Howard Hinnant's published algorithm.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        day_seconds / 3600,
        day_seconds / 60 % 60,
        day_seconds % 60,
        epoch_ms % 1000
    )
}

/// `log!(Level::Info, "shard {}: ...", id)`: formats only when the level is enabled. Fields
/// follow a `;`: `log!(Level::Info, "shard {}: connection closed", id; peer = peer, reason = why)`
/// (each value is anything that implements `Display`).
#[macro_export]
macro_rules! log {
    ($level:expr, $format:literal $(, $arg:expr)* $(,)? ; $($key:ident = $value:expr),+ $(,)?) => {
        if $crate::logging::enabled($level) {
            $crate::logging::write_event(
                $level,
                format_args!($format $(, $arg)*),
                &[$((stringify!($key), &$value as &dyn ::std::fmt::Display)),+],
            );
        }
    };
    ($level:expr, $($arg:tt)+) => {
        if $crate::logging::enabled($level) {
            $crate::logging::write_line($level, format_args!($($arg)+));
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00.000Z");
        // 2026-11-28T20:16:22.123Z
        assert_eq!(format_utc(1_795_896_982_123), "2026-11-28T20:16:22.123Z");
        // Leap day.
        assert_eq!(format_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn text_lines_carry_fields_as_key_value() {
        let fields: [Field<'_>; 3] = [("peer", &"127.0.0.1:4000"), ("reason", &"client closed (1000)"), ("n", &3)];
        let line = format_event(LogFormat::Text, 0, Level::Info, "shard 1: connection closed", &fields);
        assert_eq!(
            line,
            "1970-01-01T00:00:00.000Z INFO  shard 1: connection closed peer=127.0.0.1:4000 \
             reason=\"client closed (1000)\" n=3\n"
        );
    }

    #[test]
    fn json_lines_are_one_object_with_the_shard_lifted_out() {
        let fields: [Field<'_>; 3] = [("peer", &"127.0.0.1:4000"), ("reason", &"a \"quoted\"\nline"), ("rate", &12.5)];
        let line = format_event(LogFormat::Json, 0, Level::Warn, "shard 12: closed", &fields);
        assert_eq!(
            line,
            "{\"ts\":\"1970-01-01T00:00:00.000Z\",\"level\":\"warn\",\"target\":\"shard\",\"shard\":12,\
             \"msg\":\"closed\",\"peer\":\"127.0.0.1:4000\",\"reason\":\"a \\\"quoted\\\"\\nline\",\"rate\":12.5}\n"
        );
        let plain = format_event(LogFormat::Json, 0, Level::Info, "stopped", &[]);
        assert!(plain.contains("\"target\":\"broker\",\"msg\":\"stopped\"}"), "{plain}");
        assert!(!is_decimal_number("007") && !is_decimal_number("1.") && is_decimal_number("-0.5"));
    }

    #[test]
    fn parses_levels() {
        assert_eq!(Level::parse("DEBUG"), Some(Level::Debug));
        assert_eq!(Level::parse("nope"), None);
    }
}
