//! The spend ledger: today's and this month's dollars (UTC) and priced requests, by client, by
//! model and by upstream, for `GET /admin/spend`.
//!
//! Every replica adds its requests to its own totals in memory (kept across restarts in
//! `STATE_DIR/spend.json` without Redis). With `REDIS_URL` they are added to Redis hashes as
//! well, in batches sent in the background a few milliseconds after a request settles (never a
//! round trip on the request path), and `/admin/spend` reads Redis: every replica's spend. While
//! Redis does not answer, batches wait for it (merged, so the wait costs no more memory than the
//! groups they count) and `/admin/spend` answers from this replica's own totals.
//!
//! Redis keys: `llm-proxy:{spend}:<group>:d:<YYYY-MM-DD>` and `...:m:<YYYY-MM>`, hashes of
//! `u:<key>` (nano-dollars) and `r:<key>` (requests); day keys expire two days after their last
//! write, month keys 35 days after theirs.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use redis::Script;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use super::store::{Kept, StateFile};
use crate::config::ConfigError;
use crate::shared::{Mode, Shared, Unavailable};
use crate::vocab::Nanos;
use crate::vocab::calendar::{day_text, utc_day};

/// How long a request's spend waits for others to go to Redis with it.
pub const SEND_DELAY: Duration = Duration::from_millis(10);
/// How long a batch Redis did not take waits before it is sent again.
const RETRY_DELAY: Duration = Duration::from_secs(1);
const DAY_TTL_MS: u64 = 2 * 24 * 60 * 60 * 1000;
const MONTH_TTL_MS: u64 = 35 * 24 * 60 * 60 * 1000;

const ADD: &str = include_str!("ledger_add.lua");
const READ: &str = include_str!("ledger_read.lua");

/// How `/admin/spend` groups the spend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Group {
    Client,
    Model,
    Upstream,
}

impl Group {
    pub const ALL: [Group; 3] = [Group::Client, Group::Model, Group::Upstream];

    pub fn as_str(self) -> &'static str {
        match self {
            Group::Client => "client",
            Group::Model => "model",
            Group::Upstream => "upstream",
        }
    }

    pub fn parse(text: &str) -> Option<Group> {
        Group::ALL.into_iter().find(|group| group.as_str() == text)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Dollars and requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sum {
    pub nanos: Nanos,
    pub requests: u64,
}

impl Sum {
    fn add(&mut self, other: Sum) {
        self.nanos = self.nanos.saturating_add(other.nanos);
        self.requests = self.requests.saturating_add(other.requests);
    }
}

/// A key's day and month, kept together so that a priced request finds each of its three
/// lines once.
#[derive(Clone, Copy, Debug, Default)]
struct DayAndMonth {
    today: Sum,
    this_month: Sum,
}

/// FxHash: the keys are the files' names (clients, priced models, upstreams), never a caller's,
/// and three of these are updated per priced request.
type Groups = [FxHashMap<Arc<str>, DayAndMonth>; 3];

/// One group's line of `/admin/spend`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub key: String,
    pub today: Sum,
    pub this_month: Sum,
}

/// What `/admin/spend` shows: the day and month (UTC) and the lines, largest month first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub day: String,
    pub month: String,
    pub lines: Vec<Line>,
}

/// Today, UTC, as days since 1970-01-01.
fn today() -> u64 {
    utc_day(SystemTime::now())
}

/// Adds `sum` to `key`'s day and month. The line is looked up first: it is there for all but a
/// group's first request of the month, and the entry API would clone the key for every one.
fn add(lines: &mut FxHashMap<Arc<str>, DayAndMonth>, key: &Arc<str>, sum: Sum) {
    match lines.get_mut(&**key) {
        Some(line) => {
            line.today.add(sum);
            line.this_month.add(sum);
        }
        None => {
            lines.insert(
                key.clone(),
                DayAndMonth {
                    today: sum,
                    this_month: sum,
                },
            );
        }
    }
}

