//! Token usage read from upstream bodies as they stream past, without buffering them: a scanner
//! looks for `"usage":{` and captures only that object, in plain JSON answers and in the final
//! usage event of a stream (`stream_options.include_usage`) alike. Another finds the model the
//! answer names, for the access line of a request whose body was not read.

use std::sync::Arc;

use serde::Deserialize;

use crate::ops::exchange::loggable;
use crate::ops::metrics::{Metrics, TokenKind};
use crate::vocab::Usage;

const KEY: &[u8] = b"\"usage\"";
/// Built once: constructing a searcher per chunk cost more than the search itself.
static KEY_FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(KEY));
/// A usage object is a handful of numbers; anything longer is not one.
const MAX_OBJECT: usize = 4096;

#[derive(Deserialize)]
struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    input_tokens_details: Option<Details>,
}

/// Only the cached count of the details; the rest (audio, reasoning) is inside the totals.
#[derive(Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
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
            cached: self
                .prompt_tokens_details
                .or(self.input_tokens_details)
                .and_then(|details| details.cached_tokens)
                .unwrap_or(0),
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
    /// How many of the key's first bytes the body so far ended with, in case the key is split
    /// across chunks: the bytes themselves are the key's, so no copy of them is kept.
    carried: usize,
    last: Option<Usage>,
}

impl Default for UsageScanner {
    fn default() -> Self {
        UsageScanner {
            state: State::Searching,
            carried: 0,
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

    fn find_key(&mut self, chunk: &[u8]) -> Option<usize> {
        find_key(KEY, &KEY_FINDER, &mut self.carried, chunk)
    }
}

/// Where `key` ends in `chunk` (it may have begun in an earlier chunk: `carried` says how many of
/// its first bytes the body so far ended with), or `None` after noting how much of the key the
/// chunk ends with. `key` must have a quote at its ends and nowhere else.
fn find_key(
    key: &[u8],
    finder: &memchr::memmem::Finder<'static>,
    carried: &mut usize,
    chunk: &[u8],
) -> Option<usize> {
    if *carried > 0 {
        let rest = &key[*carried..];
        let overlap = rest.len().min(chunk.len());
        if chunk[..overlap] == rest[..overlap] {
            if overlap == rest.len() {
                *carried = 0;
                return Some(overlap);
            }
            *carried += overlap;
            return None;
        }
        // No other start of the key lies in the carried bytes: see `partial_key_at_end`.
        *carried = 0;
    }
    if let Some(at) = finder.find(chunk) {
        return Some(at + key.len());
    }
    *carried = partial_key_at_end(key, chunk);
    None
}

/// The length of the longest end of `chunk` that is a beginning of `key` (shorter than the key).
/// The key's only quote within those beginnings is its first byte, so the one candidate is the
/// end from the last quote; the usual chunk, ending in a newline, is answered by one `memrchr`.
fn partial_key_at_end(key: &[u8], chunk: &[u8]) -> usize {
    let tail = &chunk[chunk.len().saturating_sub(key.len() - 1)..];
    match memchr::memrchr(b'"', tail) {
        Some(quote) if key.starts_with(&tail[quote..]) => tail.len() - quote,
        _ => 0,
    }
}

const MODEL_KEY: &[u8] = b"\"model\"";
static MODEL_FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(MODEL_KEY));
/// Model names are short; a longer string is not one.
const MAX_MODEL: usize = 256;

/// Finds the first `"model":"<name>"` of an answer (a JSON body, or a stream's first event) as
/// its chunks pass, for the access line of a request whose body the proxy did not read.
#[derive(Default)]
pub struct ModelScanner {
    state: ModelState,
    carried: usize,
}

#[derive(Default)]
enum ModelState {
    #[default]
    Searching,
    /// After the key: waiting for `:` and then `"` (anything else, such as `null`, is not a name).
    AfterKey {
        colon: bool,
    },
    Value(Vec<u8>),
    Found(Arc<str>),
}

impl ModelScanner {
    /// The model found, if any.
    pub fn model(&self) -> Option<&Arc<str>> {
        match &self.state {
            ModelState::Found(model) => Some(model),
            _ => None,
        }
    }

    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            match &mut self.state {
                ModelState::Found(_) => return,
                ModelState::Searching => {
                    match find_key(MODEL_KEY, &MODEL_FINDER, &mut self.carried, chunk) {
                        Some(after_key) => {
                            self.state = ModelState::AfterKey { colon: false };
                            chunk = &chunk[after_key..];
                        }
                        None => return,
                    }
                }
                ModelState::AfterKey { colon } => match chunk[0] {
                    b' ' | b'\t' | b'\r' | b'\n' => chunk = &chunk[1..],
                    b':' if !*colon => {
                        *colon = true;
                        chunk = &chunk[1..];
                    }
                    b'"' if *colon => {
                        self.state = ModelState::Value(Vec::new());
                        chunk = &chunk[1..];
                    }
                    _ => self.state = ModelState::Searching,
                },
                ModelState::Value(value) => match memchr::memchr2(b'"', b'\\', chunk) {
                    Some(end) if chunk[end] == b'"' => {
                        // The usual name lies whole in one chunk: read where it is, not copied.
                        let name = if value.is_empty() {
                            &chunk[..end]
                        } else {
                            value.extend_from_slice(&chunk[..end]);
                            value.as_slice()
                        };
                        self.state = if name.is_empty() || name.len() > MAX_MODEL {
                            ModelState::Searching
                        } else {
                            ModelState::Found(loggable(&String::from_utf8_lossy(name)))
                        };
                        chunk = &chunk[end + 1..];
                    }
                    // Model names carry no escapes: whatever this is, it is not one.
                    Some(escape) => {
                        self.state = ModelState::Searching;
                        chunk = &chunk[escape + 1..];
                    }
                    None => {
                        value.extend_from_slice(chunk);
                        if value.len() > MAX_MODEL {
                            self.state = ModelState::Searching;
                        }
                        return;
                    }
                },
            }
        }
    }
}

