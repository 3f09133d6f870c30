//! Credentials: where a client puts them and how they are read (sans-IO).
//!
//! Three places, at most one per connection (docs/PROTOCOL.md, OPEN; docs/SECURITY.md):
//! - the OPEN frame: `login` + `passcode` is a user and password; an empty `login` with a
//!   `passcode` is a bearer token;
//! - the upgrade request's `Authorization` header: `Basic base64(user:password)` or
//!   `Bearer TOKEN`;
//! - the upgrade request's query string, `/?token=TOKEN` (percent-encoded), for browsers, which
//!   cannot set headers on a WebSocket. URLs end up in proxies' and browsers' logs: the broker
//!   never logs it, and a token given this way should be short-lived.
//!
//! Credentials given in two places are refused (which one would count is a trap). Nothing here
//! is ever logged or formatted: [`Credentials`]'s `Debug` redacts the secrets.

use crate::mbws;
use crate::ws::handshake::{base64_decode, HttpRequest};

/// Longest `Authorization` header value or query token read (a JWT of a few KiB fits).
pub const MAX_CREDENTIAL_BYTES: usize = 4096;

/// What a client presented.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// Nothing: anonymous access, if the broker allows it.
    Anonymous,
    Password {
        user: String,
        password: String,
    },
    Token(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Anonymous => write!(formatter, "Anonymous"),
            Credentials::Password { .. } => write!(formatter, "Password(<redacted>)"),
            Credentials::Token(_) => write!(formatter, "Token(<redacted>)"),
        }
    }
}

/// The credentials of an upgrade request, kept until its OPEN arrives.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct UpgradeCredentials {
    /// The `Authorization` header's value, if any.
    authorization: Option<String>,
    /// The `token` query parameter, percent-decoded, or why it could not be read.
    query_token: Option<Result<String, String>>,
    /// More than one `Authorization` header or `token` parameter.
    repeated: Option<&'static str>,
}

impl std::fmt::Debug for UpgradeCredentials {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let present = |given: bool| if given { "<redacted>" } else { "none" };
        formatter
            .debug_struct("UpgradeCredentials")
            .field("authorization", &present(self.authorization.is_some()))
            .field("query_token", &present(self.query_token.is_some()))
            .finish()
    }
}

impl UpgradeCredentials {
    /// Reads the `Authorization` header and the `token` query parameter of `request`.
    pub fn from_request(request: &HttpRequest) -> UpgradeCredentials {
        let mut credentials = UpgradeCredentials::default();
        let mut headers = request.header_values("Authorization");
        credentials.authorization = headers.next().map(str::to_owned);
        if headers.next().is_some() {
            credentials.repeated = Some("the Authorization header appears more than once");
        }
        if let Some((_, query)) = request.path.split_once('?') {
            let mut tokens = query.split('&').filter_map(|pair| pair.strip_prefix("token="));
            credentials.query_token = tokens.next().map(percent_decode);
            if tokens.next().is_some() {
                credentials.repeated = Some("the query string has more than one token parameter");
            }
        }
        credentials
    }
}

/// The credentials of a connection: from its `open` frame and its upgrade request. `Err` is
/// the reason for a fatal 4401 (it never quotes a secret).
pub fn credentials(open: &mbws::Open, upgrade: &UpgradeCredentials) -> Result<Credentials, String> {
    if let Some(problem) = upgrade.repeated {
        return Err(format!("OPEN: {problem}; give credentials once"));
    }
    let from_open = match (open.login.is_empty(), open.passcode.is_empty()) {
        (true, true) => None,
        (false, _) => Some(Credentials::Password {
            user: String::from_utf8_lossy(&open.login).into_owned(),
            password: String::from_utf8_lossy(&open.passcode).into_owned(),
        }),
        (true, false) => Some(Credentials::Token(String::from_utf8_lossy(&open.passcode).into_owned())),
    };
    let from_header = upgrade.authorization.as_deref().map(parse_authorization).transpose()?;
    let from_query = upgrade.query_token.clone().transpose()?.map(Credentials::Token);
    let mut given = [("the OPEN frame", from_open), ("the Authorization header", from_header), ("?token=", from_query)]
        .into_iter()
        .filter_map(|(place, credentials)| credentials.map(|credentials| (place, credentials)));
    match (given.next(), given.next()) {
        (None, _) => Ok(Credentials::Anonymous),
        (Some((_, credentials)), None) => Ok(credentials),
        (Some((first, _)), Some((second, _))) => {
            Err(format!("OPEN: credentials are given both in {first} and in {second}; give them in one place only"))
        }
    }
}

