//! The invariants of the usage scanner, as one function a fuzzer can drive with arbitrary bytes
//! and `cargo test` can replay over the saved corpus (`fuzz/corpus/usage`). Shared by path with
//! the fuzz target and the test, so it stays out of the library's public items.

use llm_proxy::proxy::usage::UsageScanner;
use llm_proxy::vocab::Usage;

/// What a streamed answer with `include_usage` ends with, in numbers no input can collide with.
const KNOWN: Usage = Usage {
    prompt: 11,
    completion: 22,
    total: 33,
    cached: 0,
};

fn scan(pieces: impl Iterator<Item = impl AsRef<[u8]>>) -> Option<Usage> {
    let mut scanner = UsageScanner::default();
    for piece in pieces {
        scanner.feed(piece.as_ref());
    }
    scanner.usage()
}

/// `body` cut into pieces whose sizes (1 to 64 bytes) cycle through values taken from `seed`, so
/// that the fuzzer steers where the chunk boundaries fall.
fn split<'a>(body: &'a [u8], seed: &[u8]) -> Vec<&'a [u8]> {
    let sizes: Vec<usize> = seed
        .iter()
        .take(4)
        .map(|&byte| usize::from(byte % 64) + 1)
        .collect();
    let sizes = if sizes.is_empty() { vec![1] } else { sizes };
    let mut pieces = Vec::new();
    let mut rest = body;
    for size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (piece, tail) = rest.split_at((*size).min(rest.len()));
        pieces.push(piece);
        rest = tail;
    }
    pieces
}

/// Panics if scanning `input` breaks an invariant.
pub fn check_usage(input: &[u8]) {
    // Chunk boundaries are the network's choice: they must never change what is found.
    let whole = scan(std::iter::once(input));
    let pieces = scan(split(input, input).into_iter());
    assert_eq!(pieces, whole, "split at sizes from the first bytes");
    let bytes = scan(input.chunks(1));
    assert_eq!(bytes, whole, "fed a byte at a time");

    // Whatever the model was made to write, its text arrives as an escaped JSON string and must
    // not hide or replace the usage event that follows it.
    let content = serde_json::to_string(&String::from_utf8_lossy(input)).expect("a JSON string");
    let body = format!(
        "data: {{\"choices\":[{{\"delta\":{{\"content\":{content}}}}}],\"usage\":null}}\n\n\
         data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":11,\"completion_tokens\":22,\
         \"total_tokens\":33}}}}\n\ndata: [DONE]\n\n"
    );
    let body = body.as_bytes();
    assert_eq!(
        scan(std::iter::once(body)),
        Some(KNOWN),
        "the usage event after the content"
    );
    assert_eq!(
        scan(split(body, input).into_iter()),
        Some(KNOWN),
        "the usage event after the content, split"
    );
}
