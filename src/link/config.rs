//! `[[link]]` sections of the configuration file, checked into [`LinkSpec`]s.
//!
//! [`LinkSection`] is the file's shape (serde, `deny_unknown_fields`, every key optional so a
//! missing one is named by us, not by serde); [`LinkSpec::from_sections`] checks every link and
//! the relations between them (unique names, no loop through this broker), and every error
//! names the link, the key, the value and what to give instead. [`LinkSpec::to_section`] goes
//! back, for `--print-config`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Secret;
use crate::mbws::DeliveryMode;

/// Bounds of the numeric keys, with their defaults (one source for the checks, the docs in
/// packaging/broker.toml and the defaults).
pub const MAX_IN_FLIGHT: (u64, u64, u64) = (1, 65_535, 1_000);
pub const MAX_HOPS: (u64, u64, u64) = (1, 16, 1);
pub const TIMEOUT_MS: (u64, u64, u64) = (100, 600_000, 10_000);
pub const RECONNECT_MAX_MS: (u64, u64, u64) = (10, 600_000, 5_000);
/// Links one broker may have (each is a thread and two sessions).
pub const MAX_LINKS: usize = 64;
/// Addresses one link may name (each is a subscription of its source session).
pub const MAX_LINK_ADDRESSES: usize = 1_000;

/// One `[[link]]` section as written (see packaging/broker.toml for every key).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LinkSection {
    pub name: Option<String>,
    pub url: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub login: Option<String>,
    pub passcode: Option<Secret>,
    pub direction: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    pub mode: Option<String>,
    pub target_prefix: Option<String>,
    pub max_in_flight: Option<u64>,
    pub max_hops: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub reconnect_max_ms: Option<u64>,
    pub local_login: Option<String>,
    pub local_passcode: Option<Secret>,
    /// Source address = target address (exact names), after the plain keys (a TOML table).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rename: BTreeMap<String, String>,
}

/// Which way a link carries messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Consumes the addresses here and sends them to the remote broker.
    Out,
    /// Consumes the addresses on the remote broker and sends them here.
    In,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Out => "out",
            Direction::In => "in",
        }
    }
}

/// One checked link.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkSpec {
    pub name: String,
    /// The remote broker, `ws://HOST:PORT/` or `wss://HOST:PORT/`.
    pub url: String,
    pub ca_file: Option<PathBuf>,
    /// Credentials of the remote session (empty: anonymous).
    pub login: String,
    pub passcode: Option<Secret>,
    pub direction: Direction,
    /// The addresses consumed on the source side (here for `out`, there for `in`).
    pub addresses: Vec<String>,
    /// How the link subscribes on the source side.
    pub mode: DeliveryMode,
    /// Target address = `target_prefix` + source address, unless `rename` names it.
    pub target_prefix: String,
    pub rename: BTreeMap<String, String>,
    /// Deliveries the link holds unsettled at once (its credit at the source, its batch).
    pub max_in_flight: u32,
    /// A message that crossed this many links already is not forwarded again (loop guard).
    pub max_hops: u32,
    /// Bound on each wait of the link (connect, a receipt, the close of a session).
    pub timeout: Duration,
    /// Longest pause between two attempts at a new session (the backoff's cap).
    pub reconnect_max: Duration,
    /// Credentials of the session into this broker (when its `[auth]` requires them).
    pub local_login: String,
    pub local_passcode: Option<Secret>,
}

impl LinkSpec {
    /// The address a message from `source` is sent to on the target side.
    pub fn target_of(&self, source: &str) -> String {
        match self.rename.get(source) {
            Some(target) => target.clone(),
            None => format!("{}{source}", self.target_prefix),
        }
    }