/// The local totals of one day and its month.
#[derive(Default)]
struct Totals {
    day: u64,
    /// `YYYY-MM-DD` and `YYYY-MM` of `day`: shared, so that what waits for Redis names its
    /// period without a copy per request.
    day_text: Arc<str>,
    month_text: Arc<str>,
    groups: Groups,
}

impl Totals {
    /// Moves the totals on to `day`: today's start from zero, and the month's too in a new
    /// month.
    fn roll_to(&mut self, day: u64) {
        if day == self.day && !self.day_text.is_empty() {
            return;
        }
        let text = day_text(day);
        let month = &text[..7];
        if month != &*self.month_text {
            self.groups = Groups::default();
            self.month_text = Arc::from(month);
        } else {
            for line in self.groups.iter_mut().flat_map(|lines| lines.values_mut()) {
                line.today = Sum::default();
            }
        }
        self.day = day;
        self.day_text = Arc::from(text);
    }
}

/// One of the ledger's Redis hashes: a group's day or month.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Period {
    group: Group,
    month: bool,
    /// `YYYY-MM-DD` or `YYYY-MM`.
    text: Arc<str>,
}

impl Period {
    fn key(&self) -> String {
        if self.month {
            month_key(self.group, &self.text)
        } else {
            day_key(self.group, &self.text)
        }
    }
}

/// What waits to go to Redis: per hash, per key of the group, the sum.
type Pending = FxHashMap<Period, FxHashMap<Arc<str>, Sum>>;

/// The ledger. Cloning is shallow.
#[derive(Clone)]
pub struct Ledger(Arc<Inner>);

struct Inner {
    shared: Shared,
    add: Script,
    read: Script,
    // Synchronous locks: held for map operations, never across an `.await`.
    totals: Mutex<Totals>,
    pending: Mutex<Pending>,
    send_planned: AtomicBool,
    /// Bumped by every change to the totals: the state writer skips a write when it did not
    /// move.
    generation: AtomicU64,
}

impl Ledger {
    pub fn new(shared: Shared) -> Ledger {
        Ledger(Arc::new(Inner {
            shared,
            add: Script::new(ADD),
            read: Script::new(READ),
            totals: Mutex::new(Totals::default()),
            pending: Mutex::new(FxHashMap::default()),
            send_planned: AtomicBool::new(false),
            generation: AtomicU64::new(0),
        }))
    }

    /// Adds a priced request. Called where an answer's body ends, so it never waits: with Redis,
    /// the batch is sent by a task of its own.
    pub fn record(
        &self,
        wall: SystemTime,
        client: &Arc<str>,
        model: &Arc<str>,
        upstream: &Arc<str>,
        nanos: Nanos,
    ) {
        let one = Sum { nanos, requests: 1 };
        let keys = [client, model, upstream];
        let (day, month) = {
            let mut totals = self.0.totals.lock();
            totals.roll_to(utc_day(wall));
            for group in Group::ALL {
                add(&mut totals.groups[group.index()], keys[group.index()], one);
            }
            (totals.day_text.clone(), totals.month_text.clone())
        };
        self.0.generation.fetch_add(1, Ordering::Relaxed);
        if !self.0.shared.is_configured() {
            return;
        }
        {
            let mut pending = self.0.pending.lock();
            for group in Group::ALL {
                let key = keys[group.index()];
                for (month, text) in [(false, &day), (true, &month)] {
                    let period = Period {
                        group,
                        month,
                        text: text.clone(),
                    };
                    pending
                        .entry(period)
                        .or_default()
                        .entry(key.clone())
                        .or_default()
                        .add(one);
                }
            }
        }
        self.plan_send(SEND_DELAY);
    }

