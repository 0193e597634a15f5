//! One upstream's circuit breaker: after the upstream has failed enough, requests stop going to
//! it for a while, then one probe request finds out whether it is back.
//!
//! - Closed: every request goes. It opens after [`CONSECUTIVE_FAILURES`] failures in a row, or
//!   when at least [`WINDOW_MINIMUM`] outcomes fell in the last [`WINDOW`] and at least half of
//!   them failed (checked on each failure).
//! - Open: no request goes, for [`FIRST_OPENING`], doubled on each re-opening up to
//!   [`LONGEST_OPENING`].
//! - Half-open: once the open period is over, one request at a time goes as the probe. Its
//!   success closes the breaker and forgets the episode (the doubling and the counted
//!   outcomes); its failure opens it again for twice as long.
//!
//! What is a failure is the caller's decision (only what the upstream did: a connect failure,
//! no head in time, a `failover_on` status); the breaker only counts. An outcome changes the
//! counts only while the breaker is closed: while it is open or half-open only the probe decides,
//! so the requests still out from before the opening, or sent in panic mode ([`Breaker::force`]),
//! cannot re-open it or extend it. A request whose client left reports nothing
//! (the [`Pass`] is dropped), which is never the upstream's failure.
//!
//! Time is tokio's clock, so that tests with paused time can step over an open period.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// Failures in a row that open a closed breaker.
pub const CONSECUTIVE_FAILURES: u32 = 5;
/// How far back the failure rate looks.
pub const WINDOW: Duration = Duration::from_secs(30);
/// Outcomes the window needs before its failure rate can open the breaker: a few failures of a
/// quiet upstream are left to the consecutive rule.
pub const WINDOW_MINIMUM: u32 = 20;
/// The first open period of an episode.
pub const FIRST_OPENING: Duration = Duration::from_secs(10);
/// The cap of the doubling open period.
pub const LONGEST_OPENING: Duration = Duration::from_secs(300);

/// Seconds in the window: one bucket each.
const BUCKETS: usize = WINDOW.as_secs() as usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

/// An opening this breaker decided, for the other replicas to apply with
/// [`Breaker::open_until`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    pub until: Instant,
    /// Re-openings of this episode before this one (0 for the first opening); the next failed
    /// probe opens for twice as long.
    pub reopenings: u32,
}

/// One upstream's breaker. The state is behind a blocking mutex: every operation is a few
/// comparisons, none is held across an `.await`, and a [`Pass`] holds its own handle so it can
/// report after the request wherever it ends.
#[derive(Debug, Default)]
pub struct Breaker {
    state: Arc<Mutex<State>>,
}

impl Breaker {
    pub fn new() -> Breaker {
        Breaker::default()
    }

    /// Whether a request may be sent now: closed, or half-open with no probe out (then the
    /// returned pass is the probe). `None`: open, or half-open with its probe out.
    pub fn admit(&self) -> Option<Pass> {
        let now = Instant::now();
        let mut state = self.state.lock();
        state.turn_half_open(now);
        let kind = match state.phase {
            Phase::Closed => Kind::Ordinary,
            Phase::Open { .. } | Phase::HalfOpen { probe: Some(_) } => return None,
            Phase::HalfOpen { probe: None } => {
                let probe = state.probes.wrapping_add(1);
                state.probes = probe;
                state.phase = Phase::HalfOpen { probe: Some(probe) };
                Kind::Probe(probe)
            }
        };
        drop(state);
        Some(self.pass(kind))
    }

    /// Panic mode: a pass even though the breaker is open. It is never the probe: it neither
    /// takes the half-open slot nor closes the breaker. Its outcome counts as an ordinary
    /// request's does, that is only if the breaker is closed when it reports.
    pub fn force(&self) -> Pass {
        self.pass(Kind::Ordinary)
    }