/// What an answer's body showed by its end (or by the time the caller left).
#[derive(Debug, Default)]
pub struct Seen {
    /// The last usage object.
    pub usage: Option<Usage>,
    /// Server-sent events counted, when asked for.
    pub events: u64,
    /// The model the answer names, when asked for.
    pub model: Option<Arc<str>>,
}

/// Told once, when an answer's body ends (or the caller left), what it showed.
pub type Report = Box<dyn FnOnce(Seen) + Send + Sync>;

/// What to do with a successful answer's body: count its usage for `client` (when `scan`), and
/// tell `report` at the end, with the number of events when `count_events` (only a client whose
/// limits may need the estimate pays for the search) and the model it names when `find_model`.
pub struct Metering {
    pub client: Arc<str>,
    pub scan: bool,
    pub count_events: bool,
    pub find_model: bool,
    pub report: Option<Report>,
}

/// Watches a successful answer's body as it passes (fed each chunk by the body adapter, which
/// leaves the chunk untouched); counts the usage it saw when dropped, which is when the body
/// ended or the client went away.
pub struct UsageMeter {
    scanner: Option<UsageScanner>,
    model: Option<ModelScanner>,
    metrics: Metrics,
    client: Arc<str>,
    count_events: bool,
    events: u64,
    report: Option<Report>,
}

impl UsageMeter {
    pub fn new(metrics: Metrics, metering: Metering) -> Self {
        UsageMeter {
            scanner: metering.scan.then(UsageScanner::default),
            model: metering.find_model.then(ModelScanner::default),
            metrics,
            client: metering.client,
            count_events: metering.count_events,
            events: 0,
            report: metering.report,
        }
    }

    /// One chunk of the body, in order.
    pub fn observe(&mut self, chunk: &[u8]) {
        if let Some(scanner) = &mut self.scanner {
            scanner.feed(chunk);
        }
        if let Some(model) = &mut self.model {
            model.feed(chunk);
        }
        if self.count_events {
            self.events += DATA_FINDER.find_iter(chunk).count() as u64;
        }
    }
}

/// Server-sent events, counted for the estimate of a stream that reports no usage.
static DATA_FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"data:"));

impl Drop for UsageMeter {
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
            report(Seen {
                usage,
                events: self.events,
                model: self.model.as_ref().and_then(ModelScanner::model).cloned(),
            });
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

    const CHAT: &[u8] = br#"{"id":"x","model":"gpt-mock","choices":[{"message":{"content":"say \"usage\":{\"prompt_tokens\":99}"}}],"usage":{"prompt_tokens":7,"completion_tokens":6,"total_tokens":13,"prompt_tokens_details":{"cached_tokens":0}}}"#;