    fn plan_send(&self, delay: Duration) {
        if self.0.send_planned.swap(true, Ordering::AcqRel) {
            return;
        }
        let ledger = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            ledger.send().await;
        });
    }

    /// Sends what waits in one script call; what Redis did not take waits for the next.
    async fn send(&self) {
        // Cleared first: a request recorded after the batch is taken plans its own send.
        self.0.send_planned.store(false, Ordering::Release);
        let batch: Pending = std::mem::take(&mut *self.0.pending.lock());
        if batch.is_empty() {
            return;
        }
        let sent = if self.0.shared.mode() == Mode::Shared {
            let mut invocation = self.0.add.prepare_invoke();
            let mut fields = Vec::new();
            for (index, (period, sums)) in batch.iter().enumerate() {
                invocation.key(period.key());
                let ttl = if period.month {
                    MONTH_TTL_MS
                } else {
                    DAY_TTL_MS
                };
                invocation.arg(ttl);
                for (key, sum) in sums {
                    fields.push((index + 1, key, sum));
                }
            }
            for (index, key, sum) in fields {
                invocation
                    .arg(index)
                    .arg(&**key)
                    .arg(sum.nanos)
                    .arg(sum.requests);
            }
            self.0.shared.eval::<i64>(&invocation).await
        } else {
            Err(Unavailable)
        };
        if sent.is_err() {
            // Merged back: the wait costs no more than the groups it counts. A batch whose
            // answer timed out may have been applied all the same and is then counted twice:
            // this view of spend errs high rather than low.
            {
                let mut pending = self.0.pending.lock();
                for (hash, sums) in batch {
                    let waiting = pending.entry(hash).or_default();
                    for (key, sum) in sums {
                        waiting.entry(key).or_default().add(sum);
                    }
                }
            }
            self.plan_send(RETRY_DELAY);
        }
    }

    /// Sends what waits now; called once the server has drained.
    pub async fn flush(&self) {
        if self.0.shared.is_configured() {
            self.send().await;
        }
    }

    /// Today's and this month's spend grouped `by`: every replica's from Redis when it answers,
    /// else this replica's own.
    pub async fn report(&self, by: Group) -> Report {
        let (day, month, local) = {
            let mut totals = self.0.totals.lock();
            totals.roll_to(today());
            let lines = sorted(
                totals.groups[by.index()]
                    .iter()
                    .filter(|(_, line)| line.this_month != Sum::default())
                    .map(|(key, line)| Line {
                        key: key.to_string(),
                        today: line.today,
                        this_month: line.this_month,
                    })
                    .collect(),
            );
            (
                totals.day_text.to_string(),
                totals.month_text.to_string(),
                lines,
            )
        };
        let lines = match self.read_shared(by, &day, &month).await {
            Some(lines) => lines,
            None => local,
        };
        Report { day, month, lines }
    }

    async fn read_shared(&self, by: Group, day: &str, month: &str) -> Option<Vec<Line>> {
        if !self.0.shared.is_configured() {
            return None;
        }
        let mut invocation = self.0.read.prepare_invoke();
        invocation.key(day_key(by, day)).key(month_key(by, month));
        let (today, this_month): (Vec<String>, Vec<String>) =
            self.0.shared.eval(&invocation).await.ok()?;
        let today = from_hash(&today);
        Some(sorted(
            from_hash(&this_month)
                .into_iter()
                .map(|(key, this_month)| Line {
                    today: today.get(&key).copied().unwrap_or_default(),
                    key,
                    this_month,
                })
                .collect(),
        ))
    }

    /// The totals as `STATE_DIR/spend.json` keeps them.
    fn snapshot(&self) -> LedgerFile {
        let mut totals = self.0.totals.lock();
        totals.roll_to(today());
        let file_groups = |period: fn(&DayAndMonth) -> Sum| {
            Group::ALL
                .into_iter()
                .map(|group| {
                    let sums = totals.groups[group.index()]
                        .iter()
                        .map(|(key, line)| (key.to_string(), period(line)))
                        .filter(|(_, sum)| *sum != Sum::default())
                        .collect();
                    (group.as_str().to_string(), sums)
                })
                .collect()
        };
        LedgerFile {
            version: 1,
            day: totals.day_text.to_string(),
            month: totals.month_text.to_string(),
            today: file_groups(|line| line.today),
            this_month: file_groups(|line| line.this_month),
        }
    }

    /// Puts totals read back at start-up in place: the month's if it is this month, the day's
    /// if it is today.
    fn restore(&self, file: LedgerFile) {
        let mut totals = self.0.totals.lock();
        totals.roll_to(today());
        // A group the file has replaces what that group had for the period.
        let into_groups = |from: BTreeMap<String, BTreeMap<String, Sum>>,
                           groups: &mut Groups,
                           period: fn(&mut DayAndMonth) -> &mut Sum| {
            for (name, sums) in from {
                if let Some(group) = Group::parse(&name) {
                    let lines = &mut groups[group.index()];
                    for line in lines.values_mut() {
                        *period(line) = Sum::default();
                    }
                    for (key, sum) in sums {
                        *period(lines.entry(Arc::from(key)).or_default()) = sum;
                    }
                }
            }
        };
        if *file.month == *totals.month_text {
            into_groups(file.this_month, &mut totals.groups, |line| {
                &mut line.this_month
            });
        }
        if *file.day == *totals.day_text {
            into_groups(file.today, &mut totals.groups, |line| &mut line.today);
        }
    }
}

