//! The upstream request: where it goes (base URL + the caller's path, traversal refused, the
//! configured query added) and the caller's body: kept for a retry when small, else streamed on
//! under the size cap.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt, TryStreamExt};
use reqwest::Url;
use warp::Buf;
use warp::http::HeaderMap;

use super::body::LimitedBody;
use super::headers::declared_length;
use crate::auth::redact::Redactor;
use crate::config::UpstreamQuery;
use crate::error::ProxyError;
use crate::vocab::endpoint::has_body;
use crate::vocab::endpoint::{Endpoint, FIXED_POSITIONS, fixed_paths};

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

/// The upstream URLs of the endpoints with a fixed path ([`fixed_paths`]), made once: setting a
/// path re-reads it character by character, about 4% of a plain request's instructions.
pub struct KnownPaths(Vec<Option<Url>>);

impl KnownPaths {
    pub fn new(base: &Url) -> KnownPaths {
        let mut urls = vec![None; FIXED_POSITIONS];
        for (position, path) in fixed_paths() {
            urls[position] = upstream_url(base, path, None, None).ok();
        }
        KnownPaths(urls)
    }

    /// [`upstream_url`] for a request classified as `endpoint` and forwarded under `path` (the
    /// path `endpoint` gives), from the URL made once when it is a fixed one.
    pub fn upstream_url(
        &self,
        base: &Url,
        endpoint: &Endpoint,
        path: &str,
        query: Option<&str>,
        added: Option<&UpstreamQuery>,
    ) -> Result<Url, ProxyError> {
        let known = endpoint
            .fixed()
            .and_then(|position| self.0.get(position)?.as_ref());
        match known {
            Some(url) => Ok(with_query(url.clone(), query, added)),
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

/// The caller's body as warp hands it over, its chunks made `Bytes`.
pub(crate) type CallerStream =
    Pin<Box<dyn Stream<Item = Result<Bytes, warp::Error>> + Send + Sync>>;

/// The caller's body, read at most once: whole for the policy (its model and token estimate),
/// up to [`REPLAYABLE_BODY`] for a key pool's retries, or not at all and streamed on as it
/// arrives. The policy and the upstream call share this one value; every read goes through
/// [`CallerBody::read`], under one size cap (`MAX_BODY_BYTES`) and one deadline.
pub struct CallerBody {
    held: Held,
    /// The declared `Content-Length`, checked against the cap before anything is read or sent.
    declared: Option<u64>,
}

enum Held {
    None,
    Unread(CallerStream),
    /// Read whole.
    Read(Bytes),
    /// Read up to a bound that it went past: what was read, and the rest still to come.
    Started(Bytes, CallerStream),
}

/// The cap and the deadline a caller's body is read under, and the debug log of bodies.
pub(crate) struct BodyRules {
    pub max_bytes: u64,
    pub deadline: Duration,
    pub log: Option<Arc<Redactor>>,
}

impl CallerBody {
    /// The body of a request with `headers`, nothing of it read yet; `None` when the headers say
    /// there is none.
    pub fn new<S, B>(headers: &HeaderMap, body: S) -> CallerBody
    where
        S: Stream<Item = Result<B, warp::Error>> + Send + Sync + 'static,
        B: Buf + Send,
    {
        let held = if has_body(headers) {
            Held::Unread(Box::pin(
                body.map_ok(|mut chunk| chunk.copy_to_bytes(chunk.remaining())),
            ))
        } else {
            Held::None
        };
        CallerBody {
            held,
            declared: declared_length(headers),
        }
    }

    /// The whole body, read now if it has not been; refused past the cap, or when it does not
    /// arrive within the deadline.
    pub(crate) async fn whole(&mut self, rules: &BodyRules) -> Result<Bytes, ProxyError> {
        self.read(rules, rules.max_bytes).await?;
        match &self.held {
            Held::None => Ok(Bytes::new()),
            Held::Read(bytes) => Ok(bytes.clone()),
            // `read` up to the cap either reads the whole body or refuses it.
            Held::Unread(_) | Held::Started(..) => Err(ProxyError::PayloadTooLarge),
        }
    }

    /// Reads the body, unless it was read already, keeping up to `keep` bytes: past that, what
    /// was read is held with the rest still to come; a body declared longer is not read at all.
    async fn read(&mut self, rules: &BodyRules, keep: u64) -> Result<(), ProxyError> {
        if self.declared.is_some_and(|length| length > rules.max_bytes) {
            log::info!("request body declared over MAX_BODY_BYTES: not sent upstream");
            return Err(ProxyError::PayloadTooLarge);
        }
        if self.declared.is_some_and(|length| length > keep) {
            return Ok(());
        }
        // Read already (whole, or as far as it was kept): nothing more to do, and what was read
        // stays where it is.
        if !matches!(self.held, Held::Unread(_)) {
            return Ok(());
        }
        let Held::Unread(mut body) = std::mem::replace(&mut self.held, Held::None) else {
            return Ok(());
        };
        let max = rules.max_bytes;
        let reading = async move {
            let mut kept = Gathered::Nothing;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|err| {
                    log::info!("the caller's request body broke off: {err}");
                    ProxyError::IncompleteBody
                })?;
                if (kept.len() + chunk.len()) as u64 > max {
                    log::info!("request body over MAX_BODY_BYTES: not sent upstream");
                    return Err(ProxyError::PayloadTooLarge);
                }
                kept.push(chunk);
                if kept.len() as u64 > keep {
                    return Ok(Held::Started(kept.freeze(), body));
                }
            }
            Ok(Held::Read(kept.freeze()))
        };
        // Bounded like an upload streaming inside the upstream request: a caller that stops
        // sending does not hold its place. The deadline counts from here; its timer is only
        // set up when the body is not all there already (a small one usually is).
        let deadline = tokio::time::Instant::now() + rules.deadline;
        let mut reading = std::pin::pin!(reading);
        self.held =
            match futures::poll!(reading.as_mut()) {
                std::task::Poll::Ready(read) => read,
                std::task::Poll::Pending => tokio::time::timeout_at(deadline, reading)
                    .await
                    .map_err(|_| {
                        log::info!(
                            "the request body did not arrive within {}s (UPSTREAM_TIMEOUT_SECS)",
                            rules.deadline.as_secs()
                        );
                        ProxyError::RequestTimeout
                    })?,
            }?;
        if let (Held::Read(bytes), Some(redactor)) = (&self.held, &rules.log) {
            log::debug!("request body: {}", redactor.mask_bytes(bytes));
        }
        Ok(())
    }

    /// The body as the upstream attempts send it. With `retries`, a body not read yet is read
    /// now up to [`REPLAYABLE_BODY`], so that every attempt can send it; a larger one, and any
    /// body without `retries`, streams on as it arrives, cut off past the cap.
    pub(crate) async fn for_attempts(
        mut self,
        rules: &BodyRules,
        retries: bool,
    ) -> Result<RequestBody, ProxyError> {
        if retries {
            self.read(rules, REPLAYABLE_BODY).await?;
        } else if self.declared.is_some_and(|length| length > rules.max_bytes) {
            return Err(ProxyError::PayloadTooLarge);
        }
        let stream = |body| RequestBody::Once(Some(request_body(body, rules)));
        Ok(match self.held {
            Held::None => RequestBody::None,
            Held::Read(bytes) => RequestBody::Kept(bytes),
            Held::Unread(body) => stream(body),
            Held::Started(read, rest) => {
                let read = futures::stream::iter([Ok(read)]);
                stream(Box::pin(read.chain(rest)))
            }
        })
    }
}

/// The chunks of a body read so far. A body that came in one chunk (a small request usually
/// does) is copied once, into an allocation of its exact size. The chunk itself is not kept:
/// it shares the connection's read buffer, and hyper, which may read ahead on the connection
/// while the request waits for its upstream, would then have to allocate another.
enum Gathered {
    Nothing,
    One(Bytes),
    Several(BytesMut),
}

impl Gathered {
    fn len(&self) -> usize {
        match self {
            Gathered::Nothing => 0,
            Gathered::One(bytes) => bytes.len(),
            Gathered::Several(bytes) => bytes.len(),
        }
    }