    #[test]
    fn plain_answer_usage_is_found_however_the_body_is_split() {
        let expected = Some(Usage {
            prompt: 7,
            completion: 6,
            total: 13,
            cached: 0,
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
                    total: 8,
                    cached: 0
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
                total: 14,
                cached: 0
            })
        );
    }

    #[test]
    fn cached_prompt_tokens_are_read_from_either_shape_of_details() {
        let chat = br#"{"usage":{"prompt_tokens":1000,"completion_tokens":200,"total_tokens":1200,"prompt_tokens_details":{"cached_tokens":400,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":150}}}"#;
        let responses = br#"{"usage":{"input_tokens":1000,"input_tokens_details":{"cached_tokens":400},"output_tokens":200,"output_tokens_details":{"reasoning_tokens":150},"total_tokens":1200}}"#;
        for body in [&chat[..], &responses[..]] {
            for piece in [1, 13, body.len()] {
                assert_eq!(
                    scan_in_pieces(body, piece),
                    Some(Usage {
                        prompt: 1000,
                        completion: 200,
                        total: 1200,
                        cached: 400,
                    }),
                    "pieces of {piece}"
                );
            }
        }
    }

    #[test]
    fn token_counts_near_u64_max_saturate_instead_of_overflowing() {
        let body = br#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":1}}"#;
        assert_eq!(
            scan_in_pieces(body, body.len()),
            Some(Usage {
                prompt: u64::MAX,
                completion: 1,
                total: u64::MAX,
                cached: 0
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
                    total: 3,
                    cached: 0
                }),
                "pieces of {piece}"
            );
        }
    }

    #[test]
    fn the_keys_have_a_quote_only_at_their_ends() {
        // What `partial_key_at_end` relies on.
        for key in [KEY, MODEL_KEY] {
            assert_eq!(
                memchr::memchr_iter(b'"', key).collect::<Vec<_>>(),
                [0, key.len() - 1]
            );
        }
    }

    fn model_in_pieces(body: &[u8], piece: usize) -> Option<String> {
        let mut scanner = ModelScanner::default();
        for chunk in body.chunks(piece) {
            scanner.feed(chunk);
        }
        scanner.model().map(|model| model.to_string())
    }

    #[test]
    fn the_answer_s_model_is_found_however_the_body_is_split() {
        let stream = b"data: {\"id\":\"c\",\"model\" : \"gpt-4o-mini\",\"choices\":[]}\n\n\
            data: {\"model\":\"other\"}\n\n";
        for body in [CHAT, &stream[..]] {
            let expected = if body == CHAT {
                "gpt-mock"
            } else {
                "gpt-4o-mini"
            };
            for piece in 1..body.len() {
                assert_eq!(
                    model_in_pieces(body, piece).as_deref(),
                    Some(expected),
                    "pieces of {piece}"
                );
            }
        }
    }

    #[test]
    fn what_is_not_a_model_name_is_passed_over() {
        let body =
            br#"{"model":null,"x":"say \"model\":\"no\"","model":"a\"b","model":"","model":"m1"}"#;
        assert_eq!(model_in_pieces(body, 3).as_deref(), Some("m1"));
        let long = format!(r#"{{"model":"{}"}}"#, "x".repeat(MAX_MODEL + 1));
        assert_eq!(model_in_pieces(long.as_bytes(), 100), None);
        assert_eq!(
            model_in_pieces(b"{\"model\":\"m\nPOST /x\"}", 4).as_deref(),
            Some("m?POST?/x")
        );
    }

    #[test]
    fn a_key_split_in_every_way_is_found() {
        let body = br#"xx"us"usage":{"total_tokens":4}}"#;
        for first in 0..body.len() {
            for second in first..body.len() {
                let mut scanner = UsageScanner::default();
                for piece in [&body[..first], &body[first..second], &body[second..]] {
                    scanner.feed(piece);
                }
                assert_eq!(
                    scanner.usage().map(|usage| usage.total),
                    Some(4),
                    "{first} {second}"
                );
            }
        }
    }

    #[test]
    fn no_usage_means_none() {
        assert_eq!(scan_in_pieces(b"{\"usage\": null}", 3), None);
        assert_eq!(scan_in_pieces(b"{\"data\":[1,2,3]}", 4), None);
        assert_eq!(scan_in_pieces(b"", 4), None);
    }
}
