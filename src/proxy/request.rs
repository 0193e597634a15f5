//! The upstream request: where it goes (base URL + the caller's path, traversal refused, the
//! configured query added) and the caller's body: kept for a retry when small, else streamed on
//! under the size cap.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt, TryStreamExt};
use reqwest::Url;
use warp::Buf;

use super::body::LimitedBody;
use crate::auth::redact::Redactor;
use crate::config::UpstreamQuery;
use crate::error::ProxyError;

/// The upstream URL for a caller's `/v1/<rest>`: the configured base (which stands for `/v1`) +
/// `/<rest>`, and the caller's query string exactly as received, with `UPSTREAM_QUERY` added (the
/// URL parser percent-encodes what the wire form cannot carry).
///
/// Paths with `.`/`..` segments (plain or percent-encoded) or backslashes are refused: URL
/// normalisation here or upstream would resolve them, and `/v1/../x` must not reach anything
/// outside the prefix with our key attached.
pub fn upstream_url(
    base: &Url,
    path: &str,
    query: Option<&str>,
    added: Option<&UpstreamQuery>,
) -> Result<Url, ProxyError> {
    if !path.starts_with('/') || path.split('/').any(is_dot_segment) || has_backslash(path) {
        return Err(ProxyError::InvalidPath);
    }
    // Only `/v1/...` is ever forwarded; the base URL stands for that `/v1`.
    let rest = match path.strip_prefix("/v1") {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
        _ => return Err(ProxyError::InvalidPath),
    };
    // Only the path and query are set on a copy of the parsed base: parsing the whole URL per
    // request (host normalisation included) was a sixth of the proxy's CPU per request.
    let mut url = base.clone();
    let prefix = base.path().trim_end_matches('/');
    let mut full = String::with_capacity(prefix.len() + rest.len() + 1);
    full.push_str(prefix);
    full.push_str(rest);
    if full.is_empty() {
        full.push('/');
    }
    url.set_path(&full);
    Ok(with_query(url, query, added))
}

fn with_query(mut url: Url, query: Option<&str>, added: Option<&UpstreamQuery>) -> Url {
    match added {
        None if query.is_none() && url.query().is_none() => {}
        None => url.set_query(query),
        Some(added) => url.set_query(Some(&merged_query(query, added))),
    }
    url
}

