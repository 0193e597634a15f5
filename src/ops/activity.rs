//! The last hour of traffic, minute by minute: requests, dollars spent and limit refusals (by
//! client and reason), for the status page's charts (`GET /admin/activity`) and the refusals of
//! the last hour in `/admin/clients`.
//!
//! A ring of [`MINUTES`] slots, one per wall-clock minute (UTC, so that replicas sharing Redis
//! count the same minutes), each slot reused when its minute comes round again: the memory is
//! bounded by the ring, [`Activity::FIXED_BYTES`], plus one small entry per client and reason
//! refused in a minute. Each slot also keeps what has not been sent to Redis yet, which the
//! shared side ([`crate::shared::activity`]) takes in the background; the request path only ever
//! adds to this process's ring.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

/// How many one-minute slots the ring holds: one hour.
pub const MINUTES: usize = 60;

/// What happened in one minute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Requests forwarded (or refused) under `/v1`, counted when their answer ended.
    pub requests: u64,
    /// Nano-dollars spent (10^-9 USD).
    pub nanos: u64,
    /// Requests a client's limits refused.
    pub refusals: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.requests = self.requests.saturating_add(other.requests);
        self.nanos = self.nanos.saturating_add(other.nanos);
        self.refusals = self.refusals.saturating_add(other.refusals);
    }

    fn is_zero(&self) -> bool {
        *self == Counts::default()
    }
}

/// Refusals of one client for one reason within a minute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub client: Arc<str>,
    /// A refusal reason (`crate::policy::Reason::as_str`), or one read back from Redis.
    pub reason: Arc<str>,
    pub count: u64,
}

/// One minute's counts, as sent to Redis.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Minute {
    /// Minutes since 1970-01-01T00:00Z.
    pub minute: u64,
    pub counts: Counts,
    pub refused: Vec<Refused>,
}

/// The hour as the status page reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hour {
    /// [`MINUTES`] minutes, oldest first, the current one last: (minute since the epoch, counts).
    pub minutes: Vec<(u64, Counts)>,
    /// Client -> reason -> refusals over the hour.
    pub refusals: BTreeMap<String, BTreeMap<String, u64>>,
}

impl Hour {
    /// The hour ending with minute `now`, from minutes read anywhere (this ring, Redis), each
    /// counted once; minutes outside the hour are left out.
    pub fn from_minutes(now: u64, read: impl IntoIterator<Item = Minute>) -> Hour {
        let first = now.saturating_sub(MINUTES as u64 - 1);
        let mut minutes: Vec<(u64, Counts)> = (first..=now)
            .map(|minute| (minute, Counts::default()))
            .collect();
        let mut refusals: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for minute in read {
            if minute.minute < first || minute.minute > now {
                continue;
            }
            let index = (minute.minute - first) as usize;
            if let Some((_, counts)) = minutes.get_mut(index) {
                counts.add(minute.counts);
            }
            for refused in minute.refused {
                let count = refusals
                    .entry(refused.client.to_string())
                    .or_default()
                    .entry(refused.reason.to_string())
                    .or_default();
                *count = count.saturating_add(refused.count);
            }
        }
        Hour { minutes, refusals }
    }
}

#[derive(Default)]
struct Slot {
    minute: u64,
    counts: Counts,
    refused: Vec<Refused>,
    /// What Redis has not been sent yet (see [`Activity::take_unsent`]).
    unsent: Counts,
    unsent_refused: Vec<Refused>,
}

impl Slot {
    /// The slot, made ready for `minute`: a slot still holding the minute an hour before is
    /// emptied first. `None` for a minute older than the slot's (the clock went back an hour):
    /// that count is dropped rather than the newer minute's.
    fn at(&mut self, minute: u64) -> Option<&mut Slot> {
        if self.minute > minute {
            return None;
        }
        if self.minute != minute {
            *self = Slot {
                minute,
                ..Slot::default()
            };
        }
        Some(self)
    }
}

// The README states these bounds (6,240 and 40 bytes on a 64-bit machine): a change that grows
// them past what it says fails the build.
const _: () = assert!(Activity::FIXED_BYTES <= 6_240 && Activity::REFUSED_BYTES <= 40);

