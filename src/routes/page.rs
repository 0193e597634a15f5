//! The status page: one HTML page, its stylesheet and its script, compiled into the binary. They
//! hold no data (the script reads the admin JSON with the admin token), so they are served
//! without a token, but only where the admin routes exist (`ADMIN_TOKEN`). Every answer forbids
//! other origins' scripts, styles and frames, and inline code (`Content-Security-Policy`).

use std::sync::LazyLock;

use sha2::{Digest, Sha256};
use warp::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH, LOCATION,
    REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use warp::http::{HeaderMap, HeaderValue, StatusCode};
use warp::{Rejection, Reply};

use super::{Request, allow};
use crate::state::AppState;

/// Only this origin's script, style and requests; no inline code, plugins, base or frames, and
/// no form may send anywhere (the token form is handled by the script, so a page without it
/// cannot put the token in a URL either).
pub const CONTENT_SECURITY_POLICY_VALUE: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The page's one placeholder: the header the admin token goes in (`DEFAULT_AUTH_HEADER`).
const AUTH_HEADER_PLACEHOLDER: &str = "{{auth_header}}";

const PAGE: &str = include_str!("page/index.html");

struct Asset {
    content_type: &'static str,
    body: &'static str,
    etag: LazyLock<HeaderValue>,
}

static STYLESHEET: Asset = Asset {
    content_type: "text/css; charset=utf-8",
    body: include_str!("page/app.css"),
    etag: LazyLock::new(|| etag(include_str!("page/app.css"))),
};

static SCRIPT: Asset = Asset {
    content_type: "text/javascript; charset=utf-8",
    body: include_str!("page/app.js"),
    etag: LazyLock::new(|| etag(include_str!("page/app.js"))),
};

/// GET /admin/, /admin (sent to /admin/ with a 308), /admin/app.css, /admin/app.js
pub fn serve<S>(
    request: &Request<S>,
    state: &AppState,
) -> Result<warp::reply::Response, Rejection> {
    // Like every admin route: without ADMIN_TOKEN it does not exist.
    if !state.auth.admin_enabled() {
        return Err(warp::reject::not_found());
    }
    allow(request)?;
    let mut reply = match request.path.as_str() {
        "/admin" => {
            let mut reply = warp::reply::Response::new(Default::default());
            *reply.status_mut() = StatusCode::PERMANENT_REDIRECT;
            reply
                .headers_mut()
                .insert(LOCATION, HeaderValue::from_static("/admin/"));
            reply
        }
        "/admin/app.css" => asset(
            &request.headers,
            STYLESHEET.content_type,
            STYLESHEET.body.to_string(),
            &STYLESHEET.etag,
        ),
        "/admin/app.js" => asset(
            &request.headers,
            SCRIPT.content_type,
            SCRIPT.body.to_string(),
            &SCRIPT.etag,
        ),
        _ => {
            // The header name is a token of the configuration, not a secret; escaped all the same.
            let page = PAGE.replace(
                AUTH_HEADER_PLACEHOLDER,
                &escape(state.config.auth_header.as_str()),
            );
            let tag = etag(&page);
            asset(&request.headers, "text/html; charset=utf-8", page, &tag)
        }
    };
    protect(reply.headers_mut());
    Ok(reply)
}

/// The asset, or 304 when the caller's `If-None-Match` names its tag. Revalidated on every use
/// (`no-cache`): a new version of the proxy serves a new page at once, and an unchanged one
/// costs a 304.
fn asset(
    headers: &HeaderMap,
    content_type: &'static str,
    body: String,
    tag: &HeaderValue,
) -> warp::reply::Response {
    let mut reply = if matches_tag(headers, tag) {
        let mut reply = warp::reply::Response::new(Default::default());
        *reply.status_mut() = StatusCode::NOT_MODIFIED;
        reply
    } else {
        let mut reply = body.into_response();
        reply
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        reply
    };
    let headers = reply.headers_mut();
    headers.insert(ETAG, tag.clone());
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    reply
}

/// The headers every answer of the page carries.
fn protect(headers: &mut HeaderMap) {
    headers.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY_VALUE),
    );
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // For browsers older than `frame-ancestors`.
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

/// A strong tag from the content: 64 bits of SHA-256, quoted.
fn etag(body: &str) -> HeaderValue {
    let digest = Sha256::digest(body.as_bytes());
    let hex: String = digest[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    HeaderValue::try_from(format!("\"{hex}\"")).unwrap_or_else(|_| HeaderValue::from_static("\"\""))
}

/// `If-None-Match` (RFC 9110 13.1.2): `*`, or a list of tags compared weakly (a `W/` prefix is
/// ignored).
fn matches_tag(headers: &HeaderMap, tag: &HeaderValue) -> bool {
    let Ok(tag) = tag.to_str() else {
        return false;
    };
    headers
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .any(|candidate| candidate == "*" || candidate.trim_start_matches("W/") == tag)
}

fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_is_compared_weakly_and_as_a_list() {
        let tag = HeaderValue::from_static("\"abc\"");
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(IF_NONE_MATCH, HeaderValue::from_static(value));
            matches_tag(&headers, &tag)
        };
        assert!(with("\"abc\""));
        assert!(with("W/\"abc\""));
        assert!(with("\"x\", \"abc\""));
        assert!(with("*"));
        assert!(!with("\"abd\""));
        assert!(!with("abc"));
        assert!(!matches_tag(&HeaderMap::new(), &tag));
    }

    #[test]
    fn the_page_has_its_placeholder_and_no_inline_code() {
        assert!(PAGE.contains(AUTH_HEADER_PLACEHOLDER));
        assert!(
            !PAGE.contains("<style"),
            "inline style is refused by the CSP"
        );
        assert!(
            !PAGE.contains(" style="),
            "inline style is refused by the CSP"
        );
        // Scripts only by `src`: an inline one would be refused.
        assert_eq!(
            PAGE.matches("<script").count(),
            PAGE.matches("<script type=\"module\" src=").count()
        );
        assert!(
            !PAGE.contains("http://") && !PAGE.contains("https://"),
            "nothing from elsewhere"
        );
        assert_eq!(escape("a&<'\">"), "a&amp;&lt;&#39;&quot;&gt;");
    }
}
