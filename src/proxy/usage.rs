//! Token usage read from upstream bodies as they stream past, without buffering them: a scanner
//! looks for `"usage":{` and captures only that object, in plain JSON answers and in the final
//! usage event of a stream (`stream_options.include_usage`) alike.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use serde::Deserialize;

use crate::ops::metrics::{Metrics, TokenKind};

const KEY: &[u8] = b"\"usage\"";
/// Built once: constructing a searcher per chunk cost more than the search itself.
static KEY_FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(KEY));
/// A usage object is a handful of numbers; anything longer is not one.
const MAX_OBJECT: usize = 4096;

/// Token counts as the OpenAI APIs report them; the Responses API says input/output where chat
/// completions say prompt/completion.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    pub total: u64,
}

#[derive(Deserialize)]
struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
}

impl RawUsage {
    fn into_usage(self) -> Option<Usage> {
        let prompt = self.prompt_tokens.or(self.input_tokens);
        let completion = self.completion_tokens.or(self.output_tokens);
        if prompt.is_none() && completion.is_none() && self.total_tokens.is_none() {
            return None;
        }
        let (prompt, completion) = (prompt.unwrap_or(0), completion.unwrap_or(0));
        Some(Usage {
            prompt,
            completion,
            // Saturating: the numbers are the upstream's to choose, and an overflow must neither
            // panic nor wrap to a small total.
            total: self
                .total_tokens
                .unwrap_or(prompt.saturating_add(completion)),
        })
    }
}

enum State {
    Searching,
    /// After the key: waiting for `:` and then `{` (anything else, such as `null`, is not usage).
    AfterKey {
        colon: bool,
    },
    Capturing(Capture),
}

#[derive(Default)]
struct Capture {
    object: Vec<u8>,
    depth: u32,
    in_string: bool,
    escaped: bool,
}

/// What [`Capture::take`] made of a chunk.
enum Taken {
    /// The object closed after this many bytes of the chunk.
    Closed(usize),
    /// The whole chunk belongs to the object, which goes on.
    Open,
    /// The object reached `MAX_OBJECT` bytes, the last of them this many into the chunk, without
    /// closing: it is not usage, and the search resumes after those bytes.
    TooLong(usize),
}

impl Capture {
    /// Takes bytes of the object, at most up to `MAX_OBJECT` in all. The cut-off is counted in
    /// object bytes, not checked per chunk, so that where the chunks happen to split the body
    /// cannot decide whether a long object counts or where the search resumes.
    fn take(&mut self, bytes: &[u8]) -> Taken {
        let room = MAX_OBJECT - self.object.len();
        let window = &bytes[..bytes.len().min(room)];
        match self.find_end(window) {
            Some(end) => {
                // One copy of the object's bytes, not a push per byte.
                self.object.extend_from_slice(&window[..end]);
                Taken::Closed(end)
            }
            None if window.len() == room => Taken::TooLong(room),
            None => {
                self.object.extend_from_slice(window);
                Taken::Open
            }
        }
    }

    /// Where the object closes in `bytes` (one past its final brace), tracking strings so that
    /// braces inside them do not count.
    fn find_end(&mut self, bytes: &[u8]) -> Option<usize> {
        for (index, &byte) in bytes.iter().enumerate() {
            if self.in_string {
                match byte {
                    _ if self.escaped => self.escaped = false,
                    b'\\' => self.escaped = true,
                    b'"' => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match byte {
                b'"' => self.in_string = true,
                b'{' => self.depth += 1,
                b'}' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        return Some(index + 1);
                    }
                }
                _ => {}
            }
        }
        None
    }
}

/// Feed it every body chunk in order; `usage()` is the last usage object seen.
pub struct UsageScanner {
    state: State,
    /// The end of the previous chunk, in case the key is split across two chunks.
    carry: Vec<u8>,
    last: Option<Usage>,
}

impl Default for UsageScanner {
    fn default() -> Self {
        UsageScanner {
            state: State::Searching,
            // Allocated only if a chunk ends without the key, which most plain answers never do.
            carry: Vec::new(),
            last: None,
        }
    }
}

