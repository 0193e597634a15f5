//! The in-process limiter: GCRA for the per-minute limits, counters per UTC day for the token
//! and dollar budgets and per UTC calendar month for the dollar one, a count of requests in
//! flight, and a one-second ring for what `/admin/clients` shows.
//!
//! GCRA (the generic cell rate algorithm, as in redis-cell and Helicone) keeps one time per
//! limit, the "theoretical arrival time": each request (or token) pushes it on by 60 s / limit,
//! and a request is admitted while that time stays within a minute of now. So the sustained rate
//! is exactly the limit, a client idle for a minute may use its whole limit at once, and the time
//! a refused request would be admitted is exact: the TAT it would leave, less a minute.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use parking_lot::Mutex;
// tokio's clock, not std's: a test can pause and advance it instead of waiting out a minute.
// The UTC day of the budgets stays on the wall clock (`SystemTime`).
use tokio::time::Instant;

use super::limiter::{Budgets, Charge, ClientUsage, Limiter, Reason, Refusal, Standing, Window};
use crate::config::ClientLimits;
pub use crate::vocab::calendar::utc_day;
use crate::vocab::calendar::{month_of, until_next_day, until_next_month};
use crate::vocab::price::Nanos;

pub const WINDOW: Duration = Duration::from_secs(60);
/// A concurrency refusal has no time in the limiter's state: a place frees when some running
/// request ends, which nothing can predict. One second is the shortest `Retry-After`.
const CONCURRENCY_RETRY: Duration = Duration::from_secs(1);

/// Cloning is shallow.
#[derive(Clone, Default)]
pub struct MemoryLimiter(Arc<Inner>);

#[derive(Default)]
struct Inner {
    // A synchronous lock: held for a few arithmetic steps, never across an `.await`.
    clients: Mutex<HashMap<Arc<str>, ClientState>>,
    budget_generation: AtomicU64,
}

#[derive(Default)]
struct ClientState {
    request_tat: Option<Instant>,
    token_tat: Option<Instant>,
    in_flight: u64,
    day: u64,
    tokens_today: u64,
    /// Nano-dollars of `day`, and of the month `day` is in.
    usd_today: Nanos,
    usd_month: Nanos,
    recent: Recent,
}

/// Requests and tokens per second over the last minute (tokens may be corrected downwards when a
/// request settles below its estimate, hence signed).
struct Recent {
    slots: [(u64, u64, i64); 60],
}

impl Default for Recent {
    fn default() -> Self {
        Recent {
            slots: [(0, 0, 0); 60],
        }
    }
}

impl Recent {
    fn add(&mut self, second: u64, requests: u64, tokens: i64) {
        let slot = &mut self.slots[(second % 60) as usize];
        if slot.0 != second {
            *slot = (second, 0, 0);
        }
        slot.1 += requests;
        slot.2 += tokens;
    }

    fn last_minute(&self, second: u64) -> (u64, u64) {
        let live = self
            .slots
            .iter()
            .filter(|(at, _, _)| *at + 60 > second && *at <= second);
        let (requests, tokens) = live.fold((0u64, 0i64), |(r, t), (_, requests, tokens)| {
            (r + requests, t + tokens)
        });
        (requests, tokens.max(0) as u64)
    }
}

/// Time per unit of a per-minute limit.
fn period(limit: u64) -> Duration {
    WINDOW / u32::try_from(limit.max(1)).unwrap_or(u32::MAX)
}

/// Capped at a day: a request claiming an absurd `max_tokens`, or an upstream reporting absurd
/// usage, must not push a client's window (and its `Retry-After`) out by centuries.
fn times(period: Duration, count: u64) -> Duration {
    const CAP: Duration = Duration::from_secs(24 * 60 * 60);
    let nanos = period.as_nanos().saturating_mul(u128::from(count));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)).min(CAP)
}

