//! Every kind of redaction in one place: the upstream key masked in what the upstream sends
//! back (headers and error bodies, split across chunks or not), every configured secret masked
//! in debug logs, credential headers hidden, and upstream URLs kept out of error lines.

use std::error::Error as _;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use futures::Stream;
use warp::http::{HeaderMap, HeaderName, HeaderValue, header};

use crate::config::{Config, Secret};

/// The upstream key as it is searched for in upstream answers. A key under 8 bytes (only ever a
/// test value) is not searched for: it would match ordinary text such as request ids.
pub fn searchable(key: &Secret) -> Bytes {
    let key = key.expose().as_bytes();
    if key.len() >= 8 {
        Bytes::copy_from_slice(key)
    } else {
        Bytes::new()
    }
}

/// Masks `secret` in every header value in place; a value that masking leaves unsendable
/// becomes `***` entirely.
pub fn mask_header_values(headers: &mut HeaderMap, secret: &[u8]) {
    for value in headers.values_mut() {
        if let Some(masked) = mask_secret(value.as_bytes(), secret) {
            *value = HeaderValue::from_maybe_shared(masked.freeze())
                .unwrap_or_else(|_| HeaderValue::from_static("***"));
        }
    }
}

/// Masks what debug logs show: every configured secret in text, and credential headers whole.
pub struct Redactor {
    /// Replaced on reload, so a client token added at run time is masked too.
    secrets: arc_swap::ArcSwap<Vec<Secret>>,
    credential_headers: Vec<HeaderName>,
}

impl Redactor {
    pub fn new(config: &Config) -> Redactor {
        let mut credential_headers = vec![
            header::AUTHORIZATION,
            header::PROXY_AUTHORIZATION,
            header::COOKIE,
            header::SET_COOKIE,
            HeaderName::from_static("x-api-key"),
            HeaderName::from_static("api-key"),
        ];
        let upstream_headers = config
            .upstreams
            .list
            .iter()
            .map(|upstream| &upstream.settings.auth_header);
        for name in std::iter::once(&config.auth_header).chain(upstream_headers) {
            if !credential_headers.contains(name) {
                credential_headers.push(name.clone());
            }
        }
        Redactor {
            secrets: arc_swap::ArcSwap::from_pointee(config.secrets().cloned().collect()),
            credential_headers,
        }
    }

    /// The secrets of a newly loaded configuration, with the old ones kept: a request that
    /// started before the reload may still log them.
    pub fn add_secrets(&self, config: &Config) {
        let mut secrets: Vec<Secret> = self.secrets.load().iter().cloned().collect();
        for secret in config.secrets() {
            if !secrets.contains(secret) {
                secrets.push(secret.clone());
            }
        }
        self.secrets.store(std::sync::Arc::new(secrets));
    }

    /// `text` with every configured secret replaced by `***`.
    pub fn mask(&self, text: &str) -> String {
        let mut masked = text.to_string();
        for secret in self.secrets.load().iter() {
            if masked.contains(secret.expose()) {
                masked = masked.replace(secret.expose(), "***");
            }
        }
        masked
    }

    /// Bytes of a body for a debug line, secrets masked.
    pub fn mask_bytes(&self, bytes: &[u8]) -> String {
        self.mask(&String::from_utf8_lossy(bytes))
    }

