//! Raw HTTP/1.1 on a plain socket, for the soak requests a well-behaved client library will not
//! send or will not let go of the way the soak needs: malformed requests, bodies the proxy cuts
//! off with a 413 (the answer has to be read after a failed write), and streams dropped with an
//! RST. Only what those answers need: status line, headers, Content-Length or chunked bodies.

use std::fmt;
use std::io;

use memchr::memmem;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Why a request did not get the answer it expects: a short reason (counted per kind) and what
/// came back (kept in the samples).
#[derive(Debug, Clone, PartialEq)]
pub struct Lost {
    pub reason: String,
    pub detail: String,
}

impl Lost {
    pub fn new(reason: impl Into<String>, detail: impl Into<String>) -> Self {
        Lost {
            reason: reason.into(),
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.reason, self.detail)
    }
}

/// An I/O error as a loss reason: its kind, which is what tells one failure from another.
pub fn io_lost(err: &io::Error) -> Lost {
    Lost::new(format!("{:?}", err.kind()), err.to_string())
}

/// At most `max` bytes, shown the way a log would (escapes for anything not printable).
pub fn excerpt(bytes: &[u8], max: usize) -> String {
    let cut = &bytes[..bytes.len().min(max)];
    cut.escape_ascii().to_string()
}

/// The end of `bytes`, for a stream whose last events matter.
pub fn tail(bytes: &[u8], max: usize) -> String {
    bytes[bytes.len().saturating_sub(max)..]
        .escape_ascii()
        .to_string()
}

#[derive(Debug)]
pub struct Head {
    pub status: u16,
    /// Lower-cased names, values trimmed, in order of arrival.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// All values of a header, joined with ", " as repeated headers mean.
    pub fn header(&self, name: &str) -> String {
        let values: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect();
        values.join(", ")
    }

    pub fn is_chunked(&self) -> bool {
        self.header("transfer-encoding")
            .to_ascii_lowercase()
            .contains("chunked")
    }
}

#[derive(Debug)]
pub struct Response {
    pub head: Head,
    pub body: Vec<u8>,
}

impl Response {
    pub fn describe(&self) -> String {
        format!("(status {}) {}", self.head.status, excerpt(&self.body, 160))
    }
}

const MAX_HEAD: usize = 1 << 20;

enum Short {
    Eof(Vec<u8>),
    Io(io::Error),
    TooLong,
}