fn day_key(group: Group, day: &str) -> String {
    format!("llm-proxy:{{spend}}:{}:d:{day}", group.as_str())
}

fn month_key(group: Group, month: &str) -> String {
    format!("llm-proxy:{{spend}}:{}:m:{month}", group.as_str())
}

/// A hash as HGETALL gives it (field, value, field, value, ...) into sums by key.
fn from_hash(flat: &[String]) -> FxHashMap<String, Sum> {
    let mut sums: FxHashMap<String, Sum> = FxHashMap::default();
    for pair in flat.chunks_exact(2) {
        let value = pair[1].parse::<u64>().unwrap_or(0);
        if let Some(key) = pair[0].strip_prefix("u:") {
            sums.entry(key.to_string()).or_default().nanos = value;
        } else if let Some(key) = pair[0].strip_prefix("r:") {
            sums.entry(key.to_string()).or_default().requests = value;
        }
    }
    sums
}

/// The lines, one per key of the month (today's keys are among them), largest month first,
/// then by key so that equal sums keep one order.
fn sorted(mut lines: Vec<Line>) -> Vec<Line> {
    lines.sort_by(|a, b| {
        b.this_month
            .nanos
            .cmp(&a.this_month.nanos)
            .then_with(|| a.key.cmp(&b.key))
    });
    lines
}

/// `STATE_DIR/spend.json`:
///
/// ```json
/// {"version":1,"day":"2026-12-07","month":"2026-12",
///  "today":{"client":{"alice":{"nanos":1234,"requests":2}},"model":{...},"upstream":{...}},
///  "this_month":{...}}
/// ```
#[derive(Serialize, Deserialize)]
struct LedgerFile {
    version: u32,
    day: String,
    month: String,
    today: BTreeMap<String, BTreeMap<String, Sum>>,
    this_month: BTreeMap<String, BTreeMap<String, Sum>>,
}

/// The ledger's totals across restarts, in `STATE_DIR/spend.json`.
pub type LedgerStore = StateFile<Ledger>;

impl Kept for Ledger {
    const FILE: &'static str = "spend.json";
    const WHAT: &'static str = "spend ledger's totals (GET /admin/spend)";

    fn generation(&self) -> u64 {
        self.0.generation.load(Ordering::Relaxed)
    }

    fn contents(&self) -> serde_json::Result<Option<Vec<u8>>> {
        serde_json::to_vec(&self.snapshot()).map(Some)
    }

    fn restore(&self, bytes: &[u8], _path: &Path) -> serde_json::Result<()> {
        let file: LedgerFile = serde_json::from_slice(bytes)?;
        Ledger::restore(self, file);
        Ok(())
    }
}

