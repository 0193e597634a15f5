//! STUB (replaced by the rename branch).
use std::ops::Range;

use bytes::Bytes;
use warp::http::HeaderMap;

pub fn body(_headers: &HeaderMap, body: &Bytes, span: Range<usize>, new_name: &str) -> Bytes {
    let mut out = Vec::with_capacity(body.len() + new_name.len());
    out.extend_from_slice(&body[..span.start]);
    out.extend_from_slice(serde_json::to_string(new_name).unwrap_or_default().as_bytes());
    out.extend_from_slice(&body[span.end..]);
    Bytes::from(out)
}

pub fn query(query: &str, _new_name: &str) -> String {
    query.to_string()
}