/// This process's ring. Cloning is shallow.
#[derive(Clone)]
pub struct Activity(Arc<Mutex<[Slot; MINUTES]>>);

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

/// Adds one refusal of `client` for `reason` to a minute's list.
fn count_refusal(list: &mut Vec<Refused>, client: &Arc<str>, reason: &str, count: u64) {
    match list
        .iter_mut()
        .find(|refused| refused.client == *client && &*refused.reason == reason)
    {
        Some(refused) => refused.count = refused.count.saturating_add(count),
        None => list.push(Refused {
            client: client.clone(),
            reason: Arc::from(reason),
            count,
        }),
    }
}

impl Activity {
    /// The ring's own size, whatever the traffic: each refused client and reason adds an entry
    /// of [`Activity::REFUSED_BYTES`] (twice until it is sent to Redis) to its minute, plus its
    /// names.
    pub const FIXED_BYTES: usize = MINUTES * std::mem::size_of::<Slot>();
    pub const REFUSED_BYTES: usize = std::mem::size_of::<Refused>();

    pub fn new() -> Activity {
        Activity(Arc::new(Mutex::new(std::array::from_fn(|_| {
            Slot::default()
        }))))
    }

    /// The current minute, since 1970-01-01T00:00Z, on the wall clock.
    pub fn now() -> u64 {
        Activity::minute(SystemTime::now())
    }