/// A buffered reader of HTTP/1.1 responses over any byte source.
pub struct HttpReader<R> {
    inner: R,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> HttpReader<R> {
    pub fn new(inner: R) -> Self {
        HttpReader {
            inner,
            buf: Vec::with_capacity(8192),
        }
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    async fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16384];
        let n = self.inner.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    async fn take_until(&mut self, pattern: &[u8]) -> Result<Vec<u8>, Short> {
        let mut scanned = 0;
        loop {
            if let Some(pos) = memmem::find(&self.buf[scanned..], pattern) {
                let end = scanned + pos + pattern.len();
                return Ok(self.buf.drain(..end).collect());
            }
            scanned = self.buf.len().saturating_sub(pattern.len() - 1);
            if self.buf.len() > MAX_HEAD {
                return Err(Short::TooLong);
            }
            match self.fill().await {
                Ok(0) => return Err(Short::Eof(std::mem::take(&mut self.buf))),
                Ok(_) => {}
                Err(err) => return Err(Short::Io(err)),
            }
        }
    }

    async fn take_exact(&mut self, n: usize) -> Result<Vec<u8>, Short> {
        while self.buf.len() < n {
            match self.fill().await {
                Ok(0) => return Err(Short::Eof(std::mem::take(&mut self.buf))),
                Ok(_) => {}
                Err(err) => return Err(Short::Io(err)),
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Status and headers of the next final response (1xx, e.g. 100 Continue, are skipped).
    pub async fn read_head(&mut self) -> Result<Head, Lost> {
        loop {
            let raw = match self.take_until(b"\r\n\r\n").await {
                Ok(raw) => raw,
                Err(Short::Eof(partial)) if partial.is_empty() => {
                    return Err(Lost::new("eof before status", ""));
                }
                Err(Short::Eof(partial)) => {
                    return Err(Lost::new("cut in headers", excerpt(&partial, 160)));
                }
                Err(Short::Io(err)) => return Err(io_lost(&err)),
                Err(Short::TooLong) => return Err(Lost::new("headers too long", "")),
            };
            let head = parse_head(&raw)?;
            if !(100..200).contains(&head.status) {
                return Ok(head);
            }
        }
    }

    /// The next chunk's data; empty for the last chunk (whose trailers are read and dropped).
    pub async fn read_chunk(&mut self) -> Result<Vec<u8>, Lost> {
        let line = self.take_until(b"\r\n").await.map_err(truncated)?;
        let size = parse_chunk_size(&line)
            .ok_or_else(|| Lost::new("bad chunk size", excerpt(&line, 80)))?;
        if size == 0 {
            while self.take_until(b"\r\n").await.map_err(truncated)? != b"\r\n" {}
            return Ok(Vec::new());
        }
        let mut data = self.take_exact(size + 2).await.map_err(truncated)?;
        if !data.ends_with(b"\r\n") {
            return Err(Lost::new("bad chunk end", ""));
        }
        data.truncate(size);
        Ok(data)
    }

    /// A whole response: head and body (chunked, Content-Length or up to the close).
    pub async fn read_response(&mut self) -> Result<Response, Lost> {
        let head = self.read_head().await?;
        let status = head.status;
        let with_status = |lost: Lost| Lost::new(lost.reason, format!("{status}: {}", lost.detail));
        let body = if status == 204 || status == 304 {
            Vec::new()
        } else if head.is_chunked() {
            let mut body = Vec::new();
            loop {
                let chunk = self.read_chunk().await.map_err(with_status)?;
                if chunk.is_empty() {
                    break body;
                }
                body.extend_from_slice(&chunk);
            }
        } else if let Ok(length) = head.header("content-length").parse::<usize>() {
            self.take_exact(length)
                .await
                .map_err(truncated)
                .map_err(with_status)?
        } else {
            let mut rest = std::mem::take(&mut self.buf);
            self.inner
                .read_to_end(&mut rest)
                .await
                .map_err(|e| with_status(io_lost(&e)))?;
            rest
        };
        Ok(Response { head, body })
    }

    /// Up to `max` bytes that follow, or nothing at the end of the connection.
    pub async fn read_more(&mut self, max: usize) -> io::Result<Vec<u8>> {
        if self.buf.is_empty() {
            self.fill().await?;
        }
        let n = self.buf.len().min(max);
        Ok(self.buf.drain(..n).collect())
    }
}

fn truncated(short: Short) -> Lost {
    match short {
        Short::Eof(partial) => {
            Lost::new("truncated body", format!("after {} bytes", partial.len()))
        }
        Short::Io(err) => io_lost(&err),
        Short::TooLong => Lost::new("chunk line too long", ""),
    }
}

fn parse_chunk_size(line: &[u8]) -> Option<usize> {
    let line = line.strip_suffix(b"\r\n").unwrap_or(line);
    let size = line.split(|&b| b == b';').next()?;
    let size = std::str::from_utf8(size).ok()?.trim();
    usize::from_str_radix(size, 16).ok()
}

fn parse_head(raw: &[u8]) -> Result<Head, Lost> {
    // Latin-1, as HTTP/1.1 header bytes are: every byte maps to one char.
    let text: String = raw.iter().map(|&b| b as char).collect();
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status = parts.next().unwrap_or_default();
    let status = match status.parse::<u16>() {
        Ok(code) if version.starts_with("HTTP/1.") && status.len() == 3 => code,
        _ => {
            return Err(Lost::new(
                "bad status line",
                excerpt(status_line.as_bytes(), 160),
            ));
        }
    };
    let headers = lines
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap_or((line, ""));
            (name.trim().to_ascii_lowercase(), value.trim().to_string())
        })
        .collect();
    Ok(Head { status, headers })
}

/// A request as bytes on the wire: `extra` holds whole header lines (each ending in CRLF).
pub fn raw_request(
    method: &str,
    path: &str,
    host_port: &str,
    auth: Option<&str>,
    extra: &str,
    body: Option<&[u8]>,
) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host_port}\r\n");
    if let Some(token) = auth {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    head.push_str(extra);
    if let Some(body) = body {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body.unwrap_or_default());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(wire: &[u8]) -> Result<Response, Lost> {
        HttpReader::new(wire).read_response().await
    }

    #[tokio::test]
    async fn content_length_after_100_continue() {
        let wire = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 413 Payload Too Large\r\ncontent-length: 5\r\n\r\nhello";
        let r = parse(wire).await.unwrap();
        assert_eq!(r.head.status, 413);
        assert_eq!(r.body, b"hello");
    }

    #[tokio::test]
    async fn chunked_with_extension_and_trailer() {
        let wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nx-t: 1\r\n\r\n";
        let r = parse(wire).await.unwrap();
        assert_eq!(r.body, b"abcde");
    }

    #[tokio::test]
    async fn cut_responses_are_lost_with_a_reason() {
        assert_eq!(parse(b"").await.unwrap_err().reason, "eof before status");
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\n").await.unwrap_err().reason,
            "cut in headers"
        );
        let short = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
            .await
            .unwrap_err();
        assert_eq!(short.reason, "truncated body");
        assert_eq!(
            parse(b"SSH-2.0\r\n\r\n").await.unwrap_err().reason,
            "bad status line"
        );
    }

    #[tokio::test]
    async fn body_up_to_the_close() {
        let r = parse(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\nbad")
            .await
            .unwrap();
        assert_eq!((r.head.status, r.body.as_slice()), (400, &b"bad"[..]));
    }

    #[test]
    fn raw_request_has_length_and_auth() {
        let req = raw_request(
            "POST",
            "/x",
            "127.0.0.1:1",
            Some("t"),
            "A: b\r\n",
            Some(b"{}"),
        );
        assert_eq!(
            req,
            b"POST /x HTTP/1.1\r\nHost: 127.0.0.1:1\r\nAuthorization: Bearer t\r\nA: b\r\nContent-Length: 2\r\n\r\n{}"
        );
    }
}