/// Token counts into the signed per-second ring, without wrapping.
fn signed(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// The GCRA decision for `cost` units: the new TAT, or how long until it would be admitted.
/// A cost above the whole limit is admitted only when nothing is counted (an empty bucket), so a
/// single large request is never refused forever. The policy refuses a request above the
/// client's own limit before any limiter is asked (413), so the cost that reaches this is above
/// a replica's share of the limit while Redis is down.
fn gcra(tat: Option<Instant>, now: Instant, limit: u64, cost: u64) -> Result<Instant, Duration> {
    let period = period(limit);
    let base = tat.map_or(now, |tat| tat.max(now));
    let new_tat = base + times(period, cost);
    if new_tat <= now + WINDOW || (cost > limit && base == now) {
        Ok(new_tat)
    } else if cost > limit {
        Err(base - now)
    } else {
        Err(new_tat - (now + WINDOW))
    }
}

fn window(tat: Option<Instant>, now: Instant, limit: u64) -> Window {
    let used = tat.map_or(Duration::ZERO, |tat| tat.saturating_duration_since(now));
    let free = WINDOW.saturating_sub(used);
    Window {
        limit,
        remaining: (free.as_nanos() / period(limit).as_nanos()) as u64,
        reset: used,
    }
}

impl ClientState {
    fn standing(&self, limits: &ClientLimits, now: Instant) -> Standing {
        Standing {
            requests: limits
                .requests_per_minute
                .map(|limit| window(self.request_tat, now, limit)),
            tokens: limits
                .tokens_per_minute
                .map(|limit| window(self.token_tat, now, limit)),
        }
    }

    /// A new day empties the day's counts; a new month the month's too.
    fn roll_day(&mut self, today: u64) {
        if self.day != today {
            if month_of(self.day) != month_of(today) {
                self.usd_month = 0;
            }
            self.day = today;
            self.tokens_today = 0;
            self.usd_today = 0;
        }
    }
}

/// What one request asks of the limits: tokens and nano-dollars.
#[derive(Clone, Copy)]
struct Asked {
    estimate: u64,
    reservation: Nanos,
}

impl MemoryLimiter {
    pub fn new() -> MemoryLimiter {
        MemoryLimiter::default()
    }

    /// The counts of the day (and month) `wall` is in, for the state file.
    pub fn budgets_at(&self, wall: SystemTime) -> Budgets {
        let today = utc_day(wall);
        let clients = self.0.clients.lock();
        let mut budgets = Budgets {
            day: today,
            ..Budgets::default()
        };
        for (name, state) in clients.iter() {
            if state.day == today && state.tokens_today > 0 {
                budgets.tokens.push((name.to_string(), state.tokens_today));
            }
            if state.day == today && state.usd_today > 0 {
                budgets.usd_today.push((name.to_string(), state.usd_today));
            }
            if month_of(state.day) == month_of(today) && state.usd_month > 0 {
                budgets.usd_month.push((name.to_string(), state.usd_month));
            }
        }
        budgets.tokens.sort();
        budgets.usd_today.sort();
        budgets.usd_month.sort();
        budgets
    }

    /// Puts counts read back in place: the day's if `budgets.day` is today, the month's if it
    /// is in this month (a restart on the 2nd still knows what the 1st spent).
    pub fn restore_budgets_at(&self, budgets: Budgets, wall: SystemTime) {
        let today = utc_day(wall);
        let same_day = budgets.day == today;
        let same_month = month_of(budgets.day) == month_of(today);
        if !same_month {
            return;
        }
        let mut clients = self.0.clients.lock();
        fn state<'a>(
            clients: &'a mut HashMap<Arc<str>, ClientState>,
            name: &str,
            today: u64,
        ) -> &'a mut ClientState {
            let state = clients.entry(Arc::from(name)).or_default();
            state.roll_day(today);
            state
        }
        if same_day {
            for (name, tokens) in &budgets.tokens {
                state(&mut clients, name, today).tokens_today = *tokens;
            }
            for (name, nanos) in &budgets.usd_today {
                state(&mut clients, name, today).usd_today = *nanos;
            }
        }
        for (name, nanos) in &budgets.usd_month {
            state(&mut clients, name, today).usd_month = *nanos;
        }
        self.0.budget_generation.fetch_add(1, Ordering::Relaxed);
    }

    /// `acquire` at a given time, for tests.
    pub fn acquire_at(
        &self,
        client: &str,
        limits: &ClientLimits,
        estimate: u64,
        reservation: Nanos,
        now: Instant,
        wall: SystemTime,
    ) -> Result<(Charge, Standing), Refusal> {
        let mut clients = self.0.clients.lock();
        let asked = Asked {
            estimate,
            reservation,
        };
        // A lookup first: the key is allocated only for a client's first request.
        if let Some(state) = clients.get_mut(client) {
            return self.decide(state, limits, asked, now, wall);
        }
        let state = clients.entry(Arc::from(client)).or_default();
        self.decide(state, limits, asked, now, wall)
    }

    /// Every check of `acquire`, then every charge, on one client's state.
    fn decide(
        &self,
        state: &mut ClientState,
        limits: &ClientLimits,
        asked: Asked,
        now: Instant,
        wall: SystemTime,
    ) -> Result<(Charge, Standing), Refusal> {
        let Asked {
            estimate,
            reservation,
        } = asked;
        let today = utc_day(wall);
        state.roll_day(today);
        let refuse = |reason, retry_after, state: &ClientState| Refusal {
            reason,
            retry_after,
            standing: state.standing(limits, now),
        };
        // Every check is made, and a refusal names the longest wait of those that failed: a
        // `Retry-After` from the first failing check alone would send the client back too early.
        let mut refusals: Vec<(Reason, Duration)> = Vec::new();
        if limits
            .max_concurrent_requests
            .is_some_and(|max| state.in_flight >= max)
        {
            refusals.push((Reason::Concurrency, CONCURRENCY_RETRY));
        }
        let mut check = |limit: Option<u64>, tat: Option<Instant>, cost: u64, reason: Reason| {
            let decided = gcra(tat, now, limit?, cost);
            match decided {
                Ok(new_tat) => Some(new_tat),
                Err(wait) => {
                    refusals.push((reason, wait));
                    None
                }
            }
        };
        let request_tat = check(
            limits.requests_per_minute,
            state.request_tat,
            1,
            Reason::Requests,
        );
        let token_tat = check(
            limits.tokens_per_minute,
            state.token_tat,
            estimate,
            Reason::Tokens,
        );
        if let Some(budget) = limits.tokens_per_day
            && state.tokens_today.saturating_add(estimate) > budget
        {
            refusals.push((Reason::Budget, until_next_day(wall)));
        }
        // Spent and reserved so far, with this reservation, within each dollar budget.
        if let Some(budget) = limits.usd_per_day
            && state.usd_today.saturating_add(reservation) > budget
        {
            refusals.push((Reason::UsdPerDay, until_next_day(wall)));
        }
        if let Some(budget) = limits.usd_per_month
            && state.usd_month.saturating_add(reservation) > budget
        {
            refusals.push((Reason::UsdPerMonth, until_next_month(wall)));
        }
        if let Some((reason, retry_after)) = refusals.into_iter().max_by_key(|(_, wait)| *wait) {
            return Err(refuse(reason, retry_after, state));
        }
        // Every check passed: charge them all.
        if request_tat.is_some() {
            state.request_tat = request_tat;
        }
        if token_tat.is_some() {
            state.token_tat = token_tat;
        }
        state.in_flight += 1;
        state.tokens_today = state.tokens_today.saturating_add(estimate);
        state.usd_today = state.usd_today.saturating_add(reservation);
        state.usd_month = state.usd_month.saturating_add(reservation);
        state.recent.add(second(now), 1, signed(estimate));
        self.0.budget_generation.fetch_add(1, Ordering::Relaxed);
        Ok((
            Charge {
                tokens: estimate,
                nanos: reservation,
                day: today,
                slot: 0,
            },
            state.standing(limits, now),
        ))
    }

    /// `settle` at a given time, for tests: the two clocks are what makes it worth having.
    #[allow(clippy::too_many_arguments)]
    pub fn settle_at(
        &self,
        client: &str,
        limits: &ClientLimits,
        charge: Charge,
        used: u64,
        spent: Nanos,
        now: Instant,
        wall: SystemTime,
    ) {
        let mut clients = self.0.clients.lock();
        let Some(state) = clients.get_mut(client) else {
            return;
        };
        state.in_flight = state.in_flight.saturating_sub(1);
        let today = utc_day(wall);
        state.roll_day(today);
        let charged_today = if charge.day == today {
            charge.tokens
        } else {
            0
        };
        // The charge first: it is part of the count, so taking it out is exact, and only the
        // addition can saturate.
        state.tokens_today = state
            .tokens_today
            .saturating_sub(charged_today)
            .saturating_add(used);
        // The reservation comes out of the periods it went into, if they are still running; the
        // cost goes into the current ones.
        let reserved_today = if charge.day == today { charge.nanos } else { 0 };
        let reserved_this_month = if month_of(charge.day) == month_of(today) {
            charge.nanos
        } else {
            0
        };
        state.usd_today = state
            .usd_today
            .saturating_sub(reserved_today)
            .saturating_add(spent);
        state.usd_month = state
            .usd_month
            .saturating_sub(reserved_this_month)
            .saturating_add(spent);
        if let (Some(limit), Some(tat)) = (limits.tokens_per_minute, state.token_tat) {
            let period = period(limit);
            state.token_tat = Some(if used >= charge.tokens {
                tat + times(period, used - charge.tokens)
            } else {
                // A refund never moves the TAT before now: time already passed is not credit.
                tat.checked_sub(times(period, charge.tokens - used))
                    .map_or(now, |earlier| earlier.max(now))
            });
        }
        state.recent.add(
            second(now),
            0,
            signed(used).saturating_sub(signed(charge.tokens)),
        );
        self.0.budget_generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Carries a client's standing over from another limiter (the shared one, when Redis stops
    /// answering): its request and token windows move on to at least `requests` and `tokens`
    /// from now, and `in_flight` more requests count against its concurrency until each is
    /// settled here. A window is never moved back: what this limiter counted itself stays.
    pub fn seed(&self, client: &str, requests: Duration, tokens: Duration, in_flight: u64) {
        let now = Instant::now();
        let later = |tat: Option<Instant>, ahead: Duration| {
            if ahead.is_zero() {
                return tat;
            }
            let seeded = now + ahead;
            Some(tat.map_or(seeded, |tat| tat.max(seeded)))
        };
        let mut clients = self.0.clients.lock();
        let state = clients.entry(Arc::from(client)).or_default();
        state.request_tat = later(state.request_tat, requests);
        state.token_tat = later(state.token_tat, tokens);
        state.in_flight = state.in_flight.saturating_add(in_flight);
    }

    pub fn usage_at(&self, client: &str, now: Instant, wall: SystemTime) -> ClientUsage {
        let clients = self.0.clients.lock();
        let Some(state) = clients.get(client) else {
            return ClientUsage::default();
        };
        let (requests, tokens) = state.recent.last_minute(second(now));
        let today = utc_day(wall);
        ClientUsage {
            requests_last_minute: requests,
            tokens_last_minute: tokens,
            tokens_today: if state.day == today {
                state.tokens_today
            } else {
                0
            },
            in_flight: state.in_flight,
            usd_today: if state.day == today {
                state.usd_today
            } else {
                0
            },
            usd_this_month: if month_of(state.day) == month_of(today) {
                state.usd_month
            } else {
                0
            },
        }
    }
}

