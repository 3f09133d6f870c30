//! Files the broker serves over plain HTTP on its WebSocket port, so that a web page can load the
//! JavaScript client from the broker itself: `GET /mbws.js` (clients/js/mbws.js), the web
//! console `GET /console` (clients/js/console.html) and the console's session module, which the
//! console runs in a Worker, `GET /console-session.js` (clients/js/console-session.js), all built
//! into the binary: nothing to install beside it.
//!
//! Only a GET or HEAD that is not a WebSocket upgrade, for one of these exact paths (a query
//! string is ignored), is answered here; every other request goes on to the upgrade checks and
//! keeps their answers (an upgrade at `/mbws.js` is still 404, a POST still 405). The response is
//! complete and the connection is closed after it, like a refused upgrade.
//!
//! Caching: each file has an ETag computed at compile time; browsers revalidate on every use
//! (`Cache-Control: no-cache`), so a page always runs the module of the broker it talks to, and
//! a revalidation costs a 304 without the body. `Access-Control-Allow-Origin: *` lets pages of
//! other origins import the module (it is public, and carries no credentials).

use crate::ws::handshake::HttpRequest;

/// One file served from the binary.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
    etag: u64,
}

const MBWS_JS: &[u8] = include_bytes!("../../clients/js/mbws.js");
const CONSOLE_HTML: &[u8] = include_bytes!("../../clients/js/console.html");
const CONSOLE_SESSION_JS: &[u8] = include_bytes!("../../clients/js/console-session.js");

static ASSETS: &[Asset] = &[
    Asset { path: "/mbws.js", content_type: "text/javascript; charset=utf-8", body: MBWS_JS, etag: fnv1a(MBWS_JS) },
    // The web console; it runs ./console-session.js (below), which imports ./mbws.js (above).
    Asset { path: "/console", content_type: "text/html; charset=utf-8", body: CONSOLE_HTML, etag: fnv1a(CONSOLE_HTML) },
    // The console's session (a module Worker's script, or imported by the console without Workers).
    Asset {
        path: "/console-session.js",
        content_type: "text/javascript; charset=utf-8",
        body: CONSOLE_SESSION_JS,
        etag: fnv1a(CONSOLE_SESSION_JS),
    },
];

/// FNV-1a over `bytes`, at compile time: an ETag only needs to change when the file does.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut index = 0;
    while index < bytes.len() {
        hash ^= bytes[index] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        index += 1;
    }
    hash
}

/// The complete HTTP response for `request` if it asks for a served file (see the module docs),
/// else `None`: the request is an upgrade attempt, answered by the handshake as before.
pub fn response(request: &HttpRequest) -> Option<Vec<u8>> {
    if request.method != "GET" && request.method != "HEAD" {
        return None;
    }
    let is_upgrade = request
        .header_values("Upgrade")
        .any(|value| value.split(',').any(|token| token.trim().eq_ignore_ascii_case("websocket")));
    if is_upgrade {
        return None;
    }
    let path = request.path.split_once('?').map_or(&request.path[..], |(path, _)| path);
    let asset = ASSETS.iter().find(|asset| asset.path == path)?;
    let etag = format!("\"{:016x}\"", asset.etag);
    let unchanged = request
        .header_values("If-None-Match")
        .any(|value| value.split(',').any(|tag| tag.trim() == etag || tag.trim() == "*"));
    let (status, body): (&str, &[u8]) = if unchanged { ("304 Not Modified", b"") } else { ("200 OK", asset.body) };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {}\r\nContent-Length: {}\r\nETag: {etag}\r\n\
         Cache-Control: no-cache\r\nX-Content-Type-Options: nosniff\r\nAccess-Control-Allow-Origin: *\r\n\
         Connection: close\r\n\r\n",
        asset.content_type,
        body.len()
    )
    .into_bytes();
    if request.method == "GET" {
        response.extend_from_slice(body);
    }
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> HttpRequest {
        HttpRequest {
            method: method.to_owned(),
            path: path.to_owned(),
            headers: headers.iter().map(|(name, value)| ((*name).to_owned(), (*value).to_owned())).collect(),
        }
    }

    fn text(response: &[u8]) -> String {
        String::from_utf8_lossy(response).into_owned()
    }

    #[test]
    fn get_serves_the_module_with_its_type_and_cache_headers() {
        let response = response(&request("GET", "/mbws.js?v=1", &[("Host", "x")])).expect("served");
        let text = text(&response);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Type: text/javascript; charset=utf-8\r\n"));
        assert!(text.contains(&format!("Content-Length: {}\r\n", MBWS_JS.len())));
        assert!(text.contains("Cache-Control: no-cache\r\n"));
        assert!(response.ends_with(MBWS_JS));
    }

    #[test]
    fn a_matching_etag_gets_304_and_head_gets_no_body() {
        let etag = format!("\"{:016x}\"", fnv1a(MBWS_JS));
        let unchanged = text(&response(&request("GET", "/mbws.js", &[("If-None-Match", &etag)])).unwrap());
        assert!(
            unchanged.starts_with("HTTP/1.1 304 Not Modified\r\n") && unchanged.ends_with("\r\n\r\n"),
            "{unchanged}"
        );
        let changed = text(&response(&request("GET", "/mbws.js", &[("If-None-Match", "\"0\"")])).unwrap());
        assert!(changed.starts_with("HTTP/1.1 200 OK\r\n"));
        let head = response(&request("HEAD", "/mbws.js", &[])).unwrap();
        assert!(
            text(&head).ends_with("\r\n\r\n") && text(&head).contains(&format!("Content-Length: {}", MBWS_JS.len()))
        );
    }

    #[test]
    fn upgrades_other_methods_and_other_paths_are_left_to_the_handshake() {
        assert!(response(&request("GET", "/mbws.js", &[("Upgrade", "websocket")])).is_none());
        assert!(response(&request("POST", "/mbws.js", &[])).is_none());
        assert!(response(&request("GET", "/", &[])).is_none());
        assert!(response(&request("GET", "/mbws.jsx", &[])).is_none());
    }
}
