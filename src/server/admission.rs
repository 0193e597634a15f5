//! Which requests get in: `CONNECT` never, operator probes always, everything else while fewer
//! than `MAX_CONCURRENT_REQUESTS` are in flight. Refusals are answered at once, never queued.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use warp::http::Method;

use crate::error::ProxyError;
use crate::vocab::Route;

/// Cloning is shallow: clones share one count.
#[derive(Clone)]
pub struct Admission {
    in_flight: Arc<Semaphore>,
}

/// A place in `MAX_CONCURRENT_REQUESTS`, held until the response's last byte went out; `None`
/// for requests that do not count.
pub type Place = Option<OwnedSemaphorePermit>;

impl Admission {
    pub fn new(max_concurrent_requests: usize) -> Admission {
        Admission {
            in_flight: Arc::new(Semaphore::new(max_concurrent_requests)),
        }
    }

    pub fn admit(&self, method: &Method, route: Route) -> Result<Place, ProxyError> {
        if method == Method::CONNECT {
            return Err(ProxyError::ConnectNotSupported);
        }
        if route.bypasses_admission() {
            return Ok(None);
        }
        match self.in_flight.clone().try_acquire_owned() {
            Ok(place) => Ok(Some(place)),
            Err(_) => Err(ProxyError::Overloaded),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_are_admitted_when_the_proxy_is_full_and_connect_never() {
        let admission = Admission::new(1);
        let held = admission.admit(&Method::POST, Route::Chat).unwrap();
        assert!(held.is_some());
        assert_eq!(
            admission.admit(&Method::GET, Route::Models).unwrap_err(),
            ProxyError::Overloaded
        );
        assert!(
            admission
                .admit(&Method::GET, Route::Healthz)
                .unwrap()
                .is_none()
        );
        assert_eq!(
            admission.admit(&Method::CONNECT, Route::Other).unwrap_err(),
            ProxyError::ConnectNotSupported
        );
        drop(held);
        assert!(
            admission
                .admit(&Method::GET, Route::Models)
                .unwrap()
                .is_some()
        );
    }
}
