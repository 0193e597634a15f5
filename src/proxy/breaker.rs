//! STUB (replaced by the health branch).
use tokio::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

#[derive(Default)]
pub struct Breaker;

pub struct Pass;

pub struct Opened {
    pub until: Instant,
    pub reopenings: u32,
}

impl Breaker {
    pub fn new() -> Breaker {
        Breaker
    }
    pub fn admit(&self) -> Option<Pass> {
        Some(Pass)
    }
    pub fn force(&self) -> Pass {
        Pass
    }
    pub fn state(&self) -> BreakerState {
        BreakerState::Closed
    }
    pub fn closes_at(&self) -> Option<Instant> {
        None
    }
    pub fn open_until(&self, _until: Instant, _reopenings: u32) {}
}

impl Pass {
    pub fn succeeded(self) {}
    pub fn failed(self) -> Option<Opened> {
        None
    }
}