    /// Headers as `name: value` pairs for debug logs, credentials shown as `***`.
    pub fn describe_headers(&self, headers: &HeaderMap) -> String {
        headers
            .iter()
            .map(|(name, value)| {
                if self.credential_headers.contains(name) {
                    format!("{name}: ***")
                } else {
                    format!("{name}: {}", self.mask_bytes(value.as_bytes()))
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// An error and its causes on one line, without the request URL (which could carry credentials).
pub fn error_chain(err: &reqwest::Error) -> String {
    let mut line = err.to_string();
    if let Some(url) = err.url() {
        line = line.replace(url.as_str(), "<upstream>");
    }
    let mut source = err.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

/// Replaces every occurrence of `secret` in a byte stream by `***`, including occurrences split
/// across chunks: the last `secret.len() - 1` bytes are held back until the next chunk shows
/// whether they start a match.
pub struct SecretMask<S> {
    inner: S,
    secret: Bytes,
    held: BytesMut,
    finished: bool,
}

impl<S> SecretMask<S> {
    pub fn new(inner: S, secret: Bytes) -> Self {
        SecretMask {
            inner,
            secret,
            held: BytesMut::new(),
            finished: false,
        }
    }

    /// Masks what is held; keeps back a possible partial match unless the stream has ended.
    fn release(&mut self, at_end: bool) -> Bytes {
        let masked = mask_all(&self.held, &self.secret);
        let keep = if at_end {
            0
        } else {
            self.secret
                .len()
                .saturating_sub(1)
                .min(masked.unmatched_tail)
        };
        let mut output = masked.bytes;
        let tail = output.split_off(output.len() - keep);
        self.held = tail;
        output.freeze()
    }
}

struct Masked {
    bytes: BytesMut,
    /// Bytes at the end that come from input after the last replacement.
    unmatched_tail: usize,
}

fn mask_all(input: &[u8], secret: &[u8]) -> Masked {
    let mut bytes = BytesMut::with_capacity(input.len());
    let mut rest = input;
    if !secret.is_empty() {
        while let Some(at) = memchr::memmem::find(rest, secret) {
            bytes.extend_from_slice(&rest[..at]);
            bytes.extend_from_slice(b"***");
            rest = &rest[at + secret.len()..];
        }
    }
    bytes.extend_from_slice(rest);
    Masked {
        bytes,
        unmatched_tail: rest.len(),
    }
}

/// `value` with every occurrence of `secret` replaced by `***`, or `None` if it has none.
pub fn mask_secret(value: &[u8], secret: &[u8]) -> Option<BytesMut> {
    if secret.is_empty() || memchr::memmem::find(value, secret).is_none() {
        return None;
    }
    Some(mask_all(value, secret).bytes)
}

impl<S, E> Stream for SecretMask<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    type Item = Result<Bytes, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.finished {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
                Some(Ok(chunk)) => {
                    self.held.extend_from_slice(&chunk);
                    let output = self.release(false);
                    if !output.is_empty() {
                        return Poll::Ready(Some(Ok(output)));
                    }
                }
                Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                None => {
                    self.finished = true;
                    let output = self.release(true);
                    if !output.is_empty() {
                        return Poll::Ready(Some(Ok(output)));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::convert::Infallible;

    async fn masked(chunks: &[&'static str], secret: &'static str) -> String {
        let stream = futures::stream::iter(
            chunks
                .iter()
                .map(|chunk| Ok::<_, Infallible>(Bytes::from_static(chunk.as_bytes()))),
        );
        let out: Vec<Bytes> = SecretMask::new(stream, Bytes::from_static(secret.as_bytes()))
            .map(|chunk| chunk.unwrap())
            .collect()
            .await;
        String::from_utf8(out.concat()).unwrap()
    }

    #[tokio::test]
    async fn secret_is_masked_even_across_chunk_boundaries() {
        assert_eq!(masked(&["key sk-abc here"], "sk-abc").await, "key *** here");
        assert_eq!(
            masked(&["key sk-", "abc here"], "sk-abc").await,
            "key *** here"
        );
        assert_eq!(
            masked(&["s", "k", "-", "a", "b", "c"], "sk-abc").await,
            "***"
        );
        assert_eq!(
            masked(&["sk-absk-abc", "sk-ab"], "sk-abc").await,
            "sk-ab***sk-ab"
        );
        assert_eq!(
            masked(&["nothing", " secret"], "sk-abc").await,
            "nothing secret"
        );
        assert_eq!(masked(&[], "sk-abc").await, "");
    }

    #[test]
    fn header_values_are_masked_only_when_needed() {
        assert!(mask_secret(b"plain", b"sk").is_none());
        assert_eq!(
            &mask_secret(b"Bearer sk-1", b"sk-1").unwrap()[..],
            b"Bearer ***"
        );
    }

    #[test]
    fn redactor_masks_every_configured_secret_and_credential_headers() {
        let config = Config::from_lookup(|name| {
            match name {
                "AUTH_BEARER" => Some("sk-upstream-1234"),
                "ALLOWED_TOKENS" => Some("alice:tok-alice"),
                "ADMIN_TOKEN" => Some("adm-token"),
                "DEFAULT_AUTH_HEADER" => Some("X-Caller-Key"),
                _ => None,
            }
            .map(str::to_string)
        })
        .unwrap();
        let redactor = Redactor::new(&config);
        assert_eq!(
            redactor.mask("a sk-upstream-1234 b tok-alice c adm-token"),
            "a *** b *** c ***"
        );
        let mut headers = HeaderMap::new();
        headers.insert("x-caller-key", HeaderValue::from_static("anything"));
        headers.insert("x-note", HeaderValue::from_static("tok-alice"));
        assert_eq!(
            redactor.describe_headers(&headers),
            "x-caller-key: ***, x-note: ***"
        );
    }

    #[test]
    fn every_upstreams_keys_and_key_header_are_masked() {
        let dir = std::env::temp_dir().join(format!("llm-proxy-redact-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("upstreams.toml");
        std::fs::write(
            &file,
            "default = \"a\"\n\
             [upstreams.a]\nbase_url = \"https://a/v1\"\nkeys_env = \"A\"\nmodels = [\"x\"]\n\
             [upstreams.b]\nbase_url = \"https://b/v1\"\nkeys_env = \"B\"\nmodels = [\"y\"]\n\
             auth_header = \"x-goog-api-key\"\n",
        )
        .unwrap();
        let path = file.to_str().unwrap().to_string();
        let config = Config::from_lookup(|name| {
            match name {
                "UPSTREAMS_FILE" => Some(path.as_str()),
                "A" => Some("sk-first-upstream"),
                "B" => Some("sk-second-upstream"),
                _ => None,
            }
            .map(str::to_string)
        })
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let redactor = Redactor::new(&config);
        assert_eq!(
            redactor.mask("sk-first-upstream sk-second-upstream"),
            "*** ***"
        );
        let mut headers = HeaderMap::new();
        headers.insert("x-goog-api-key", HeaderValue::from_static("anything"));
        assert_eq!(redactor.describe_headers(&headers), "x-goog-api-key: ***");
    }

    #[test]
    fn short_keys_are_not_searched_for() {
        assert!(searchable(&Secret::new("k")).is_empty());
        assert_eq!(searchable(&Secret::new("sk-12345")), "sk-12345");
    }
}