    fn push(&mut self, chunk: Bytes) {
        *self = match std::mem::replace(self, Gathered::Nothing) {
            Gathered::Nothing => Gathered::One(chunk),
            Gathered::One(first) => {
                let mut several = BytesMut::with_capacity(first.len() + chunk.len());
                several.extend_from_slice(&first);
                several.extend_from_slice(&chunk);
                Gathered::Several(several)
            }
            Gathered::Several(mut several) => {
                several.extend_from_slice(&chunk);
                Gathered::Several(several)
            }
        };
    }

    fn freeze(self) -> Bytes {
        match self {
            Gathered::Nothing => Bytes::new(),
            Gathered::One(bytes) => Bytes::copy_from_slice(&bytes),
            Gathered::Several(bytes) => bytes.freeze(),
        }
    }
}

/// The caller's body as the upstream requests get it.
pub(crate) enum RequestBody {
    None,
    /// Read whole: every attempt sends the same bytes.
    Kept(Bytes),
    /// Streamed on once, never retried.
    Once(Option<reqwest::Body>),
}

impl RequestBody {
    /// Whether a refused attempt may be followed by another.
    pub(crate) fn replayable(&self) -> bool {
        match self {
            RequestBody::None => true,
            // A body read whole for its model may be larger than is kept for retries.
            RequestBody::Kept(bytes) => bytes.len() as u64 <= REPLAYABLE_BODY,
            RequestBody::Once(_) => false,
        }
    }

    /// The bytes every attempt sends, when the body was read.
    pub(crate) fn kept(&self) -> Option<&Bytes> {
        match self {
            RequestBody::Kept(bytes) => Some(bytes),
            _ => None,
        }
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

/// Streams the caller's body upstream as it arrives, cut off past the cap; with the body log,
/// each chunk is logged with every secret masked.
fn request_body(body: CallerStream, rules: &BodyRules) -> reqwest::Body {
    let body = LimitedBody::new(body, rules.max_bytes);
    match rules.log.clone() {
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
        let fixed: Vec<&str> = fixed_paths().map(|(_, path)| path).collect();
        assert!(fixed.contains(&"/v1/chat/completions") && fixed.contains(&"/v1/models"));
        for base in bases {
            let base = Url::parse(base).unwrap();
            let known = KnownPaths::new(&base);
            for path in fixed.iter().copied().chain(["/v1/files", "/v1"]) {
                let endpoint = crate::vocab::classify(
                    &warp::http::Method::POST,
                    path,
                    crate::vocab::Shape {
                        has_body: true,
                        upgrade: false,
                    },
                );
                for query in [None, Some("a=1&b=%20"), Some("")] {
                    for added in [None, added.as_ref()] {
                        assert_eq!(
                            known
                                .upstream_url(&base, &endpoint, path, query, added)
                                .ok(),
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