impl LedgerStore {
    /// Reads the totals kept in `dir` into `ledger` and proves the directory writable by
    /// writing them back.
    pub fn open(dir: &Path, ledger: Ledger) -> Result<LedgerStore, ConfigError> {
        StateFile::open_in(dir, ledger)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> Ledger {
        let config = crate::config::SharedStateConfig {
            redis: None,
            timeout: Duration::from_millis(100),
            fallback_replicas: 1,
        };
        Ledger::new(Shared::new(&config, crate::ops::metrics::Metrics::new()))
    }

    #[tokio::test]
    async fn spend_is_grouped_three_ways_largest_month_first() {
        let ledger = local();
        let name = |text: &str| Arc::<str>::from(text);
        let now = SystemTime::now();
        ledger.record(
            now,
            &name("alice"),
            &name("gpt-4o"),
            &name("openai"),
            4_000_000,
        );
        ledger.record(
            now,
            &name("bob"),
            &name("gpt-4o-mini"),
            &name("openai"),
            1_050,
        );
        ledger.record(
            now,
            &name("bob"),
            &name("gpt-4o"),
            &name("azure-eu"),
            5_000_000,
        );
        let by_client = ledger.report(Group::Client).await;
        assert_eq!(by_client.day, day_text(today()));
        assert_eq!(by_client.month, by_client.day[..7]);
        let keys = |report: &Report| {
            report
                .lines
                .iter()
                .map(|line| (line.key.clone(), line.this_month.nanos, line.today.requests))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            keys(&by_client),
            [
                ("bob".to_string(), 5_001_050, 2),
                ("alice".to_string(), 4_000_000, 1)
            ]
        );
        assert_eq!(
            keys(&ledger.report(Group::Model).await),
            [
                ("gpt-4o".to_string(), 9_000_000, 2),
                ("gpt-4o-mini".to_string(), 1_050, 1)
            ]
        );
        assert_eq!(
            keys(&ledger.report(Group::Upstream).await),
            [
                ("azure-eu".to_string(), 5_000_000, 1),
                ("openai".to_string(), 4_001_050, 2)
            ]
        );
    }

    #[tokio::test]
    async fn totals_of_another_day_are_not_today_but_count_for_their_month() {
        let ledger = local();
        let file = LedgerFile {
            version: 1,
            day: "1999-01-01".to_string(),
            month: day_text(today())[..7].to_string(),
            today: BTreeMap::from([(
                "client".to_string(),
                BTreeMap::from([(
                    "alice".to_string(),
                    Sum {
                        nanos: 7,
                        requests: 1,
                    },
                )]),
            )]),
            this_month: BTreeMap::from([(
                "client".to_string(),
                BTreeMap::from([(
                    "alice".to_string(),
                    Sum {
                        nanos: 9,
                        requests: 2,
                    },
                )]),
            )]),
        };
        ledger.restore(file);
        let report = ledger.report(Group::Client).await;
        assert_eq!(
            report.lines,
            [Line {
                key: "alice".to_string(),
                today: Sum::default(),
                this_month: Sum {
                    nanos: 9,
                    requests: 2
                },
            }]
        );
    }

    #[test]
    fn a_new_day_starts_today_from_zero_and_a_new_month_the_month_too() {
        let one = Sum {
            nanos: 5,
            requests: 1,
        };
        let key: Arc<str> = Arc::from("alice");
        let mut totals = Totals::default();
        // 2026-01-30, 2026-01-31, 2026-02-01.
        let jan30 = 20_483;
        totals.roll_to(jan30);
        add(&mut totals.groups[0], &key, one);
        add(&mut totals.groups[0], &key, one);
        totals.roll_to(jan30 + 1);
        assert_eq!(&*totals.day_text, "2026-01-31");
        add(&mut totals.groups[0], &key, one);
        let line = totals.groups[0][&*key];
        assert_eq!(line.today, one);
        assert_eq!(
            line.this_month,
            Sum {
                nanos: 15,
                requests: 3
            }
        );
        totals.roll_to(jan30 + 2);
        assert_eq!(&*totals.month_text, "2026-02");
        assert!(totals.groups.iter().all(|lines| lines.is_empty()));
    }

    #[test]
    fn a_hash_reads_back_into_sums() {
        let flat: Vec<String> = ["u:gpt-4o", "12", "r:gpt-4o", "3", "u:a:b", "5"]
            .iter()
            .map(ToString::to_string)
            .collect();
        let sums = from_hash(&flat);
        assert_eq!(
            sums["gpt-4o"],
            Sum {
                nanos: 12,
                requests: 3
            }
        );
        assert_eq!(
            sums["a:b"],
            Sum {
                nanos: 5,
                requests: 0
            }
        );
    }
}