    /// Checks every section; `file` names the configuration file in errors.
    pub fn from_sections(sections: &[LinkSection], file: &str) -> Result<Vec<LinkSpec>, String> {
        if sections.len() > MAX_LINKS {
            return Err(format!(
                "{file}: {} [[link]] sections, at most {MAX_LINKS} are allowed (each is a thread and two sessions)",
                sections.len()
            ));
        }
        let mut links = Vec::with_capacity(sections.len());
        for (index, section) in sections.iter().enumerate() {
            let link = LinkSpec::from_section(section, index, file)?;
            if let Some(other) = links.iter().find(|other: &&LinkSpec| other.name == link.name) {
                return Err(format!(
                    "{file}: two [[link]] sections are named \"{}\"; give each link its own name",
                    other.name
                ));
            }
            links.push(link);
        }
        check_no_loop(&links, file)?;
        Ok(links)
    }

    fn from_section(section: &LinkSection, index: usize, file: &str) -> Result<LinkSpec, String> {
        let which = match &section.name {
            Some(name) => format!("{file}: [[link]] \"{name}\""),
            None => format!("{file}: [[link]] number {}", index + 1),
        };
        let bad = |key: &str, problem: String| format!("{which}: {key}: {problem}");
        let name = section.name.clone().ok_or_else(|| bad("name", "missing; give each link a name".into()))?;
        if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(bad(
                "name",
                format!("\"{name}\" is not valid: give 1 to 64 letters, digits, '-', '_' or '.' (it names the link in logs and metrics)"),
            ));
        }
        let url = section.url.clone().ok_or_else(|| {
            bad("url", "missing; give the remote broker as ws://HOST:PORT/ or wss://HOST:PORT/".into())
        })?;
        let parsed = mbws_client::parse_url_syntax(&url).map_err(|error| bad("url", error.to_string()))?;
        if !url.to_ascii_lowercase().starts_with("ws://") && !url.to_ascii_lowercase().starts_with("wss://") {
            return Err(bad("url", format!("\"{url}\" has no scheme; give ws://HOST:PORT/ or wss://HOST:PORT/")));
        }
        if let Some(ca_file) = &section.ca_file {
            if !parsed.tls {
                return Err(bad("ca-file", format!("given for {url}, which is not wss://; remove it or use wss://")));
            }
            mbws_client::tls_client_config(Some(ca_file)).map_err(|error| bad("ca-file", error.to_string()))?;
        }
        let direction = match section.direction.as_deref() {
            Some("out") => Direction::Out,
            Some("in") => Direction::In,
            Some(other) => {
                return Err(bad(
                    "direction",
                    format!("\"{other}\" is not valid: give \"out\" (here to there) or \"in\" (there to here)"),
                ))
            }
            None => {
                return Err(bad("direction", "missing; give \"out\" (here to there) or \"in\" (there to here)".into()))
            }
        };
        let mode = match section.mode.as_deref() {
            None | Some("anycast") => DeliveryMode::Anycast,
            Some("multicast") => DeliveryMode::Multicast,
            Some(other) => {
                return Err(bad(
                    "mode",
                    format!(
                    "\"{other}\" is not valid: give \"anycast\" (take the messages) or \"multicast\" (a copy of each)"
                ),
                ))
            }
        };
        if section.addresses.is_empty() {
            return Err(bad(
                "addresses",
                "missing or empty; give the addresses the link consumes, e.g. [\"orders\"]".into(),
            ));
        }
        if section.addresses.len() > MAX_LINK_ADDRESSES {
            return Err(bad(
                "addresses",
                format!("{} addresses, at most {MAX_LINK_ADDRESSES}", section.addresses.len()),
            ));
        }
        let check_address = |key: &str, address: &str| -> Result<(), String> {
            if address.is_empty() {
                return Err(bad(key, "an empty address; give a name of 1 to 255 bytes".into()));
            }
            if address.ends_with('*') {
                return Err(bad(
                    key,
                    format!("\"{address}\": patterns are not supported yet; list the addresses one by one (docs/CLUSTER.md, \"Links\")"),
                ));
            }
            if address.len() > 255 || address.contains(['\r', '\n', '\0']) {
                return Err(bad(
                    key,
                    format!("\"{address}\" is not a valid address: give 1 to 255 bytes of UTF-8 without CR, LF or NUL"),
                ));
            }
            Ok(())
        };
        for (position, address) in section.addresses.iter().enumerate() {
            check_address("addresses", address)?;
            if section.addresses[..position].contains(address) {
                return Err(bad("addresses", format!("\"{address}\" is listed twice")));
            }
        }
        let target_prefix = section.target_prefix.clone().unwrap_or_default();
        for (source, target) in &section.rename {
            if !section.addresses.contains(source) {
                return Err(bad(
                    "rename",
                    format!("\"{source}\" is not one of the link's addresses; rename only what it consumes"),
                ));
            }
            check_address("rename", target)?;
        }
        for address in &section.addresses {
            if !section.rename.contains_key(address) {
                check_address("target-prefix", &format!("{target_prefix}{address}"))?;
            }
        }
        let number = |key: &str, value: Option<u64>, (low, high, default): (u64, u64, u64)| match value {
            None => Ok(default),
            Some(value) if (low..=high).contains(&value) => Ok(value),
            Some(value) => Err(bad(key, format!("{value} is out of range: give {low} to {high} (default {default})"))),
        };
        Ok(LinkSpec {
            url,
            ca_file: section.ca_file.clone(),
            login: section.login.clone().unwrap_or_default(),
            passcode: section.passcode.clone(),
            direction,
            addresses: section.addresses.clone(),
            mode,
            target_prefix,
            rename: section.rename.clone(),
            max_in_flight: number("max-in-flight", section.max_in_flight, MAX_IN_FLIGHT)? as u32,
            max_hops: number("max-hops", section.max_hops, MAX_HOPS)? as u32,
            timeout: Duration::from_millis(number("timeout-ms", section.timeout_ms, TIMEOUT_MS)?),
            reconnect_max: Duration::from_millis(number(
                "reconnect-max-ms",
                section.reconnect_max_ms,
                RECONNECT_MAX_MS,
            )?),
            local_login: section.local_login.clone().unwrap_or_default(),
            local_passcode: section.local_passcode.clone(),
            name,
        })
    }

    /// This link as its section, for `--print-config`; read back it gives the same link.
    pub fn to_section(&self) -> LinkSection {
        LinkSection {
            name: Some(self.name.clone()),
            url: Some(self.url.clone()),
            ca_file: self.ca_file.clone(),
            login: (!self.login.is_empty()).then(|| self.login.clone()),
            passcode: self.passcode.clone(),
            direction: Some(self.direction.name().into()),
            addresses: self.addresses.clone(),
            mode: Some(mode_name(self.mode).into()),
            target_prefix: Some(self.target_prefix.clone()),
            max_in_flight: Some(self.max_in_flight.into()),
            max_hops: Some(self.max_hops.into()),
            timeout_ms: Some(self.timeout.as_millis() as u64),
            reconnect_max_ms: Some(self.reconnect_max.as_millis() as u64),
            local_login: (!self.local_login.is_empty()).then(|| self.local_login.clone()),
            local_passcode: self.local_passcode.clone(),
            rename: self.rename.clone(),
        }
    }
}