impl UsageScanner {
    pub fn usage(&self) -> Option<Usage> {
        self.last
    }

    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            match &mut self.state {
                State::Searching => match self.find_key(chunk) {
                    Some(after_key) => {
                        self.state = State::AfterKey { colon: false };
                        chunk = &chunk[after_key..];
                    }
                    None => return,
                },
                State::AfterKey { colon } => {
                    let byte = chunk[0];
                    match byte {
                        b' ' | b'\t' | b'\r' | b'\n' => chunk = &chunk[1..],
                        b':' if !*colon => {
                            *colon = true;
                            chunk = &chunk[1..];
                        }
                        b'{' if *colon => {
                            self.state = State::Capturing(Capture {
                                object: Vec::with_capacity(256),
                                ..Capture::default()
                            });
                        }
                        _ => self.state = State::Searching,
                    }
                }
                State::Capturing(capture) => match capture.take(chunk) {
                    Taken::Closed(consumed) => {
                        let object = std::mem::take(&mut capture.object);
                        if let Some(usage) = serde_json::from_slice::<RawUsage>(&object)
                            .ok()
                            .and_then(RawUsage::into_usage)
                        {
                            self.last = Some(usage);
                        }
                        self.state = State::Searching;
                        chunk = &chunk[consumed..];
                    }
                    Taken::Open => return,
                    Taken::TooLong(consumed) => {
                        self.state = State::Searching;
                        chunk = &chunk[consumed..];
                    }
                },
            }
        }
    }

    /// Where the key ends in `chunk` (it may have begun in the carry), or `None` after keeping
    /// the chunk's tail for the next call.
    fn find_key(&mut self, chunk: &[u8]) -> Option<usize> {
        if !self.carry.is_empty() {
            // Only a key that starts in the carry can end in the first KEY.len() - 1 bytes.
            let carried = self.carry.len();
            let take = chunk.len().min(KEY.len() - 1);
            self.carry.extend_from_slice(&chunk[..take]);
            if let Some(at) = KEY_FINDER.find(&self.carry) {
                self.carry.clear();
                return Some(at + KEY.len() - carried);
            }
            if take == chunk.len() {
                let excess = self.carry.len().saturating_sub(KEY.len() - 1);
                self.carry.drain(..excess);
                return None;
            }
            self.carry.clear();
        }
        if let Some(at) = KEY_FINDER.find(chunk) {
            return Some(at + KEY.len());
        }
        let keep = chunk.len().min(KEY.len() - 1);
        self.carry.extend_from_slice(&chunk[chunk.len() - keep..]);
        None
    }
}

/// Told once, when an answer's body ends (or the caller left), what usage it reported and how
/// many server-sent events went by.
pub type Report = Box<dyn FnOnce(Option<Usage>, u64) + Send + Sync>;

/// What to do with a successful answer's body: count its usage for `client` (when `scan`), and
/// tell `report` at the end, with the number of events when `count_events` (only a client whose
/// limits may need the estimate pays for the search).
pub struct Metering {
    pub client: Arc<str>,
    pub scan: bool,
    pub count_events: bool,
    pub report: Option<Report>,
}

/// Passes a body through untouched while scanning it; counts the usage it saw when dropped, which
/// is when the body ended or the client went away.
pub struct UsageMeter<S> {
    inner: S,
    scanner: Option<UsageScanner>,
    metrics: Metrics,
    client: Arc<str>,
    count_events: bool,
    events: u64,
    report: Option<Report>,
}

impl<S> UsageMeter<S> {
    pub fn new(inner: S, metrics: Metrics, metering: Metering) -> Self {
        UsageMeter {
            inner,
            scanner: metering.scan.then(UsageScanner::default),
            metrics,
            client: metering.client,
            count_events: metering.count_events,
            events: 0,
            report: metering.report,
        }
    }
}

impl<S, E> Stream for UsageMeter<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    type Item = Result<Bytes, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_next(cx);
        if let Poll::Ready(Some(Ok(chunk))) = &polled {
            if let Some(scanner) = &mut this.scanner {
                scanner.feed(chunk);
            }
            if this.count_events {
                this.events += DATA_FINDER.find_iter(chunk).count() as u64;
            }
        }
        polled
    }
}