    pub fn state(&self) -> BreakerState {
        let now = Instant::now();
        match self.state.lock().phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { until } if until > now => BreakerState::Open,
            Phase::Open { .. } | Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// When an open breaker turns half-open; `None` when it is not open.
    pub fn closes_at(&self) -> Option<Instant> {
        let now = Instant::now();
        match self.state.lock().phase {
            Phase::Open { until } if until > now => Some(until),
            _ => None,
        }
    }

    /// An opening learnt from another replica: open until `until`, unless this breaker is
    /// already open longer. The episode's re-openings become the larger of both, so the next
    /// failed probe here doubles from where the other replica stands. A probe out here when the
    /// opening arrives no longer decides anything. An end already past is ignored.
    pub fn open_until(&self, until: Instant, reopenings: u32) {
        let now = Instant::now();
        if until <= now {
            return;
        }
        let mut state = self.state.lock();
        if let Phase::Open { until: current } = state.phase
            && current >= until
        {
            return;
        }
        state.phase = Phase::Open { until };
        state.reopenings = state.reopenings.max(reopenings);
    }

    fn pass(&self, kind: Kind) -> Pass {
        Pass {
            state: Some(self.state.clone()),
            kind,
        }
    }
}

/// Leave to send one request upstream; report how it went with [`Pass::succeeded`] or
/// [`Pass::failed`]. Dropped without either (the client left): counts as nothing, and a probe
/// pass frees the half-open slot for the next request.
#[derive(Debug)]
pub struct Pass {
    /// `None` once the outcome is reported.
    state: Option<Arc<Mutex<State>>>,
    kind: Kind,
}

impl Pass {
    pub fn succeeded(mut self) {
        self.report(Some(Outcome::Success));
    }

    /// `Some` when this failure opened the breaker (to publish to the other replicas).
    #[must_use = "an opening is to be published to the other replicas"]
    pub fn failed(mut self) -> Option<Opened> {
        self.report(Some(Outcome::Failure))
    }