/// `Basic base64(user:password)` or `Bearer TOKEN` (the scheme in any case, RFC 9110).
pub fn parse_authorization(value: &str) -> Result<Credentials, String> {
    if value.len() > MAX_CREDENTIAL_BYTES {
        return Err(format!("OPEN: the Authorization header is longer than {MAX_CREDENTIAL_BYTES} bytes"));
    }
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value.trim(), ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        return Ok(Credentials::Token(rest.to_owned()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let pair = base64_decode(rest).and_then(|bytes| String::from_utf8(bytes).ok());
        if let Some((user, password)) = pair.as_deref().and_then(|pair| pair.split_once(':')) {
            return Ok(Credentials::Password { user: user.to_owned(), password: password.to_owned() });
        }
        return Err("OPEN: the Authorization header's Basic credentials are not base64 of user:password".into());
    }
    Err("OPEN: the Authorization header is neither Basic (base64 of user:password) nor Bearer TOKEN".into())
}

/// `%XX` escapes decoded (a `+` stays a `+`: tokens are not form data). `Err` names the
/// problem without the token.
fn percent_decode(text: &str) -> Result<String, String> {
    if text.len() > MAX_CREDENTIAL_BYTES {
        return Err(format!("OPEN: the token query parameter is longer than {MAX_CREDENTIAL_BYTES} bytes"));
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = bytes.get(index + 1..index + 3).and_then(|hex| std::str::from_utf8(hex).ok());
            let Some(byte) = hex.and_then(|hex| u8::from_str_radix(hex, 16).ok()) else {
                return Err("OPEN: the token query parameter has a % that is not followed by two hex digits".into());
            };
            out.push(byte);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "OPEN: the token query parameter is not UTF-8 once decoded".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn request(path: &str, headers: &[(&str, &str)]) -> HttpRequest {
        HttpRequest {
            method: "GET".into(),
            path: path.into(),
            headers: headers.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect(),
        }
    }

    fn open(login: &str, passcode: &str) -> mbws::Open {
        mbws::Open {
            login: Bytes::copy_from_slice(login.as_bytes()),
            passcode: Bytes::copy_from_slice(passcode.as_bytes()),
            ..Default::default()
        }
    }

    fn password(user: &str, password: &str) -> Credentials {
        Credentials::Password { user: user.into(), password: password.into() }
    }

    #[test]
    fn each_place_gives_its_credentials() {
        let none = UpgradeCredentials::default();
        assert_eq!(credentials(&open("", ""), &none), Ok(Credentials::Anonymous));
        assert_eq!(credentials(&open("alice", "s3cret"), &none), Ok(password("alice", "s3cret")));
        assert_eq!(credentials(&open("", "tok"), &none), Ok(Credentials::Token("tok".into())));
        // "alice:s3cr:et" in base64: the password may contain colons.
        let basic = UpgradeCredentials::from_request(&request("/", &[("Authorization", "Basic YWxpY2U6czNjcjpldA==")]));
        assert_eq!(credentials(&open("", ""), &basic), Ok(password("alice", "s3cr:et")));
        let bearer = UpgradeCredentials::from_request(&request("/", &[("authorization", "bearer abc.def")]));
        assert_eq!(credentials(&open("", ""), &bearer), Ok(Credentials::Token("abc.def".into())));
        let query = UpgradeCredentials::from_request(&request("/?x=1&token=a%2Bb%3D", &[]));
        assert_eq!(credentials(&open("", ""), &query), Ok(Credentials::Token("a+b=".into())));
    }

    #[test]
    fn credentials_in_two_places_or_malformed_are_refused_without_quoting_them() {
        let query = UpgradeCredentials::from_request(&request("/?token=secret-token", &[]));
        let error = credentials(&open("alice", "s3cret"), &query).unwrap_err();
        assert!(error.contains("both in the OPEN frame and in ?token="), "{error}");
        let twice = UpgradeCredentials::from_request(&request("/?token=a&token=b", &[]));
        assert!(credentials(&open("", ""), &twice).unwrap_err().contains("more than one token"));
        for bad in ["Basic !!!!", "Basic YWxpY2U=", "Digest x", "Bearer "] {
            let upgrade = UpgradeCredentials::from_request(&request("/", &[("Authorization", bad)]));
            let error = credentials(&open("", ""), &upgrade).unwrap_err();
            assert!(error.starts_with("OPEN: the Authorization header"), "{bad}: {error}");
        }
        let bad_escape = UpgradeCredentials::from_request(&request("/?token=secret%zz", &[]));
        let error = credentials(&open("", ""), &bad_escape).unwrap_err();
        assert!(!error.contains("secret"), "{error}");
        assert!(!format!("{:?}", password("alice", "s3cret")).contains("s3cret"));
    }
}
