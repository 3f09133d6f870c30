//! Permissions: which addresses a session may send to and consume from.
//!
//! Plain data, decided at OPEN and kept by the session (`Arc<Permissions>`), checked by the
//! session on every SEND and SUBSCRIBE (docs/SECURITY.md, "Permissions"). A pattern is an exact
//! address name (`orders`), a prefix ending in one `*` (`orders.*` matches every name that
//! starts with `orders.`), or `*` alone (every address). Each direction has an allow list and a
//! deny list; an address is allowed when an allow pattern matches it and no deny pattern does
//! (a deny rule wins). Dead-letter addresses (`DLQ.<address>`) are addresses like any other:
//! `orders` does not match `DLQ.orders`, `DLQ.*` or `*` does.

/// One address pattern (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(Box<[u8]>),
    /// Every name that starts with these bytes (`*` alone is the empty prefix).
    Prefix(Box<[u8]>),
}

impl Pattern {
    fn parse(text: &str) -> Result<Pattern, String> {
        let name = text.strip_suffix('*');
        let body = name.unwrap_or(text);
        if body.contains('*') {
            return Err(format!(
                "address pattern \"{text}\" has a * before its end: use an exact name (orders), a prefix \
                 followed by one * at the end (orders.*), or * for every address"
            ));
        }
        if text.is_empty() {
            return Err("an address pattern is empty: use an exact name, a prefix ending in *, or *".into());
        }
        if text.len() > crate::mbws::binary::MAX_STR8_BYTES {
            return Err(format!(
                "address pattern \"{text}\" is longer than an address can be ({} bytes)",
                crate::mbws::binary::MAX_STR8_BYTES
            ));
        }
        Ok(match name {
            Some(prefix) => Pattern::Prefix(prefix.as_bytes().into()),
            None => Pattern::Exact(text.as_bytes().into()),
        })
    }

    fn matches(&self, address: &[u8]) -> bool {
        match self {
            Pattern::Exact(name) => **name == *address,
            Pattern::Prefix(prefix) => address.starts_with(prefix),
        }
    }
}

/// The allow and deny patterns of one direction (send or consume).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Rules {
    allow: Vec<Pattern>,
    deny: Vec<Pattern>,
    /// Every address is allowed (a `*` and no deny rule): checked first, so that a session
    /// without restrictions (anonymous on loopback, the default) pays one compare per SEND.
    everything: bool,
}

impl Rules {
    fn parse(allow: &[String], deny: &[String]) -> Result<Rules, String> {
        let parse_all = |list: &[String]| list.iter().map(|text| Pattern::parse(text)).collect::<Result<Vec<_>, _>>();
        Ok(Rules::new(parse_all(allow)?, parse_all(deny)?))
    }

    fn new(allow: Vec<Pattern>, deny: Vec<Pattern>) -> Rules {
        let everything = deny.is_empty() && allow.iter().any(|pattern| *pattern == Pattern::Prefix(Box::default()));
        Rules { allow, deny, everything }
    }

    /// Inline for the common case (a session allowed everything: every SEND asks); the
    /// patterns are matched out of line.
    #[inline]
    fn allows(&self, address: &[u8]) -> bool {
        self.everything || self.patterns_allow(address)
    }

    #[inline(never)]
    fn patterns_allow(&self, address: &[u8]) -> bool {
        self.allow.iter().any(|pattern| pattern.matches(address)) && !self.deny.iter().any(|p| p.matches(address))
    }

    fn everything() -> Rules {
        Rules::new(vec![Pattern::Prefix(Box::default())], Vec::new())
    }
}

/// What a session may do (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    send: Rules,
    consume: Rules,
}

/// The patterns of one user, token or anonymous access, as written in the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PermissionLists<'a> {
    pub send: &'a [String],
    pub consume: &'a [String],
    pub deny_send: &'a [String],
    pub deny_consume: &'a [String],
}

impl Permissions {
    /// Reads the patterns (errors name the pattern and the syntax).
    pub fn parse(lists: &PermissionLists<'_>) -> Result<Permissions, String> {
        Ok(Permissions {
            send: Rules::parse(lists.send, lists.deny_send)?,
            consume: Rules::parse(lists.consume, lists.deny_consume)?,
        })
    }

    /// Send to and consume from every address.
    pub fn everything() -> Permissions {
        Permissions { send: Rules::everything(), consume: Rules::everything() }
    }

    #[inline]
    pub fn may_send(&self, address: &[u8]) -> bool {
        self.send.allows(address)
    }

    pub fn may_consume(&self, address: &[u8]) -> bool {
        self.consume.allows(address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|text| text.to_string()).collect()
    }

    fn permissions(send: &[&str], consume: &[&str], deny_send: &[&str], deny_consume: &[&str]) -> Permissions {
        let (send, consume, deny_send, deny_consume) =
            (strings(send), strings(consume), strings(deny_send), strings(deny_consume));
        Permissions::parse(&PermissionLists {
            send: &send,
            consume: &consume,
            deny_send: &deny_send,
            deny_consume: &deny_consume,
        })
        .unwrap()
    }

    #[test]
    fn exact_names_prefixes_and_the_wildcard() {
        let p = permissions(&["orders", "audit.*"], &["*"], &[], &[]);
        assert!(p.may_send(b"orders"));
        assert!(!p.may_send(b"orders2") && !p.may_send(b"order"), "an exact name is exact");
        assert!(p.may_send(b"audit.") && p.may_send(b"audit.eu.1"));
        assert!(!p.may_send(b"audit"), "audit.* needs the dot");
        assert!(p.may_consume(b"anything") && p.may_consume(b"DLQ.orders"));
        assert!(!Permissions::default().may_send(b"orders"), "nothing is allowed unless listed");
    }

    #[test]
    fn a_deny_rule_wins_over_an_allow_rule() {
        let p = permissions(&["*"], &["orders.*"], &["admin.*"], &["orders.secret"]);
        assert!(p.may_send(b"orders") && !p.may_send(b"admin.reset"));
        assert!(p.may_consume(b"orders.public") && !p.may_consume(b"orders.secret"));
    }

    #[test]
    fn dead_letter_addresses_follow_the_same_rules() {
        let p = permissions(&[], &["orders", "DLQ.orders"], &[], &[]);
        assert!(p.may_consume(b"DLQ.orders"));
        let p = permissions(&[], &["orders", "orders.*"], &[], &[]);
        assert!(!p.may_consume(b"DLQ.orders"), "orders does not give its dead letters");
        let p = permissions(&[], &["*"], &[], &["DLQ.*"]);
        assert!(p.may_consume(b"orders") && !p.may_consume(b"DLQ.orders"));
    }

    #[test]
    fn a_bad_pattern_is_refused_with_the_syntax() {
        for bad in ["a*b", "**", ""] {
            let list = strings(&[bad]);
            let error = Permissions::parse(&PermissionLists { send: &list, ..Default::default() }).unwrap_err();
            assert!(error.contains("exact name"), "{bad}: {error}");
        }
    }
}