    /// The minute of `wall`, since 1970-01-01T00:00Z.
    pub fn minute(wall: SystemTime) -> u64 {
        wall.duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs() / 60)
    }

    /// A request under `/v1` ended (it went upstream or was refused).
    pub fn record_request(&self) {
        self.record_at(
            Activity::now(),
            Counts {
                requests: 1,
                ..Counts::default()
            },
        );
    }

    /// A request's cost, in nano-dollars, known at `wall`.
    pub fn record_spend(&self, wall: SystemTime, nanos: u64) {
        if nanos == 0 {
            return;
        }
        self.record_at(
            Activity::minute(wall),
            Counts {
                nanos,
                ..Counts::default()
            },
        );
    }

    /// A client's limits refused a request, for `reason`.
    pub fn record_refusal(&self, client: &Arc<str>, reason: &str) {
        self.record_refusal_at(Activity::now(), client, reason);
    }

    pub fn record_at(&self, minute: u64, counts: Counts) {
        // A synchronous lock, held for a few additions and never across an `.await`.
        let mut ring = self.0.lock();
        let Some(slot) = ring[minute as usize % MINUTES].at(minute) else {
            return;
        };
        slot.counts.add(counts);
        slot.unsent.add(counts);
    }

    pub fn record_refusal_at(&self, minute: u64, client: &Arc<str>, reason: &str) {
        let mut ring = self.0.lock();
        let Some(slot) = ring[minute as usize % MINUTES].at(minute) else {
            return;
        };
        let one = Counts {
            refusals: 1,
            ..Counts::default()
        };
        slot.counts.add(one);
        slot.unsent.add(one);
        count_refusal(&mut slot.refused, client, reason, 1);
        count_refusal(&mut slot.unsent_refused, client, reason, 1);
    }

    /// This process's hour, ending with minute `now`.
    pub fn hour(&self, now: u64) -> Hour {
        Hour::from_minutes(now, self.minutes(now, |slot| (slot.counts, &slot.refused)))
    }

    /// What has not been sent to Redis yet, within the hour ending with minute `now`, without
    /// taking it: added to what Redis holds, the hour is complete.
    pub fn unsent(&self, now: u64) -> Vec<Minute> {
        self.minutes(now, |slot| (slot.unsent, &slot.unsent_refused))
    }

    /// Takes what has not been sent to Redis yet, within the hour ending with minute `now`.
    pub fn take_unsent(&self, now: u64) -> Vec<Minute> {
        let mut ring = self.0.lock();
        let first = now.saturating_sub(MINUTES as u64 - 1);
        ring.iter_mut()
            .filter(|slot| (first..=now).contains(&slot.minute))
            .filter(|slot| !slot.unsent.is_zero())
            .map(|slot| Minute {
                minute: slot.minute,
                counts: std::mem::take(&mut slot.unsent),
                refused: std::mem::take(&mut slot.unsent_refused),
            })
            .collect()
    }

    /// Every non-empty slot within the hour ending with `now`, as `pick` reads it.
    fn minutes(&self, now: u64, pick: impl Fn(&Slot) -> (Counts, &Vec<Refused>)) -> Vec<Minute> {
        let ring = self.0.lock();
        let first = now.saturating_sub(MINUTES as u64 - 1);
        ring.iter()
            .filter(|slot| (first..=now).contains(&slot.minute))
            .filter_map(|slot| {
                let (counts, refused) = pick(slot);
                (!counts.is_zero()).then(|| Minute {
                    minute: slot.minute,
                    counts,
                    refused: refused.clone(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 29_000_000;

    #[test]
    fn an_hour_is_sixty_minutes_oldest_first() {
        let activity = Activity::new();
        activity.record_at(
            NOW,
            Counts {
                requests: 2,
                ..Counts::default()
            },
        );
        activity.record_at(
            NOW - 59,
            Counts {
                nanos: 1_500,
                ..Counts::default()
            },
        );
        let hour = activity.hour(NOW);
        assert_eq!(hour.minutes.len(), MINUTES);
        assert_eq!(hour.minutes[0].0, NOW - 59);
        assert_eq!(hour.minutes[0].1.nanos, 1_500);
        assert_eq!(
            hour.minutes[59],
            (
                NOW,
                Counts {
                    requests: 2,
                    ..Counts::default()
                }
            )
        );
        // An hour later both have left the hour, and their slots are reused.
        let later = activity.hour(NOW + 60);
        assert!(later.minutes.iter().all(|(_, counts)| counts.is_zero()));
        activity.record_at(
            NOW + 60,
            Counts {
                requests: 1,
                ..Counts::default()
            },
        );
        assert_eq!(activity.hour(NOW + 60).minutes[59].1.requests, 1);
        assert_eq!(activity.hour(NOW).minutes[59].1.requests, 0, "reused");
    }

    #[test]
    fn spend_is_recorded_in_the_current_minute() {
        let activity = Activity::new();
        activity.record_spend(SystemTime::now(), 2_500_000_000);
        activity.record_spend(SystemTime::now(), 0);
        let hour = activity.hour(Activity::now());
        assert_eq!(hour.minutes[59].1.nanos, 2_500_000_000);
        assert_eq!(hour.minutes[59].1.requests, 0);
    }

    #[test]
    fn refusals_are_counted_by_client_and_reason_over_the_hour() {
        let activity = Activity::new();
        let alice: Arc<str> = Arc::from("alice");
        activity.record_refusal_at(NOW - 10, &alice, "requests_per_minute");
        activity.record_refusal_at(NOW, &alice, "requests_per_minute");
        activity.record_refusal_at(NOW, &alice, "model_not_allowed");
        activity.record_refusal_at(NOW - 60, &alice, "tokens_per_day");
        let hour = activity.hour(NOW);
        let reasons = &hour.refusals["alice"];
        assert_eq!(reasons["requests_per_minute"], 2);
        assert_eq!(reasons["model_not_allowed"], 1);
        assert!(!reasons.contains_key("tokens_per_day"), "an hour ago");
        assert_eq!(hour.minutes[59].1.refusals, 2);
    }

    #[test]
    fn what_is_taken_for_redis_is_taken_once_and_stays_in_the_ring() {
        let activity = Activity::new();
        let bob: Arc<str> = Arc::from("bob");
        activity.record_at(
            NOW,
            Counts {
                requests: 3,
                nanos: 7,
                refusals: 0,
            },
        );
        activity.record_refusal_at(NOW, &bob, "max_concurrent_requests");
        assert_eq!(activity.unsent(NOW).len(), 1, "a look takes nothing");
        let taken = activity.take_unsent(NOW);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].minute, NOW);
        assert_eq!(
            taken[0].counts,
            Counts {
                requests: 3,
                nanos: 7,
                refusals: 1,
            }
        );
        assert_eq!(taken[0].refused[0].count, 1);
        assert!(activity.take_unsent(NOW).is_empty());
        assert!(activity.unsent(NOW).is_empty());
        assert_eq!(activity.hour(NOW).minutes[59].1.requests, 3);
    }
}