/// Server-sent events, counted for the estimate of a stream that reports no usage.
static DATA_FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"data:"));

impl<S> Drop for UsageMeter<S> {
    fn drop(&mut self) {
        let usage = self.scanner.as_ref().and_then(UsageScanner::usage);
        if let Some(usage) = usage {
            self.metrics
                .tokens(&self.client, TokenKind::Prompt, usage.prompt);
            self.metrics
                .tokens(&self.client, TokenKind::Completion, usage.completion);
            self.metrics
                .tokens(&self.client, TokenKind::Total, usage.total);
        }
        if let Some(report) = self.report.take() {
            report(usage, self.events);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_in_pieces(body: &[u8], piece: usize) -> Option<Usage> {
        let mut scanner = UsageScanner::default();
        for chunk in body.chunks(piece) {
            scanner.feed(chunk);
        }
        scanner.usage()
    }

    const CHAT: &[u8] = br#"{"id":"x","choices":[{"message":{"content":"say \"usage\":{\"prompt_tokens\":99}"}}],"usage":{"prompt_tokens":7,"completion_tokens":6,"total_tokens":13,"prompt_tokens_details":{"cached_tokens":0}}}"#;

    #[test]
    fn plain_answer_usage_is_found_however_the_body_is_split() {
        let expected = Some(Usage {
            prompt: 7,
            completion: 6,
            total: 13,
        });
        for piece in 1..CHAT.len() {
            assert_eq!(scan_in_pieces(CHAT, piece), expected, "pieces of {piece}");
        }
    }

    #[test]
    fn stream_usage_is_the_final_usage_event() {
        let stream = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\
            data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5,\"total_tokens\":8}}\n\n\
            data: [DONE]\n\n";
        for piece in [1, 2, 7, 16, 64, stream.len()] {
            assert_eq!(
                scan_in_pieces(stream, piece),
                Some(Usage {
                    prompt: 3,
                    completion: 5,
                    total: 8
                })
            );
        }
    }

    #[test]
    fn responses_api_names_are_understood() {
        let body =
            br#"{"response":{"usage":{"input_tokens":10,"output_tokens":4,"total_tokens":14}}}"#;
        assert_eq!(
            scan_in_pieces(body, 5),
            Some(Usage {
                prompt: 10,
                completion: 4,
                total: 14
            })
        );
    }

    #[test]
    fn token_counts_near_u64_max_saturate_instead_of_overflowing() {
        let body = br#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":1}}"#;
        assert_eq!(
            scan_in_pieces(body, body.len()),
            Some(Usage {
                prompt: u64::MAX,
                completion: 1,
                total: u64::MAX
            })
        );
    }

    #[test]
    fn an_object_over_the_cap_is_ignored_however_the_body_is_split() {
        // Found by the fuzzer: whole, such an object used to count; in pieces it did not, and
        // the search resumed at whichever chunk boundary came next.
        let mut body = br#"{"usage":{"prompt_tokens":1,"note":""#.to_vec();
        body.resize(MAX_OBJECT + 100, b'a');
        body.extend_from_slice(br#""}}"#);
        for piece in [1, 7, 1000, body.len()] {
            assert_eq!(scan_in_pieces(&body, piece), None, "pieces of {piece}");
        }
    }

    #[test]
    fn an_object_of_exactly_the_cap_still_counts() {
        let mut body = br#"{"usage":{"prompt_tokens":3,"note":""#.to_vec();
        let head = body.len() - br#"{"usage":"#.len();
        body.resize(body.len() + MAX_OBJECT - head - 2, b'a');
        body.extend_from_slice(br#""}}"#);
        for piece in [1, 64, body.len()] {
            assert_eq!(
                scan_in_pieces(&body, piece),
                Some(Usage {
                    prompt: 3,
                    completion: 0,
                    total: 3
                }),
                "pieces of {piece}"
            );
        }
    }

    #[test]
    fn no_usage_means_none() {
        assert_eq!(scan_in_pieces(b"{\"usage\": null}", 3), None);
        assert_eq!(scan_in_pieces(b"{\"data\":[1,2,3]}", 4), None);
        assert_eq!(scan_in_pieces(b"", 4), None);
    }
}