pub fn mode_name(mode: DeliveryMode) -> &'static str {
    match mode {
        DeliveryMode::Anycast => "anycast",
        DeliveryMode::Multicast => "multicast",
    }
}

/// A loop through this broker: an `in` link that delivers here to an address an `out` link of
/// the same remote broker consumes here and sends back to the address the `in` link consumes.
/// Loops that only the two configurations together show (A's `out` to B, B's `out` to A) are
/// stopped at run time by `max-hops` (docs/CLUSTER.md, "Links").
fn check_no_loop(links: &[LinkSpec], file: &str) -> Result<(), String> {
    for inbound in links.iter().filter(|link| link.direction == Direction::In) {
        for outbound in
            links.iter().filter(|link| link.direction == Direction::Out && same_broker(&link.url, &inbound.url))
        {
            for there in &inbound.addresses {
                let here = inbound.target_of(there);
                if outbound.addresses.contains(&here) && outbound.target_of(&here) == *there {
                    return Err(format!(
                        "{file}: [[link]] \"{}\" brings \"{there}\" from {} here as \"{here}\", and [[link]] \"{}\" sends \
                         \"{here}\" back there as \"{there}\": a loop; remove the address from one of the two links",
                        inbound.name, inbound.url, outbound.name
                    ));
                }
            }
        }
    }
    Ok(())
}

