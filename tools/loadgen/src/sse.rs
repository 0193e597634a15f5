//! Counting server-sent events in a byte stream that arrives in arbitrary pieces.

use memchr::memmem;

/// Events end with a blank line (`\n\n`); one may be split over any number of reads, and one read
/// may hold several events, so the bytes after the last complete event are carried over.
#[derive(Default)]
pub struct SseCounter {
    pending: Vec<u8>,
    last_event: Vec<u8>,
    events: u64,
}

impl SseCounter {
    /// Feeds the next bytes; returns how many events they completed.
    pub fn feed(&mut self, data: &[u8]) -> u64 {
        // Only the tail of `pending` can join with `data` into a new `\n\n`; scanning from there
        // keeps a long stream linear.
        let scan_from = self.pending.len().saturating_sub(1);
        self.pending.extend_from_slice(data);
        let finder = memmem::Finder::new(b"\n\n");
        let mut start = 0;
        let mut at = scan_from;
        let mut found = 0;
        while let Some(pos) = finder.find(&self.pending[at..]) {
            let end = at + pos;
            self.last_event.clear();
            self.last_event.extend_from_slice(&self.pending[start..end]);
            start = end + 2;
            at = start;
            found += 1;
        }
        self.pending.drain(..start);
        self.events += found;
        found
    }

    pub fn events(&self) -> u64 {
        self.events
    }

    /// The last complete event, without its closing blank line.
    pub fn last_event(&self) -> &[u8] {
        &self.last_event
    }

    /// Bytes after the last complete event (empty for a well-formed, finished stream).
    pub fn trailing(&self) -> &[u8] {
        &self.pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &[u8] = b"data: {\"a\":1}\n\ndata: {\"b\":2}\n\ndata: [DONE]\n\n";

    #[test]
    fn whole_stream_in_one_read() {
        let mut c = SseCounter::default();
        assert_eq!(c.feed(STREAM), 3);
        assert_eq!(c.last_event(), b"data: [DONE]");
        assert!(c.trailing().is_empty());
    }

    #[test]
    fn every_split_point_gives_the_same_count() {
        for cut in 0..=STREAM.len() {
            let mut c = SseCounter::default();
            let n = c.feed(&STREAM[..cut]) + c.feed(&STREAM[cut..]);
            assert_eq!((n, c.events()), (3, 3), "cut at {cut}");
            assert_eq!(c.last_event(), b"data: [DONE]", "cut at {cut}");
        }
    }

    #[test]
    fn byte_by_byte() {
        let mut c = SseCounter::default();
        let n: u64 = STREAM.iter().map(|b| c.feed(std::slice::from_ref(b))).sum();
        assert_eq!(n, 3);
        assert!(c.trailing().is_empty());
    }

    #[test]
    fn newline_pair_split_across_reads_counts_once() {
        let mut c = SseCounter::default();
        assert_eq!(c.feed(b"data: x\n"), 0);
        assert_eq!(c.feed(b"\n"), 1);
        assert_eq!(c.feed(b"\n"), 0);
        assert_eq!(c.trailing(), b"\n");
    }

    #[test]
    fn unfinished_event_is_trailing() {
        let mut c = SseCounter::default();
        c.feed(b"data: a\n\ndata: b");
        assert_eq!(c.events(), 1);
        assert_eq!(c.last_event(), b"data: a");
        assert_eq!(c.trailing(), b"data: b");
    }
}
