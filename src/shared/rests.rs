//! Upstream key rests in Redis: a key that one replica saw rate-limited (429) rests for every
//! replica.
//!
//! One key per upstream key, `llm-proxy:{keys}:rest:<fingerprint>`, that exists while the key
//! rests and expires when the rest ends (`PX`). The fingerprint is a hash of the key, not its
//! position in `AUTH_BEARER`: two deployments sharing one Redis, or a rolling update that
//! reorders the list, must not rest each other's keys by position. It is 64 bits of SHA-256, so
//! it tells nothing about the key; logs and metrics still name keys by position.
//!
//! A replica does not ask Redis on the request path: it merges its rests with Redis's in one
//! round trip (one script, [`MERGE`]) every `REST_SYNC_INTERVAL` and right after a 429 of its
//! own, and decides from what it holds. Remaining times, not clock readings, go both ways, so
//! the replicas' clocks do not matter.

use std::sync::Arc;
use std::time::Duration;

use redis::Script;
use sha2::{Digest, Sha256};

use super::{Shared, Unavailable};
use crate::config::UpstreamKey;

/// Rests longer than this are kept for this long in Redis (a day; every key needs an expiry
/// that means something). The replica that got the 429 still keeps the whole rest itself.
pub const MAX_SHARED_REST: Duration = Duration::from_secs(24 * 60 * 60);

/// A rest in Redis shorter than ours by less than this is not rewritten: the two are the same
/// rest, seen a round trip apart.
const SLACK: Duration = Duration::from_millis(250);

/// KEYS[i]: the rest of upstream key i. ARGV[1]: the slack in ms. ARGV[i + 1]: this replica's
/// remaining rest of key i in ms, 0 for none. Keeps the longer of the two rests, each Redis key
/// expiring when its rest ends, and returns every key's remaining rest in ms (0: none).
pub const MERGE: &str = r"
local slack = tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  local mine = tonumber(ARGV[i + 1])
  local theirs = redis.call('PTTL', key)
  if theirs == -1 then
    -- Not written by us (ours always expire): gone, so that no key lives forever.
    redis.call('DEL', key)
    theirs = 0
  end
  if mine > 0 and mine > theirs + slack then
    redis.call('SET', key, '1', 'PX', mine)
    theirs = mine
  end
  if theirs < 0 then theirs = 0 end
  out[i] = theirs
end
return out
";

/// The Redis side of one key pool's rests.
pub struct SharedRests {
    shared: Shared,
    /// The Redis key of each upstream key, in pool order.
    names: Arc<[String]>,
    merge: Script,
}

impl SharedRests {
    pub fn new(shared: Shared, keys: &[UpstreamKey]) -> SharedRests {
        SharedRests {
            shared,
            names: keys.iter().map(|key| rest_key(key.key.expose())).collect(),
            merge: Script::new(MERGE),
        }
    }

    /// One round trip: hands Redis this replica's remaining rests (in pool order) and gets
    /// back every replica's, the longer of the two for each key.
    pub async fn merge(&self, mine: &[Duration]) -> Result<Vec<Duration>, Unavailable> {
        let mut invocation = self.merge.prepare_invoke();
        for name in self.names.iter() {
            invocation.key(name);
        }
        invocation.arg(millis(SLACK));
        for position in 0..self.names.len() {
            let rest = mine.get(position).copied().unwrap_or_default();
            invocation.arg(millis(rest.min(MAX_SHARED_REST)));
        }
        let theirs: Vec<u64> = self.shared.eval(&invocation).await?;
        Ok(theirs.into_iter().map(Duration::from_millis).collect())
    }

    /// The rest key of each upstream key, in pool order: how a signal names a key.
    pub fn names(&self) -> &Arc<[String]> {
        &self.names
    }

    pub fn shared(&self) -> &Shared {
        &self.shared
    }
}

/// `llm-proxy:{keys}:rest:<16 hex digits of SHA-256>`.
pub fn rest_key(key: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"llm-proxy upstream key rest\n")
        .chain_update(key.as_bytes())
        .finalize();
    let hex: String = digest[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("llm-proxy:{{keys}}:rest:{hex}")
}

/// Whole milliseconds, rounded up so that a rest never ends early.
pub(super) fn millis(duration: Duration) -> u64 {
    let whole = duration.as_millis();
    let rounded = whole + u128::from(!duration.subsec_nanos().is_multiple_of(1_000_000));
    u64::try_from(rounded).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_keys_carry_the_hash_tag_and_no_part_of_the_key() {
        let name = rest_key("sk-live-abcdefghijklmnop");
        assert!(name.starts_with("llm-proxy:{keys}:rest:"), "{name}");
        assert_eq!(name.len(), "llm-proxy:{keys}:rest:".len() + 16);
        assert!(!name.contains("abcdef"), "{name}");
        assert_eq!(name, rest_key("sk-live-abcdefghijklmnop"), "stable");
        assert_ne!(name, rest_key("sk-live-abcdefghijklmnoq"));
    }

    #[test]
    fn rests_are_sent_in_whole_milliseconds_rounded_up() {
        assert_eq!(millis(Duration::from_micros(1500)), 2);
        assert_eq!(millis(Duration::from_millis(3)), 3);
        assert_eq!(millis(Duration::ZERO), 0);
    }
}
