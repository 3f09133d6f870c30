//! Output: the JSON result object, the human-readable table, and the progress line.
//!
//! JSON is written by hand from a small [`Json`] tree: the result is a handful of numbers and
//! strings, not worth a serializer dependency. Non-finite numbers are written as `null`.

use std::fmt::{self, Write as _};
use std::io::Write as _;

/// A JSON value.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Int(u64),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// An object from `(key, value)` pairs, keeping their order.
    pub fn object<K: Into<String>>(fields: impl IntoIterator<Item = (K, Json)>) -> Json {
        Json::Obj(fields.into_iter().map(|(key, value)| (key.into(), value)).collect())
    }

    /// A number rounded to 3 decimals (`null` if absent or not finite).
    pub fn num(value: Option<f64>) -> Json {
        match value {
            Some(value) if value.is_finite() => Json::Num((value * 1000.0).round() / 1000.0),
            _ => Json::Null,
        }
    }

    pub fn str(value: impl Into<String>) -> Json {
        Json::Str(value.into())
    }
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Json::Null => f.write_str("null"),
            Json::Bool(value) => write!(f, "{value}"),
            Json::Int(value) => write!(f, "{value}"),
            Json::Num(value) if value.is_finite() => write!(f, "{value}"),
            Json::Num(_) => f.write_str("null"),
            Json::Str(value) => write_json_string(f, value),
            Json::Arr(values) => {
                f.write_char('[')?;
                for (index, value) in values.iter().enumerate() {
                    if index > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{value}")?;
                }
                f.write_char(']')
            }
            Json::Obj(fields) => {
                f.write_char('{')?;
                for (index, (key, value)) in fields.iter().enumerate() {
                    if index > 0 {
                        f.write_str(", ")?;
                    }
                    write_json_string(f, key)?;
                    write!(f, ": {value}")?;
                }
                f.write_char('}')
            }
        }
    }
}

fn write_json_string(f: &mut fmt::Formatter<'_>, text: &str) -> fmt::Result {
    f.write_char('"')?;
    for c in text.chars() {
        match c {
            '"' => f.write_str("\\\"")?,
            '\\' => f.write_str("\\\\")?,
            '\n' => f.write_str("\\n")?,
            '\r' => f.write_str("\\r")?,
            '\t' => f.write_str("\\t")?,
            c if (c as u32) < 0x20 => write!(f, "\\u{:04x}", c as u32)?,
            c => f.write_char(c)?,
        }
    }
    f.write_char('"')
}

/// `1234567.8` -> `"1,234,568"`.
pub fn thousands(value: f64) -> String {
    if !value.is_finite() {
        return "-".to_string();
    }
    let rounded = value.round() as i128;
    let digits = rounded.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if rounded < 0 {
        out.push('-');
    }
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// An optional number with `decimals` places, or `-`.
pub fn maybe(value: Option<f64>, decimals: usize) -> String {
    match value {
        Some(value) if value.is_finite() => format!("{value:.decimals$}"),
        _ => "-".to_string(),
    }
}

/// A two-column table: labels left-aligned, values after them.
pub fn table(rows: &[(String, String)]) -> String {
    let width = rows.iter().map(|(label, _)| label.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (label, value) in rows {
        let _ = writeln!(out, "{label:<width$}  {value}");
    }
    out
}

/// The one-line progress report on stderr, refreshed at most once a second.
pub struct Progress {
    label: String,
    unit: &'static str,
    /// Show the count's rate per second (otherwise the count itself).
    shows_rate: bool,
    started_ns: u64,
    last_ns: u64,
    last_count: u64,
    /// Characters of the line on screen (a shorter line is padded to cover it).
    shown_chars: usize,
}

impl Progress {
    /// A line like `[throughput mbws] 3.0s  412,331 msg/s`: the rate of the counter.
    pub fn rate(label: String, unit: &'static str, now_ns: u64, count: u64) -> Progress {
        Progress::new(label, unit, true, now_ns, count)
    }

    /// A line like `[connections mbws] 2.0s  5,000 open`: the counter itself.
    pub fn count(label: String, unit: &'static str, now_ns: u64, count: u64) -> Progress {
        Progress::new(label, unit, false, now_ns, count)
    }

    fn new(label: String, unit: &'static str, shows_rate: bool, now_ns: u64, count: u64) -> Progress {
        Progress { label, unit, shows_rate, started_ns: now_ns, last_ns: now_ns, last_count: count, shown_chars: 0 }
    }

    /// Restarts the clock and counter (a new phase).
    pub fn restart(&mut self, label: String, now_ns: u64, count: u64) {
        self.label = label;
        self.started_ns = now_ns;
        self.last_ns = now_ns;
        self.last_count = count;
    }

    pub fn tick(&mut self, now_ns: u64, count: u64) {
        let since_last = now_ns.saturating_sub(self.last_ns);
        if since_last < 1_000_000_000 {
            return;
        }
        let elapsed = now_ns.saturating_sub(self.started_ns) as f64 / 1e9;
        let shown = if self.shows_rate {
            let rate = count.saturating_sub(self.last_count) as f64 / (since_last as f64 / 1e9);
            format!("{} {}", thousands(rate), self.unit)
        } else {
            format!("{} {}", thousands(count as f64), self.unit)
        };
        let line = format!("[{}] {elapsed:.1}s  {shown}", self.label);
        let width = self.shown_chars;
        eprint!("\r{line:<width$}");
        let _ = std::io::stderr().flush();
        self.shown_chars = line.chars().count();
        self.last_ns = now_ns;
        self.last_count = count;
    }

    /// Ends the progress line so that what follows starts on a fresh line.
    pub fn finish(&mut self) {
        if self.shown_chars > 0 {
            eprintln!();
            self.shown_chars = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_written_compactly_and_escaped() {
        let value = Json::object([
            ("scenario", Json::str("thr\"ough\nput")),
            ("n", Json::Int(3)),
            ("x", Json::num(Some(1.23456))),
            ("none", Json::num(Some(f64::NAN))),
            ("list", Json::Arr(vec![Json::Bool(true), Json::Null])),
        ]);
        assert_eq!(
            value.to_string(),
            r#"{"scenario": "thr\"ough\nput", "n": 3, "x": 1.235, "none": null, "list": [true, null]}"#
        );
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(412_331.4), "412,331");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(0.0), "0");
    }
}
