//! The `/v1/models` cache: one entry, a time-to-live, and a single upstream fetch per cold miss.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use parking_lot::RwLock;
// tokio's clock rather than std's, so that tests with paused time can step over the TTL.
use tokio::time::Instant;
use warp::http::{HeaderMap, StatusCode};

use crate::error::ProxyError;

/// A complete upstream answer, small enough to keep in memory and hand out many times.
#[derive(Debug)]
pub struct CachedResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub type FetchResult = Result<Arc<CachedResponse>, ProxyError>;

type Flight = Shared<BoxFuture<'static, FetchResult>>;

/// Whether an answer came from memory or from the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Miss,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
        }
    }
}

#[derive(Default)]
struct Slot {
    entry: Option<(Arc<CachedResponse>, Instant)>,
    in_flight: Option<Flight>,
    /// Bumped by `clear` so that a fetch started before the clear does not refill the cache.
    generation: u64,
}

/// Cloning is shallow: clones share one cache.
#[derive(Clone)]
pub struct ModelsCache {
    ttl: Duration,
    // A synchronous lock is right here: it is only held to copy an `Arc` or swap a field, never
    // across an `.await`, so waiters never park a tokio worker for long.
    slot: Arc<RwLock<Slot>>,
}

impl ModelsCache {
    pub fn new(ttl: Duration) -> ModelsCache {
        ModelsCache {
            ttl,
            slot: Arc::new(RwLock::new(Slot::default())),
        }
    }

    /// Returns the cached answer, or runs `fetch` once for every caller that arrives while it runs.
    ///
    /// The fetch runs in its own task so that a caller who disconnects does not cancel it for the
    /// others waiting on the same result. Only 2xx answers are stored; others are shared with
    /// the callers already waiting and then forgotten.
    pub async fn get_or_fetch<F, Fut>(&self, fetch: F) -> (FetchResult, CacheStatus)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = FetchResult> + Send + 'static,
    {
        if let Some(fresh) = self.fresh_entry(&self.slot.read()) {
            return (Ok(fresh), CacheStatus::Hit);
        }
        let flight = {
            let mut slot = self.slot.write();
            if let Some(fresh) = self.fresh_entry(&slot) {
                return (Ok(fresh), CacheStatus::Hit);
            }
            match &slot.in_flight {
                Some(flight) => flight.clone(),
                None => {
                    let flight = self.start_flight(slot.generation, fetch());
                    slot.in_flight = Some(flight.clone());
                    flight
                }
            }
        };
        (flight.await, CacheStatus::Miss)
    }

    /// Forgets the cached answer; the next request fetches a new one.
    pub fn clear(&self) {
        let mut slot = self.slot.write();
        slot.entry = None;
        slot.in_flight = None;
        slot.generation += 1;
    }

    fn fresh_entry(&self, slot: &Slot) -> Option<Arc<CachedResponse>> {
        match &slot.entry {
            Some((response, stored)) if stored.elapsed() < self.ttl => Some(response.clone()),
            _ => None,
        }
    }

    fn start_flight(
        &self,
        generation: u64,
        fetch: impl Future<Output = FetchResult> + Send + 'static,
    ) -> Flight {
        let slot = self.slot.clone();
        let task = tokio::spawn(async move {
            let result = fetch.await;
            let mut slot = slot.write();
            if slot.generation == generation {
                slot.in_flight = None;
                if let Ok(response) = &result
                    && response.status.is_success()
                {
                    slot.entry = Some((response.clone(), Instant::now()));
                }
            }
            result
        });
        async move {
            task.await.unwrap_or_else(|join_error| {
                log::error!("models fetch task failed: {join_error}");
                Err(ProxyError::BadGateway)
            })
        }
        .boxed()
        .shared()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn answer(status: u16, body: &'static str) -> FetchResult {
        Ok(Arc::new(CachedResponse {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::from_static(body.as_bytes()),
        }))
    }

    #[tokio::test]
    async fn concurrent_cold_misses_share_one_fetch() {
        let cache = ModelsCache::new(Duration::from_secs(60));
        let fetches = Arc::new(AtomicUsize::new(0));
        let lookups = (0..50).map(|_| {
            let cache = cache.clone();
            let fetches = fetches.clone();
            tokio::spawn(async move {
                cache
                    .get_or_fetch(|| async move {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        answer(200, "models")
                    })
                    .await
            })
        });
        for lookup in futures::future::join_all(lookups).await {
            let (result, _) = lookup.unwrap();
            assert_eq!(result.unwrap().body, "models");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        let (_, status) = cache.get_or_fetch(|| async { answer(200, "new") }).await;
        assert_eq!(status, CacheStatus::Hit);
    }

    #[tokio::test]
    async fn errors_are_not_cached_and_clear_forgets() {
        let cache = ModelsCache::new(Duration::from_secs(60));
        let (result, status) = cache.get_or_fetch(|| async { answer(500, "boom") }).await;
        assert_eq!(result.unwrap().status, 500);
        assert_eq!(status, CacheStatus::Miss);
        let (result, status) = cache.get_or_fetch(|| async { answer(200, "ok") }).await;
        assert_eq!(
            (result.unwrap().body.as_ref(), status),
            (&b"ok"[..], CacheStatus::Miss)
        );
        cache.clear();
        let (result, status) = cache.get_or_fetch(|| async { answer(200, "again") }).await;
        assert_eq!(
            (result.unwrap().body.as_ref(), status),
            (&b"again"[..], CacheStatus::Miss)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_the_ttl() {
        let cache = ModelsCache::new(Duration::from_secs(24 * 60 * 60));
        cache
            .get_or_fetch(|| async { answer(200, "old") })
            .await
            .0
            .unwrap();
        tokio::time::advance(Duration::from_secs(24 * 60 * 60 - 1)).await;
        let (result, status) = cache.get_or_fetch(|| async { answer(200, "new") }).await;
        assert_eq!(
            (result.unwrap().body.as_ref(), status),
            (&b"old"[..], CacheStatus::Hit),
            "a second before the TTL the entry is still fresh"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        let (result, status) = cache.get_or_fetch(|| async { answer(200, "new") }).await;
        assert_eq!(
            (result.unwrap().body.as_ref(), status),
            (&b"new"[..], CacheStatus::Miss)
        );
    }
}
