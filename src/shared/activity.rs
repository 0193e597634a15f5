//! The activity ring ([`crate::ops::activity`]) shared by replicas (`REDIS_URL`): one hash per
//! minute, `llm-proxy:{activity}:minute:<minutes since the epoch>`, with the fields `requests`,
//! `nanos`, `refusals` and `refused|<reason>|<client>` (the client last: its name may hold a
//! `|`), each expiring [`EXPIRY`] after its last write.
//!
//! No request waits for Redis: every replica adds to its own ring, and a background task sends
//! what it has not sent yet once every [`FLUSH_INTERVAL`], in one round trip (HINCRBY). Reading
//! the hour (`/admin/activity`, `/admin/clients`) is one round trip too, plus what this replica
//! has not sent yet. In local mode nothing is sent (this replica's counts wait in its ring, and
//! go once Redis answers again if their minute is still in the hour) and the hour is this
//! replica's own.

use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::Script;

use super::{Mode, Shared, Unavailable};
use crate::ops::activity::{Activity, Counts, Hour, MINUTES, Minute, Refused};

/// How often a replica sends its counts.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Each minute's hash lives this long after its last write: the hour it is shown for, and as
/// long again for a replica whose clock is behind.
pub const EXPIRY: Duration = Duration::from_secs(2 * 60 * 60);
/// A minute's hash is this followed by the minute's number since the epoch.
pub const KEY_PREFIX: &str = "llm-proxy:{activity}:minute:";

const REQUESTS: &str = "requests";
const NANOS: &str = "nanos";
const REFUSALS: &str = "refusals";
const REFUSED: &str = "refused|";

/// The ring and its Redis side. Cloning is shallow.
#[derive(Clone)]
pub struct SharedActivity(Arc<Inner>);

struct Inner {
    shared: Shared,
    activity: Activity,
    add: Script,
    read: Script,
}

impl SharedActivity {
    /// With `REDIS_URL`, starts the background sender (so this needs a tokio runtime); it ends
    /// when the last handle is dropped.
    pub fn new(shared: &Shared, activity: Activity) -> SharedActivity {
        let handle = SharedActivity(Arc::new(Inner {
            shared: shared.clone(),
            activity,
            add: Script::new(include_str!("activity_add.lua")),
            read: Script::new(include_str!("activity_read.lua")),
        }));
        if shared.is_configured() {
            tokio::spawn(send_loop(Arc::downgrade(&handle.0)));
        }
        handle
    }

    /// This replica's ring.
    pub fn activity(&self) -> &Activity {
        &self.0.activity
    }

    /// The hour ending with the current minute, and whose it is: every replica's in shared mode,
    /// this replica's alone in local mode or when Redis did not answer.
    pub async fn hour(&self) -> (Mode, Hour) {
        let now = Activity::now();
        if self.0.shared.mode() == Mode::Shared
            && let Ok(mut minutes) = self.0.read(now).await
        {
            minutes.extend(self.0.activity.unsent(now));
            return (Mode::Shared, Hour::from_minutes(now, minutes));
        }
        (Mode::Local, self.0.activity.hour(now))
    }

    /// Sends what this replica has not sent yet, in one round trip; nothing in local mode.
    /// After `Unavailable` the counts taken are not sent again: Redis may have applied them.
    pub async fn flush(&self) -> Result<(), Unavailable> {
        self.0.flush().await
    }
}

impl Inner {
    async fn flush(&self) -> Result<(), Unavailable> {
        if self.shared.mode() != Mode::Shared {
            return Err(Unavailable);
        }
        let minutes = self.activity.take_unsent(Activity::now());
        if minutes.is_empty() {
            return Ok(());
        }
        let mut invocation = self.add.prepare_invoke();
        invocation.arg(super::rests::millis(EXPIRY));
        for minute in &minutes {
            invocation.key(key(minute.minute));
            let fields = fields(minute);
            invocation.arg(fields.len());
            for (field, count) in fields {
                invocation.arg(field).arg(count);
            }
        }
        let _added: u64 = self.shared.eval(&invocation).await?;
        Ok(())
    }

    async fn read(&self, now: u64) -> Result<Vec<Minute>, Unavailable> {
        let first = now.saturating_sub(MINUTES as u64 - 1);
        let mut invocation = self.read.prepare_invoke();
        for minute in first..=now {
            invocation.key(key(minute));
        }
        let hashes: Vec<Vec<String>> = self.shared.eval(&invocation).await?;
        Ok((first..=now)
            .zip(hashes)
            .map(|(minute, fields)| parse(minute, &fields))
            .collect())
    }
}

fn key(minute: u64) -> String {
    format!("{KEY_PREFIX}{minute}")
}

/// A minute's non-zero counts as hash fields.
fn fields(minute: &Minute) -> Vec<(String, u64)> {
    let Counts {
        requests,
        nanos,
        refusals,
    } = minute.counts;
    let mut fields: Vec<(String, u64)> =
        [(REQUESTS, requests), (NANOS, nanos), (REFUSALS, refusals)]
            .into_iter()
            .filter(|(_, count)| *count > 0)
            .map(|(field, count)| (field.to_string(), count))
            .collect();
    for refused in &minute.refused {
        fields.push((
            format!("{REFUSED}{}|{}", refused.reason, refused.client),
            refused.count,
        ));
    }
    fields
}

/// A minute's hash (HGETALL's field, value list) read back; fields this version does not know
/// are skipped.
fn parse(minute: u64, pairs: &[String]) -> Minute {
    let mut read = Minute {
        minute,
        ..Minute::default()
    };
    for pair in pairs.chunks_exact(2) {
        let Ok(count) = pair[1].parse::<u64>() else {
            continue;
        };
        match pair[0].as_str() {
            REQUESTS => read.counts.requests = count,
            NANOS => read.counts.nanos = count,
            REFUSALS => read.counts.refusals = count,
            field => {
                if let Some((reason, client)) = field
                    .strip_prefix(REFUSED)
                    .and_then(|rest| rest.split_once('|'))
                {
                    read.refused.push(Refused {
                        client: Arc::from(client),
                        reason: Arc::from(reason),
                        count,
                    });
                }
            }
        }
    }
    read
}

/// Sends every `FLUSH_INTERVAL` until the handle is dropped.
async fn send_loop(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let _ = strong.flush().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minute_reads_back_as_it_was_written() {
        let minute = Minute {
            minute: 29_000_000,
            counts: Counts {
                requests: 12,
                nanos: 3_400,
                refusals: 2,
            },
            refused: vec![Refused {
                client: Arc::from("team|a"),
                reason: Arc::from("requests_per_minute"),
                count: 2,
            }],
        };
        let pairs: Vec<String> = fields(&minute)
            .into_iter()
            .flat_map(|(field, count)| [field, count.to_string()])
            .collect();
        assert_eq!(parse(minute.minute, &pairs), minute);
        assert_eq!(key(29_000_000), "llm-proxy:{activity}:minute:29000000");
    }

    #[test]
    fn unknown_fields_are_skipped() {
        let pairs = [
            "requests",
            "3",
            "later",
            "9",
            "refused|x",
            "1",
            "nanos",
            "no",
        ]
        .map(String::from);
        let read = parse(1, &pairs);
        assert_eq!(read.counts.requests, 3);
        assert_eq!(read.counts.nanos, 0);
        assert!(read.refused.is_empty());
    }
}