    fn report(&mut self, outcome: Option<Outcome>) -> Option<Opened> {
        let state = self.state.take()?;
        let now = Instant::now();
        let mut state = state.lock();
        match self.kind {
            Kind::Probe(probe) => {
                // A probe whose slot was taken back (an opening learnt from another replica)
                // decides nothing.
                if state.phase != (Phase::HalfOpen { probe: Some(probe) }) {
                    return None;
                }
                match outcome {
                    None => {
                        state.phase = Phase::HalfOpen { probe: None };
                        None
                    }
                    Some(Outcome::Success) => {
                        state.close();
                        None
                    }
                    Some(Outcome::Failure) => {
                        state.reopenings = state.reopenings.saturating_add(1);
                        Some(state.open(now))
                    }
                }
            }
            Kind::Ordinary => {
                let (Phase::Closed, Some(outcome)) = (state.phase, outcome) else {
                    return None;
                };
                state.window.record(now, outcome == Outcome::Failure);
                if outcome == Outcome::Success {
                    state.consecutive = 0;
                    return None;
                }
                state.consecutive += 1;
                let (total, failed) = state.window.counts(now);
                let too_many = state.consecutive >= CONSECUTIVE_FAILURES
                    || (total >= WINDOW_MINIMUM && failed * 2 >= total);
                too_many.then(|| state.open(now))
            }
        }
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        self.report(None);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Sent while closed, or forced in panic mode.
    Ordinary,
    /// The half-open breaker's probe, by its number.
    Probe(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Success,
    Failure,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Closed,
    /// Turns half-open at `until` (on the next look at it).
    Open {
        until: Instant,
    },
    /// The number of the probe out, if one is.
    HalfOpen {
        probe: Option<u64>,
    },
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// Re-openings in this episode; reset when a probe closes the breaker.
    reopenings: u32,
    /// Failures in a row while closed.
    consecutive: u32,
    window: Window,
    /// Probes handed out, so that a late report of an old probe is told from the current one.
    probes: u64,
}

impl Default for State {
    fn default() -> State {
        State {
            phase: Phase::Closed,
            reopenings: 0,
            consecutive: 0,
            window: Window::new(Instant::now()),
            probes: 0,
        }
    }
}

impl State {
    fn turn_half_open(&mut self, now: Instant) {
        if let Phase::Open { until } = self.phase
            && until <= now
        {
            self.phase = Phase::HalfOpen { probe: None };
        }
    }

    /// Opens for this episode's period, from `now`.
    fn open(&mut self, now: Instant) -> Opened {
        let until = now + opening(self.reopenings);
        self.phase = Phase::Open { until };
        Opened {
            until,
            reopenings: self.reopenings,
        }
    }

    fn close(&mut self) {
        self.phase = Phase::Closed;
        self.reopenings = 0;
        self.consecutive = 0;
        self.window.clear();
    }
}

/// The open period after `reopenings` re-openings: 10 s doubled each time, at most 5 min.
fn opening(reopenings: u32) -> Duration {
    // 2^5 periods of 10 s are past the cap already; the shift never overflows.
    let doublings = reopenings.min(5);
    FIRST_OPENING
        .saturating_mul(1 << doublings)
        .min(LONGEST_OPENING)
}

/// Outcomes of the last [`WINDOW`], counted per second in a ring: bounded whatever the rate of
/// requests.
#[derive(Debug)]
struct Window {
    /// Seconds are counted from here.
    start: Instant,
    buckets: [Bucket; BUCKETS],
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// The second (since `start`) these counts belong to; a bucket of an older second is stale.
    second: u64,
    total: u32,
    failed: u32,
}

impl Window {
    fn new(start: Instant) -> Window {
        Window {
            start,
            buckets: [Bucket::default(); BUCKETS],
        }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_secs()
    }

    fn record(&mut self, now: Instant, failed: bool) {
        let second = self.second(now);
        let bucket = &mut self.buckets[(second % BUCKETS as u64) as usize];
        if bucket.second != second {
            *bucket = Bucket {
                second,
                ..Bucket::default()
            };
        }
        bucket.total = bucket.total.saturating_add(1);
        bucket.failed = bucket.failed.saturating_add(u32::from(failed));
    }

    /// Outcomes and failures within the window: this second and the 29 before it.
    fn counts(&self, now: Instant) -> (u32, u32) {
        let second = self.second(now);
        self.buckets
            .iter()
            .filter(|bucket| {
                second
                    .checked_sub(bucket.second)
                    .is_some_and(|age| age < BUCKETS as u64)
            })
            .fold((0, 0), |(total, failed), bucket| {
                (
                    total.saturating_add(bucket.total),
                    failed.saturating_add(bucket.failed),
                )
            })
    }

    fn clear(&mut self) {
        self.buckets = [Bucket::default(); BUCKETS];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    fn fail(breaker: &Breaker) -> Option<Opened> {
        breaker.admit().expect("a closed breaker admits").failed()
    }

    fn succeed(breaker: &Breaker) {
        breaker
            .admit()
            .expect("a closed breaker admits")
            .succeeded();
    }

    /// Reports a run of outcomes, `F` a failure and `S` a success; none may open the breaker.
    fn outcomes(breaker: &Breaker, run: &str) {
        for outcome in run.chars() {
            match outcome {
                'F' => assert_eq!(fail(breaker), None, "opened within {run}"),
                'S' => succeed(breaker),
                _ => unreachable!(),
            }
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    /// Opens a new breaker with five failures.
    fn opened() -> Breaker {
        let breaker = Breaker::new();
        outcomes(&breaker, "FFFF");
        assert!(fail(&breaker).is_some());
        breaker
    }

    /// Waits out the open period and fails the probe, returning the re-opening.
    async fn probe_fails(breaker: &Breaker) -> Opened {
        advance(breaker.closes_at().unwrap() - Instant::now()).await;
        let probe = breaker.admit().expect("a half-open breaker sends a probe");
        probe.failed().expect("a failed probe re-opens")
    }

    #[tokio::test(start_paused = true)]
    async fn five_failures_in_a_row_open_it_for_ten_seconds() {
        let breaker = Breaker::new();
        outcomes(&breaker, "FFFF");
        let now = Instant::now();
        assert_eq!(
            fail(&breaker),
            Some(Opened {
                until: now + Duration::from_secs(10),
                reopenings: 0
            })
        );
        assert_eq!(breaker.state(), BreakerState::Open);
        assert_eq!(breaker.closes_at(), Some(now + Duration::from_secs(10)));
        assert!(breaker.admit().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_ends_the_run_of_failures() {
        let breaker = Breaker::new();
        outcomes(&breaker, "FFFFSFFFF");
        assert!(fail(&breaker).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_pass_is_neither_a_failure_nor_a_success() {
        let breaker = Breaker::new();
        outcomes(&breaker, "FFFF");
        for _ in 0..10 {
            drop(breaker.admit().unwrap());
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        // Had the drops counted as successes, this would be the first failure of a new run.
        assert!(fail(&breaker).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn half_of_twenty_outcomes_in_the_window_failing_open_it() {
        let breaker = Breaker::new();
        // Never more than three failures in a row: only the failure rate can open it.
        outcomes(&breaker, "SSSFSFSFSFSFSFSFSF"); // 18 outcomes, 8 failed
        outcomes(&breaker, "SF"); // 20, 9 failed: under half
        outcomes(&breaker, "F"); // 21, 10 failed: under half
        let opened = fail(&breaker).expect("22 outcomes, 11 failed: half");
        assert_eq!(opened.until, Instant::now() + FIRST_OPENING);
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn the_failure_rate_counts_only_with_twenty_outcomes() {
        let breaker = Breaker::new();
        // 19 outcomes, 15 failed, never five in a row.
        outcomes(&breaker, "SFFFFSFFFFSFFFFSFFF");
        // The twentieth, still only the fourth failure in a row, opens it.
        assert!(fail(&breaker).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_older_than_thirty_seconds_leave_the_window() {
        let (kept, expired) = (Breaker::new(), Breaker::new());
        for breaker in [&kept, &expired] {
            outcomes(breaker, "FSFSFSFSFSFSFSFSFSF"); // 19 outcomes, 10 failed
        }
        advance(Duration::from_millis(29_999)).await;
        assert!(fail(&kept).is_some(), "20 outcomes within 30 s, 11 failed");
        advance(Duration::from_millis(1)).await;
        // The same failure 30 s after the others: alone in the window.
        assert_eq!(fail(&expired), None);
        assert_eq!(expired.state(), BreakerState::Closed);
        outcomes(&expired, "SFSFSFSFSFSFSFSFSF"); // 19 in the window, 10 failed
        assert!(fail(&expired).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_slides_second_by_second() {
        let breaker = Breaker::new();
        outcomes(&breaker, "FSFSFSFSFS"); // 10 outcomes at 0 s, 5 failed
        advance(Duration::from_secs(15)).await;
        outcomes(&breaker, "FSFSFSFSF"); // 9 more at 15 s, 5 failed
        advance(Duration::from_secs(15)).await;
        // At 30 s the first ten have left: 10 outcomes, not 20.
        outcomes(&breaker, "F");
        outcomes(&breaker, "SFSFSFSF"); // 18 within the window, 10 failed
        outcomes(&breaker, "S"); // 19
        assert!(fail(&breaker).is_some(), "20 outcomes, 11 failed");
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_open_period_it_is_half_open_with_one_probe_at_a_time() {
        let breaker = opened();
        advance(Duration::from_millis(9_999)).await;
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(breaker.admit().is_none());
        advance(Duration::from_millis(1)).await;
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert_eq!(breaker.closes_at(), None);
        let probe = breaker.admit().expect("the probe");
        assert!(breaker.admit().is_none(), "a second probe while one is out");
        assert!(breaker.admit().is_none());
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        probe.succeeded();
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(breaker.admit().is_some());
        assert!(breaker.admit().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_frees_the_slot_for_the_next_request() {
        let breaker = opened();
        advance(FIRST_OPENING).await;
        let probe = breaker.admit().unwrap();
        assert!(breaker.admit().is_none());
        drop(probe);
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        let probe = breaker.admit().expect("the next probe");
        assert!(breaker.admit().is_none());
        assert!(probe.failed().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_twice_as_long_up_to_five_minutes() {
        let breaker = opened();
        for (reopenings, seconds) in [(1, 20), (2, 40), (3, 80), (4, 160), (5, 300), (6, 300)] {
            let reopened = probe_fails(&breaker).await;
            let until = Instant::now() + Duration::from_secs(seconds);
            assert_eq!(reopened, Opened { until, reopenings });
            assert_eq!(breaker.state(), BreakerState::Open);
            assert_eq!(breaker.closes_at(), Some(until));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_successful_probe_forgets_the_doubling() {
        let breaker = opened();
        probe_fails(&breaker).await;
        probe_fails(&breaker).await;
        advance(breaker.closes_at().unwrap() - Instant::now()).await;
        breaker.admit().unwrap().succeeded();
        outcomes(&breaker, "FFFF");
        assert_eq!(
            fail(&breaker),
            Some(Opened {
                until: Instant::now() + FIRST_OPENING,
                reopenings: 0
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_successful_probe_forgets_the_window_and_the_run_of_failures() {
        let breaker = Breaker::new();
        outcomes(&breaker, "SSSFSFSFSFSFSFSFSFSFF");
        assert!(fail(&breaker).is_some(), "22 outcomes, 11 failed");
        advance(FIRST_OPENING).await;
        breaker.admit().unwrap().succeeded();
        // Within 30 s of the others, one failure would make 12 of 23 in a window not cleared.
        outcomes(&breaker, "F");
        // Three before the close and four after would be seven in a row.
        outcomes(&breaker, "FFF");
        assert!(
            fail(&breaker).is_some(),
            "the fifth failure since the close"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn requests_from_before_the_opening_change_nothing_while_it_is_open() {
        let breaker = Breaker::new();
        let late: Vec<Pass> = (0..4).map(|_| breaker.admit().unwrap()).collect();
        outcomes(&breaker, "FFFF");
        let until = fail(&breaker).unwrap().until;
        let mut late = late.into_iter();
        assert_eq!(late.next().unwrap().failed(), None);
        late.next().unwrap().succeeded();
        assert_eq!(breaker.state(), BreakerState::Open);
        assert_eq!(breaker.closes_at(), Some(until));
        advance(FIRST_OPENING).await;
        let probe = breaker.admit().unwrap();
        // Half-open: only the probe decides.
        assert_eq!(late.next().unwrap().failed(), None);
        late.next().unwrap().succeeded();
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(breaker.admit().is_none());
        assert!(probe.failed().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_forced_pass_goes_while_open_and_is_never_the_probe() {
        let breaker = opened();
        let until = breaker.closes_at().unwrap();
        let forced = breaker.force();
        assert_eq!(forced.failed(), None);
        breaker.force().succeeded();
        assert_eq!(
            breaker.closes_at(),
            Some(until),
            "neither extended nor closed"
        );

        advance(FIRST_OPENING).await;
        let forced = breaker.force();
        // The half-open slot is still free for the probe.
        let probe = breaker.admit().expect("the probe");
        let second = breaker.force();
        assert!(breaker.admit().is_none());
        forced.succeeded();
        assert_eq!(
            breaker.state(),
            BreakerState::HalfOpen,
            "only the probe closes"
        );
        drop(second);
        assert!(
            breaker.admit().is_none(),
            "a dropped forced pass frees no slot"
        );
        probe.succeeded();
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_forced_pass_that_reports_once_closed_counts() {
        let breaker = opened();
        let forced = breaker.force();
        advance(FIRST_OPENING).await;
        breaker.admit().unwrap().succeeded();
        outcomes(&breaker, "FFFF");
        assert!(forced.failed().is_some(), "the fifth failure in a row");
    }

    #[tokio::test(start_paused = true)]
    async fn an_opening_from_another_replica_is_applied_and_the_later_end_kept() {
        let breaker = Breaker::new();
        let now = Instant::now();
        breaker.open_until(now + Duration::from_secs(40), 2);
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(breaker.admit().is_none());
        assert_eq!(breaker.closes_at(), Some(now + Duration::from_secs(40)));
        breaker.open_until(now + Duration::from_secs(20), 1);
        assert_eq!(breaker.closes_at(), Some(now + Duration::from_secs(40)));
        breaker.open_until(now + Duration::from_secs(50), 1);
        assert_eq!(breaker.closes_at(), Some(now + Duration::from_secs(50)));
        // The doubling goes on from the larger count: the third re-opening, 80 s.
        let reopened = probe_fails(&breaker).await;
        assert_eq!(
            reopened,
            Opened {
                until: Instant::now() + Duration::from_secs(80),
                reopenings: 3
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_opening_that_already_ended_is_ignored() {
        let breaker = Breaker::new();
        let now = Instant::now();
        advance(Duration::from_secs(1)).await;
        breaker.open_until(now, 0);
        breaker.open_until(Instant::now(), 0);
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(breaker.admit().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn an_opening_from_another_replica_overrules_the_probe_out() {
        let breaker = opened();
        advance(FIRST_OPENING).await;
        let probe = breaker.admit().unwrap();
        let until = Instant::now() + Duration::from_secs(20);
        breaker.open_until(until, 1);
        probe.succeeded();
        assert_eq!(breaker.state(), BreakerState::Open);
        assert_eq!(breaker.closes_at(), Some(until));

        // The old probe reporting into the next half-open period takes nobody's slot.
        advance(Duration::from_secs(20)).await;
        let stale = {
            let probe = breaker.admit().unwrap();
            breaker.open_until(Instant::now() + Duration::from_secs(1), 1);
            probe
        };
        advance(Duration::from_secs(1)).await;
        let probe = breaker.admit().expect("the new period's probe");
        drop(stale);
        assert!(breaker.admit().is_none(), "the new probe is still out");
        probe.succeeded();
        assert_eq!(breaker.state(), BreakerState::Closed);
    }
}
