//! The status page: one self-contained HTML file (inline CSS and script, no external asset)
//! built into the binary and served at `GET /admin/`. It holds no data, so it needs no token;
//! its script asks for the admin token and reads everything from the JSON API with it.
//!
//! Its Content-Security-Policy allows exactly the page's own script (by SHA-256 hash), inline
//! styles, and requests to this listener only; it may not be framed.

use sha2::{Digest, Sha256};
use std::sync::LazyLock;

/// The page.
pub const PAGE_HTML: &str = include_str!("page.html");

/// Where the page is served.
pub const PAGE_PATH: &str = "/admin/";

/// The policy, with the hash of the page's script computed once.
static CSP: LazyLock<String> = LazyLock::new(|| {
    format!(
        "default-src 'none'; script-src 'sha256-{}'; style-src 'unsafe-inline'; \
         connect-src 'self'; img-src data:; form-action 'none'; base-uri 'none'; \
         frame-ancestors 'none'",
        base64(&Sha256::digest(inline_script(PAGE_HTML).as_bytes()))
    )
});

/// The answer for `method` and `path` when they ask for the page (`GET /admin/`, or
/// `GET /admin`, which is sent on to `/admin/`); `None` leaves the request to the API.
pub fn answer(method: &str, path: &str) -> Option<http::Response<Vec<u8>>> {
    if method != "GET" {
        return None;
    }
    let builder = http::Response::builder()
        .header(http::header::CACHE_CONTROL, "no-store")
        .header(http::header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(http::header::REFERRER_POLICY, "no-referrer");
    let response = match path {
        PAGE_PATH => builder
            .status(200)
            .header(http::header::CONTENT_TYPE, "text/html; charset=utf-8")
            .header(http::header::CONTENT_SECURITY_POLICY, CSP.as_str())
            .header(http::header::X_FRAME_OPTIONS, "DENY")
            .header(http::header::CONTENT_LENGTH, PAGE_HTML.len())
            .body(PAGE_HTML.as_bytes().to_vec()),
        "/admin" => builder
            .status(308)
            .header(http::header::LOCATION, PAGE_PATH)
            .header(http::header::CONTENT_LENGTH, 0)
            .body(Vec::new()),
        _ => return None,
    };
    response.ok()
}

/// The text between the page's `<script>` and `</script>` (empty if it has none).
fn inline_script(html: &str) -> &str {
    html.split_once("<script>")
        .and_then(|(_, rest)| rest.split_once("</script>"))
        .map_or("", |(script, _)| script)
}

/// Standard base64 with padding, as CSP hashes are written.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn header<'a>(r: &'a http::Response<Vec<u8>>, name: &str) -> &'a str {
        r.headers()[name].to_str().unwrap()
    }

    #[test]
    fn the_page_is_served_as_html_with_a_strict_policy() {
        let r = answer("GET", "/admin/").unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "content-type"), "text/html; charset=utf-8");
        assert_eq!(header(&r, "x-frame-options"), "DENY");
        assert_eq!(header(&r, "x-content-type-options"), "nosniff");
        let csp = header(&r, "content-security-policy");
        for part in [
            "default-src 'none'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(part), "{csp}");
        }
        assert!(!csp.contains("script-src 'unsafe-inline'"), "{csp}");
        assert_eq!(r.body(), PAGE_HTML.as_bytes());
        assert_eq!(
            header(&r, "content-length"),
            PAGE_HTML.len().to_string().as_str()
        );
    }

    #[test]
    fn the_policy_allows_exactly_the_pages_own_script() {
        let script = inline_script(PAGE_HTML);
        assert!(script.contains("/admin/v1/keys"), "the script was found");
        assert_eq!(PAGE_HTML.matches("<script").count(), 1, "one script only");
        let hash = base64(&Sha256::digest(script.as_bytes()));
        assert!(
            CSP.contains(&format!("script-src 'sha256-{hash}'")),
            "{}",
            *CSP
        );
    }

    #[test]
    fn admin_without_the_slash_is_sent_to_the_page_and_other_requests_go_to_the_api() {
        let r = answer("GET", "/admin").unwrap();
        assert_eq!(r.status(), 308);
        assert_eq!(header(&r, "location"), "/admin/");
        assert!(answer("POST", "/admin/").is_none());
        assert!(answer("GET", "/admin/v1/keys").is_none());
        assert!(answer("GET", "/admin/index.html").is_none());
        assert!(answer("GET", "/").is_none());
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere_and_never_parses_html_from_data() {
        for banned in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "localStorage",
            "http://",
            "https://",
            " onclick=",
            " onload=",
        ] {
            let allowed_svg_ns = banned == "http://";
            let hits = PAGE_HTML.matches(banned).count();
            let expected = if allowed_svg_ns {
                PAGE_HTML.matches("http://www.w3.org/2000/svg").count()
            } else {
                0
            };
            assert_eq!(hits, expected, "{banned}");
        }
        assert!(PAGE_HTML.contains("sessionStorage"));
    }

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xfb, 0xff, 0xbf]), "+/+/");
    }
}
