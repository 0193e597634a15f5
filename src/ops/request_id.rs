//! Request ids: the caller's, when it is usable, or a new one; the upstream gets it as
//! `X-Request-Id` and the caller gets it back as `X-Proxy-Request-Id`.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};

use warp::http::{HeaderMap, HeaderName, HeaderValue};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const PROXY_REQUEST_ID: HeaderName = HeaderName::from_static("x-proxy-request-id");
const MAX_REQUEST_ID: usize = 128;

/// The caller's `X-Request-Id` when it is short and plain, or a new random one. It is what the
/// upstream receives as `X-Request-Id` and what the caller gets back as `X-Proxy-Request-Id`.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(given) = headers.get(&REQUEST_ID)
        && (1..=MAX_REQUEST_ID).contains(&given.len())
        && given
            .as_bytes()
            .iter()
            .all(|&byte| byte.is_ascii_alphanumeric() || b"-_.:/+=".contains(&byte))
    {
        return given.clone();
    }
    // splitmix64 over a counter with a random seed: unique per process, unpredictable enough for
    // an id, and written as hex on the stack (a fresh hasher and format! cost twice as much).
    static SEED: std::sync::LazyLock<u64> =
        std::sync::LazyLock::new(|| RandomState::new().hash_one(0x5eed_u64));
    let mut z = SEED.wrapping_add(
        NEXT_LOCAL_ID
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15),
    );
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 16];
    for (i, slot) in buf.iter_mut().enumerate() {
        *slot = HEX[((z >> (60 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&buf).unwrap_or(HeaderValue::from_static("-"))
}

static NEXT_LOCAL_ID: AtomicU64 = AtomicU64::new(0);