fn same_broker(a: &str, b: &str) -> bool {
    match (mbws_client::parse_url_syntax(a), mbws_client::parse_url_syntax(b)) {
        (Ok(a), Ok(b)) => a.authority.eq_ignore_ascii_case(&b.authority),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<LinkSpec>, String> {
        #[derive(Deserialize)]
        struct File {
            link: Vec<LinkSection>,
        }
        let file: File = toml::from_str(text).map_err(|error| error.to_string())?;
        LinkSpec::from_sections(&file.link, "broker.toml")
    }

    #[test]
    fn a_link_reads_with_its_defaults() {
        let links = parse(
            "[[link]]\nname = \"b\"\nurl = \"ws://127.0.0.1:9/\"\ndirection = \"out\"\naddresses = [\"orders\"]\n",
        )
        .unwrap();
        let link = &links[0];
        assert_eq!(
            (link.direction, link.mode, link.max_in_flight, link.max_hops),
            (Direction::Out, DeliveryMode::Anycast, 1000, 1)
        );
        assert_eq!(link.target_of("orders"), "orders");
        let back = LinkSpec::from_sections(&[link.to_section()], "x").unwrap();
        assert_eq!(back[0], *link);
    }

    #[test]
    fn bad_links_name_the_link_the_key_and_what_to_give() {
        let base =
            "[[link]]\nname = \"b\"\nurl = \"ws://127.0.0.1:9/\"\ndirection = \"out\"\naddresses = [\"orders\"]\n";
        for (extra_or_change, says) in [
            (base.replace("url = \"ws://127.0.0.1:9/\"", "url = \"http://h/\""), "url"),
            (base.replace("\"out\"", "\"sideways\""), "direction: \"sideways\" is not valid"),
            (base.replace("[\"orders\"]", "[]"), "addresses: missing or empty"),
            (base.replace("[\"orders\"]", "[\"orders.*\"]"), "patterns are not supported"),
            (format!("{base}max-in-flight = 0\n"), "max-in-flight: 0 is out of range: give 1 to 65535"),
            (format!("{base}[link.rename]\nother = \"x\"\n"), "rename: \"other\" is not one of"),
            (format!("{base}{}", base.replace("\"out\"", "\"in\"")), "two [[link]] sections are named \"b\""),
            (base.replace("name = \"b\"\n", ""), "[[link]] number 1: name: missing"),
        ] {
            let error = parse(&extra_or_change).unwrap_err();
            assert!(error.contains("broker.toml") && error.contains(says), "{says}: {error}");
        }
    }

    #[test]
    fn a_loop_through_this_broker_is_refused() {
        let text = "[[link]]\nname = \"there\"\nurl = \"ws://b:1/\"\ndirection = \"out\"\naddresses = [\"x\"]\n\
                    [[link]]\nname = \"back\"\nurl = \"ws://b:1/\"\ndirection = \"in\"\naddresses = [\"x\"]\n";
        let error = parse(text).unwrap_err();
        assert!(error.contains("a loop") && error.contains("\"there\"") && error.contains("\"back\""), "{error}");
        // Renamed on the way, it is no loop.
        let renamed =
            text.replace("addresses = [\"x\"]\n[[link]]", "addresses = [\"x\"]\ntarget-prefix = \"a.\"\n[[link]]");
        parse(&renamed).unwrap();
    }
}