/// Whole seconds since the first time this process asked, for the one-second ring.
fn second(now: Instant) -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| now.checked_sub(WINDOW * 2).unwrap_or(now));
    now.saturating_duration_since(start).as_secs()
}

impl Limiter for MemoryLimiter {
    fn acquire<'a>(
        &'a self,
        client: &'a str,
        limits: &'a ClientLimits,
        estimate: u64,
        reservation: Nanos,
    ) -> BoxFuture<'a, Result<(Charge, Standing), Refusal>> {
        let decided = self.acquire_at(
            client,
            limits,
            estimate,
            reservation,
            Instant::now(),
            SystemTime::now(),
        );
        Box::pin(std::future::ready(decided))
    }

    fn settle(&self, client: &str, limits: &ClientLimits, charge: Charge, used: u64, spent: Nanos) {
        self.settle_at(
            client,
            limits,
            charge,
            used,
            spent,
            Instant::now(),
            SystemTime::now(),
        );
    }

    fn usage<'a>(&'a self, client: &'a str) -> BoxFuture<'a, ClientUsage> {
        let usage = self.usage_at(client, Instant::now(), SystemTime::now());
        Box::pin(std::future::ready(usage))
    }

    fn budgets(&self) -> Option<Budgets> {
        Some(self.budgets_at(SystemTime::now()))
    }

    fn restore_budgets(&self, budgets: Budgets) {
        self.restore_budgets_at(budgets, SystemTime::now());
    }

    fn budget_generation(&self) -> u64 {
        self.0.budget_generation.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rpm: Option<u64>, tpm: Option<u64>) -> ClientLimits {
        ClientLimits {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            ..ClientLimits::default()
        }
    }

    #[test]
    fn the_sixth_request_of_five_a_minute_waits_exactly_twelve_seconds() {
        let limiter = MemoryLimiter::new();
        let five = limits(Some(5), None);
        let (now, wall) = (Instant::now(), SystemTime::now());
        for remaining in (0..5).rev() {
            let (_, standing) = limiter.acquire_at("a", &five, 0, 0, now, wall).unwrap();
            assert_eq!(standing.requests.unwrap().remaining, remaining);
        }
        let refusal = limiter.acquire_at("a", &five, 0, 0, now, wall).unwrap_err();
        assert_eq!(refusal.reason, Reason::Requests);
        assert_eq!(refusal.retry_after, Duration::from_secs(12));
        let early = now + Duration::from_millis(11_999);
        assert!(limiter.acquire_at("a", &five, 0, 0, early, wall).is_err());
        let on_time = now + Duration::from_secs(12);
        assert!(limiter.acquire_at("a", &five, 0, 0, on_time, wall).is_ok());
    }

    #[test]
    fn with_several_limits_over_retry_after_is_the_longest_wait() {
        let limiter = MemoryLimiter::new();
        // Five requests a minute (12 s apart) and 1000 tokens a minute (60 ms per token).
        let both = limits(Some(5), Some(1000));
        let (now, wall) = (Instant::now(), SystemTime::now());
        for _ in 0..5 {
            limiter.acquire_at("a", &both, 200, 0, now, wall).unwrap();
        }
        // The sixth is over both: 12 s for a request, 500 tokens * 60 ms = 30 s for its tokens.
        let refusal = limiter
            .acquire_at("a", &both, 500, 0, now, wall)
            .unwrap_err();
        assert_eq!(refusal.reason, Reason::Tokens);
        assert_eq!(refusal.retry_after, Duration::from_secs(30));
        let told = now + refusal.retry_after;
        assert!(limiter.acquire_at("a", &both, 500, 0, told, wall).is_ok());
    }

    #[test]
    fn an_absurd_estimate_neither_wraps_nor_pushes_the_window_out_by_centuries() {
        let limiter = MemoryLimiter::new();
        let tokens = limits(None, Some(1000));
        let (now, wall) = (Instant::now(), SystemTime::now());
        let (charge, _) = limiter
            .acquire_at("a", &tokens, u64::MAX, 0, now, wall)
            .unwrap();
        let refusal = limiter
            .acquire_at("a", &tokens, 1, 0, now, wall)
            .unwrap_err();
        assert!(refusal.retry_after <= Duration::from_secs(24 * 60 * 60));
        limiter.settle_at("a", &tokens, charge, u64::MAX, 0, now, wall);
        assert_eq!(limiter.usage_at("a", now, wall).tokens_today, u64::MAX);
    }

    #[test]
    fn a_refusal_charges_nothing_and_settling_corrects_the_estimate() {
        let limiter = MemoryLimiter::new();
        let tokens = limits(Some(100), Some(1000));
        let (now, wall) = (Instant::now(), SystemTime::now());
        let (charge, _) = limiter.acquire_at("a", &tokens, 800, 0, now, wall).unwrap();
        let refusal = limiter
            .acquire_at("a", &tokens, 300, 0, now, wall)
            .unwrap_err();
        assert_eq!(refusal.reason, Reason::Tokens);
        // 100 tokens over: 100 * 60 ms until they are free.
        assert_eq!(refusal.retry_after, Duration::from_secs(6));
        assert_eq!(refusal.standing.requests.unwrap().remaining, 99);
        limiter.settle_at("a", &tokens, charge, 50, 0, now, wall);
        let (_, standing) = limiter.acquire_at("a", &tokens, 300, 0, now, wall).unwrap();
        assert_eq!(standing.tokens.unwrap().remaining, 650);
        let usage = limiter.usage_at("a", now, wall);
        assert_eq!(usage.tokens_today, 350);
        assert_eq!(usage.requests_last_minute, 2);
        assert_eq!(usage.tokens_last_minute, 350);
        assert_eq!(usage.in_flight, 1);
    }

    #[test]
    fn a_request_larger_than_the_limit_needs_an_empty_bucket() {
        let limiter = MemoryLimiter::new();
        let small = limits(None, Some(100));
        let (now, wall) = (Instant::now(), SystemTime::now());
        assert!(limiter.acquire_at("a", &small, 500, 0, now, wall).is_ok());
        let refusal = limiter
            .acquire_at("a", &small, 500, 0, now, wall)
            .unwrap_err();
        assert_eq!(refusal.retry_after, Duration::from_secs(300));
    }

    #[test]
    fn the_budget_renews_at_midnight_utc() {
        let limiter = MemoryLimiter::new();
        let budget = ClientLimits {
            tokens_per_day: Some(100),
            ..ClientLimits::default()
        };
        let now = Instant::now();
        let evening = humantime::parse_rfc3339("2026-12-01T23:59:00Z").unwrap();
        assert!(
            limiter
                .acquire_at("a", &budget, 100, 0, now, evening)
                .is_ok()
        );
        let refusal = limiter
            .acquire_at("a", &budget, 1, 0, now, evening)
            .unwrap_err();
        assert_eq!(refusal.reason, Reason::Budget);
        assert_eq!(refusal.retry_after, Duration::from_secs(60));
        let morning = evening + Duration::from_secs(60);
        assert!(limiter.acquire_at("a", &budget, 1, 0, now, morning).is_ok());
    }

    #[test]
    fn concurrency_counts_until_settled() {
        let limiter = MemoryLimiter::new();
        let one = ClientLimits {
            max_concurrent_requests: Some(1),
            ..ClientLimits::default()
        };
        let (now, wall) = (Instant::now(), SystemTime::now());
        let (charge, _) = limiter.acquire_at("a", &one, 0, 0, now, wall).unwrap();
        let refusal = limiter.acquire_at("a", &one, 0, 0, now, wall).unwrap_err();
        assert_eq!(refusal.reason, Reason::Concurrency);
        limiter.settle_at("a", &one, charge, 0, 0, now, wall);
        assert!(limiter.acquire_at("a", &one, 0, 0, now, wall).is_ok());
    }

    fn dollars(day: Option<Nanos>, month: Option<Nanos>) -> ClientLimits {
        ClientLimits {
            usd_per_day: day,
            usd_per_month: month,
            ..ClientLimits::default()
        }
    }

    fn at(text: &str) -> SystemTime {
        humantime::parse_rfc3339(text).unwrap()
    }

    #[test]
    fn a_reservation_fits_what_is_spent_and_reserved_or_waits_for_midnight() {
        let limiter = MemoryLimiter::new();
        let ten_cents = dollars(Some(100_000_000), None);
        let now = Instant::now();
        let noon = at("2026-12-07T12:00:00Z");
        let (first, _) = limiter
            .acquire_at("a", &ten_cents, 0, 60_000_000, now, noon)
            .unwrap();
        // In flight, the reservation counts: 60 + 50 is over 100.
        let refusal = limiter
            .acquire_at("a", &ten_cents, 0, 50_000_000, now, noon)
            .unwrap_err();
        assert_eq!(refusal.reason, Reason::UsdPerDay);
        assert_eq!(refusal.retry_after, Duration::from_secs(12 * 60 * 60));
        // Settled at its cost, the rest is free again; exactly the budget fits.
        limiter.settle_at("a", &ten_cents, first, 0, 20_000_000, now, noon);
        let (second, _) = limiter
            .acquire_at("a", &ten_cents, 0, 80_000_000, now, noon)
            .unwrap();
        assert!(
            limiter
                .acquire_at("a", &ten_cents, 0, 1, now, noon)
                .is_err()
        );
        let usage = limiter.usage_at("a", now, noon);
        assert_eq!(
            (usage.usd_today, usage.usd_this_month),
            (100_000_000, 100_000_000)
        );
        // A settlement above the reservation counts in full.
        limiter.settle_at("a", &ten_cents, second, 0, 90_000_000, now, noon);
        assert_eq!(limiter.usage_at("a", now, noon).usd_today, 110_000_000);
        // A refusal charged nothing; the next day starts from zero.
        let morning = at("2026-12-08T00:00:00Z");
        assert!(
            limiter
                .acquire_at("a", &ten_cents, 0, 100_000_000, now, morning)
                .is_ok()
        );
    }

    #[test]
    fn the_month_budget_spans_days_and_renews_on_the_first_of_the_month() {
        let limiter = MemoryLimiter::new();
        // Two dollars a day, three a month.
        let both = dollars(Some(2_000_000_000), Some(3_000_000_000));
        let now = Instant::now();
        let spend = |wall: SystemTime, nanos: Nanos| {
            let (charge, _) = limiter.acquire_at("a", &both, 0, nanos, now, wall).unwrap();
            limiter.settle_at("a", &both, charge, 0, nanos, now, wall);
        };
        spend(at("2026-11-29T10:00:00Z"), 2_000_000_000);
        // The day is spent: refused until midnight.
        let late = at("2026-11-29T23:00:00Z");
        let refusal = limiter.acquire_at("a", &both, 0, 1, now, late).unwrap_err();
        assert_eq!(refusal.reason, Reason::UsdPerDay);
        assert_eq!(refusal.retry_after, Duration::from_secs(3600));
        // A new day, but one dollar left of the month: the month refuses, until December.
        let next_day = at("2026-11-30T06:00:00Z");
        spend(next_day, 1_000_000_000);
        let refusal = limiter
            .acquire_at("a", &both, 0, 1, now, next_day)
            .unwrap_err();
        assert_eq!(refusal.reason, Reason::UsdPerMonth);
        assert_eq!(refusal.retry_after, Duration::from_secs(18 * 3600));
        let usage = limiter.usage_at("a", now, next_day);
        assert_eq!(
            (usage.usd_today, usage.usd_this_month),
            (1_000_000_000, 3_000_000_000)
        );
        // Over both on the month's last day, the same wait: the month is named, the budget
        // that keeps refusing however the day is spent.
        let refusal = limiter
            .acquire_at("a", &both, 0, 1_500_000_000, now, next_day)
            .unwrap_err();
        assert_eq!(refusal.reason, Reason::UsdPerMonth);
        // December the first: both renew.
        let december = at("2026-12-01T00:00:00Z");
        let usage = limiter.usage_at("a", now, december);
        assert_eq!((usage.usd_today, usage.usd_this_month), (0, 0));
        spend(december, 2_000_000_000);
        assert_eq!(
            limiter.usage_at("a", now, december).usd_this_month,
            2_000_000_000
        );
    }

    #[test]
    fn a_request_settled_after_its_month_ended_takes_its_reservation_out_of_nothing() {
        let limiter = MemoryLimiter::new();
        let month = dollars(None, Some(1_000_000_000));
        let now = Instant::now();
        let (charge, _) = limiter
            .acquire_at("a", &month, 0, 400_000_000, now, at("2026-12-31T23:59:59Z"))
            .unwrap();
        let january = at("2027-01-01T00:00:01Z");
        limiter.settle_at("a", &month, charge, 0, 100_000_000, now, january);
        let usage = limiter.usage_at("a", now, january);
        assert_eq!(
            (usage.usd_today, usage.usd_this_month),
            (100_000_000, 100_000_000)
        );
    }

    #[test]
    fn the_months_counts_come_back_after_a_restart_on_another_day() {
        let limiter = MemoryLimiter::new();
        let month = dollars(Some(5_000_000_000), Some(9_000_000_000));
        let now = Instant::now();
        let first = at("2026-12-01T10:00:00Z");
        let (charge, _) = limiter.acquire_at("a", &month, 7, 300, now, first).unwrap();
        limiter.settle_at("a", &month, charge, 7, 300, now, first);
        let kept = limiter.budgets_at(first);
        assert_eq!(kept.usd_today, vec![("a".to_string(), 300)]);
        assert_eq!(kept.usd_month, vec![("a".to_string(), 300)]);
        let second = at("2026-12-02T10:00:00Z");
        let restarted = MemoryLimiter::new();
        restarted.restore_budgets_at(kept.clone(), second);
        let usage = restarted.usage_at("a", now, second);
        assert_eq!(
            (usage.tokens_today, usage.usd_today, usage.usd_this_month),
            (0, 0, 300)
        );
        let january = MemoryLimiter::new();
        january.restore_budgets_at(kept, at("2027-01-01T10:00:00Z"));
        assert_eq!(
            january
                .usage_at("a", now, at("2027-01-01T10:00:00Z"))
                .usd_this_month,
            0
        );
    }
}