/// The paths nearly every request takes, with their upstream URLs made once: setting a path
/// re-reads it character by character, about 4% of a plain request's instructions.
pub struct KnownPaths(Vec<(&'static str, Url)>);

impl KnownPaths {
    const PATHS: [&'static str; 8] = [
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/embeddings",
        "/v1/completions",
        "/v1/models",
        "/v1/moderations",
        "/v1/audio/transcriptions",
        "/v1/audio/speech",
    ];

    pub fn new(base: &Url) -> KnownPaths {
        let urls = Self::PATHS.iter().filter_map(|&path| {
            let url = upstream_url(base, path, None, None).ok()?;
            Some((path, url))
        });
        KnownPaths(urls.collect())
    }

    /// [`upstream_url`], from the URL made once when `path` is one of the known ones.
    pub fn upstream_url(
        &self,
        base: &Url,
        path: &str,
        query: Option<&str>,
        added: Option<&UpstreamQuery>,
    ) -> Result<Url, ProxyError> {
        match self.0.iter().find(|(known, _)| *known == path) {
            Some((_, url)) => Ok(with_query(url.clone(), query, added)),
            None => upstream_url(base, path, query, added),
        }
    }
}

/// The caller's parameters, raw and in order, without those `added` names (the configured value
/// wins a clash), then `added`.
fn merged_query(query: Option<&str>, added: &UpstreamQuery) -> String {
    let mut merged = String::new();
    for pair in query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
    {
        let name = pair.split('=').next().unwrap_or("");
        let clashes = url::form_urlencoded::parse(name.as_bytes())
            .next()
            .is_some_and(|(decoded, _)| added.names.iter().any(|added| *added == decoded));
        if !clashes {
            merged.push_str(pair);
            merged.push('&');
        }
    }
    merged.push_str(&added.encoded);
    merged
}

fn is_dot_segment(segment: &str) -> bool {
    // "." or ".." with any dot optionally written as %2e / %2E; at most 6 bytes.
    let mut rest = segment.as_bytes();
    if rest.is_empty() || rest.len() > 6 {
        return false;
    }
    let mut dots = 0;
    while !rest.is_empty() {
        if rest[0] == b'.' {
            rest = &rest[1..];
        } else if rest.len() >= 3 && rest[0] == b'%' && rest[1] == b'2' && (rest[2] | 0x20) == b'e'
        {
            rest = &rest[3..];
        } else {
            return false;
        }
        dots += 1;
    }
    dots <= 2
}

fn has_backslash(path: &str) -> bool {
    let bytes = path.as_bytes();
    memchr::memchr2(b'\\', b'%', bytes).is_some()
        && (bytes.contains(&b'\\')
            || bytes
                .windows(3)
                .any(|w| w[0] == b'%' && w[1] == b'5' && (w[2] | 0x20) == b'c'))
}

/// Bodies up to this size are kept, so that a request refused on one key (429, 401, 403, a
/// failed connection) can be sent again on the next.
pub const REPLAYABLE_BODY: u64 = 1024 * 1024;

/// The caller's body as the upstream requests get it.
pub(crate) enum RequestBody {
    None,
    /// Read whole (up to `REPLAYABLE_BODY`): every attempt sends the same bytes.
    Kept(Bytes),
    /// Larger, declared or found so while reading: streamed on once, never retried.
    Once(Option<reqwest::Body>),
}

impl RequestBody {
    /// Reads up to `REPLAYABLE_BODY` of the caller's body; a body declared larger is not read
    /// here at all, and one found larger is streamed on after what was read.
    pub(crate) async fn prepare<S, B>(
        body: S,
        declared: Option<u64>,
        max_body_bytes: u64,
        body_log: Option<Arc<Redactor>>,
    ) -> Result<RequestBody, ProxyError>
    where
        S: Stream<Item = Result<B, warp::Error>> + Send + Sync + 'static,
        B: Buf + Send,
    {
        let mut body = Box::pin(body.map_ok(|mut chunk| chunk.copy_to_bytes(chunk.remaining())));
        if declared.is_some_and(|length| length > REPLAYABLE_BODY) {
            return Ok(RequestBody::once(body, max_body_bytes, body_log));
        }
        let mut kept = BytesMut::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|err| {
                log::info!("the caller's request body broke off: {err}");
                ProxyError::IncompleteBody
            })?;
            kept.extend_from_slice(&chunk);
            if kept.len() as u64 > max_body_bytes {
                log::info!("request body over MAX_BODY_BYTES: not sent upstream");
                return Err(ProxyError::PayloadTooLarge);
            }
            if kept.len() as u64 > REPLAYABLE_BODY {
                let read = futures::stream::iter([Ok(kept.freeze())]);
                return Ok(RequestBody::once(
                    read.chain(body),
                    max_body_bytes,
                    body_log,
                ));
            }
        }
        let kept = kept.freeze();
        if let Some(redactor) = body_log {
            log::debug!("request body: {}", redactor.mask_bytes(&kept));
        }
        Ok(RequestBody::Kept(kept))
    }

    /// The caller's body streamed on as it arrives, never kept.
    pub(crate) fn streamed<S, B>(
        body: S,
        max_body_bytes: u64,
        body_log: Option<Arc<Redactor>>,
    ) -> RequestBody
    where
        S: Stream<Item = Result<B, warp::Error>> + Send + Sync + 'static,
        B: Buf + Send,
    {
        let body = Box::pin(body.map_ok(|mut chunk| chunk.copy_to_bytes(chunk.remaining())));
        RequestBody::once(body, max_body_bytes, body_log)
    }

    fn once<S>(body: S, max_body_bytes: u64, body_log: Option<Arc<Redactor>>) -> RequestBody
    where
        S: Stream<Item = Result<Bytes, warp::Error>> + Send + Sync + Unpin + 'static,
    {
        RequestBody::Once(Some(request_body(body, max_body_bytes, body_log)))
    }

    /// Whether a refused attempt may be followed by another.
    pub(crate) fn replayable(&self) -> bool {
        !matches!(self, RequestBody::Once(_))
    }

    /// The body for the next attempt: `Err` once a streamed body has been used.
    pub(crate) fn attempt(&mut self) -> Result<Option<reqwest::Body>, ()> {
        match self {
            RequestBody::None => Ok(None),
            RequestBody::Kept(bytes) => Ok(Some(reqwest::Body::from(bytes.clone()))),
            RequestBody::Once(body) => body.take().map(Some).ok_or(()),
        }
    }
}

