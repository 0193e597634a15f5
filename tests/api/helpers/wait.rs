//! Waiting for what a test cannot be told about directly: a counter of the mock, a metric, a
//! file, a client's usage in Redis.

use std::time::Duration;

/// How long a wait goes on after the awaited thing happened, at the most: short, so that a
/// test never waits much longer than the event itself.
const INTERVAL: Duration = Duration::from_millis(10);

/// What a condition answers: whether the wait is over, and what the test wanted to know.
pub trait Outcome {
    fn is_done(&self) -> bool;
}

impl Outcome for bool {
    fn is_done(&self) -> bool {
        *self
    }
}

impl<T> Outcome for Option<T> {
    fn is_done(&self) -> bool {
        self.is_some()
    }
}

/// Asks `condition` until it answers `true` (or `Some`) or `limit` has passed, and returns its
/// last answer for the test to assert on: the caller says what it waited for, in its assert.
pub async fn eventually<O: Outcome>(limit: Duration, mut condition: impl AsyncFnMut() -> O) -> O {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let answer = condition().await;
        if answer.is_done() || tokio::time::Instant::now() >= deadline {
            return answer;
        }
        tokio::time::sleep(INTERVAL).await;
    }
}