/// Streams the caller's body upstream as it arrives, cut off past `max_body_bytes`; with
/// `body_log`, each chunk is logged with every secret masked.
fn request_body<S>(body: S, max_body_bytes: u64, body_log: Option<Arc<Redactor>>) -> reqwest::Body
where
    S: Stream<Item = Result<Bytes, warp::Error>> + Send + Sync + Unpin + 'static,
{
    let body = LimitedBody::new(body, max_body_bytes);
    match body_log {
        Some(redactor) => reqwest::Body::wrap_stream(body.inspect_ok(move |chunk| {
            log::debug!("request body chunk: {}", redactor.mask_bytes(chunk));
        })),
        None => reqwest::Body::wrap_stream(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_recognised_in_every_spelling() {
        for dots in [".", "..", "%2e", "%2E", "%2e%2E", ".%2e", "%2e."] {
            assert!(is_dot_segment(dots), "{dots}");
        }
        for name in ["", "...", "a.", ".a", "%2e%2e%2e", "%2f", "%2", "v1"] {
            assert!(!is_dot_segment(name), "{name}");
        }
        assert!(has_backslash("/v1/a\\b") && has_backslash("/v1/%5Cb") && has_backslash("/%5c"));
        assert!(!has_backslash("/v1/%5b/%25c") && !has_backslash("/v1/models"));
    }

    #[test]
    fn a_known_path_gives_the_url_it_would_be_given_anyway() {
        let bases = [
            "https://api.example.com/v1",
            "https://h/api/paas/v4/",
            "http://127.0.0.1:9/",
        ];
        let added = Some(UpstreamQuery {
            encoded: "api-version=2024-06-01".into(),
            names: vec!["api-version".into()],
        });
        for base in bases {
            let base = Url::parse(base).unwrap();
            let known = KnownPaths::new(&base);
            for path in KnownPaths::PATHS
                .iter()
                .copied()
                .chain(["/v1/files", "/v1"])
            {
                for query in [None, Some("a=1&b=%20"), Some("")] {
                    for added in [None, added.as_ref()] {
                        assert_eq!(
                            known.upstream_url(&base, path, query, added).ok(),
                            upstream_url(&base, path, query, added).ok(),
                            "{base} {path} {query:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_base_url_stands_for_v1() {
        let base = Url::parse("https://open.bigmodel.cn/api/paas/v4").unwrap();
        let url = |path, query| upstream_url(&base, path, query, None).unwrap().to_string();
        assert_eq!(
            url("/v1/chat/completions", None),
            "https://open.bigmodel.cn/api/paas/v4/chat/completions"
        );
        assert_eq!(
            url("/v1", Some("a=1")),
            "https://open.bigmodel.cn/api/paas/v4?a=1"
        );
        let root = Url::parse("http://127.0.0.1:9").unwrap();
        assert_eq!(
            upstream_url(&root, "/v1/models", None, None)
                .unwrap()
                .as_str(),
            "http://127.0.0.1:9/models"
        );
        assert!(upstream_url(&base, "/v1x/models", None, None).is_err());
        assert!(upstream_url(&base, "/v2/models", None, None).is_err());
    }

    #[test]
    fn the_configured_query_is_added_and_wins_a_clash() {
        let base = Url::parse("https://x.openai.azure.com/openai/deployments/D").unwrap();
        let added = UpstreamQuery {
            encoded: "api-version=2024-10-21".to_string(),
            names: vec!["api-version".to_string()],
        };
        let url = |query| {
            upstream_url(&base, "/v1/chat/completions", query, Some(&added))
                .unwrap()
                .query()
                .map(str::to_string)
        };
        assert_eq!(url(None).as_deref(), Some("api-version=2024-10-21"));
        assert_eq!(
            url(Some("a=%20b&api-version=old&api%2Dversion=x&c")).as_deref(),
            Some("a=%20b&c&api-version=2024-10-21")
        );
    }
}
