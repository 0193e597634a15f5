//! The budgets across restarts: `STATE_DIR/budgets.json`, written whole to a temporary file and
//! renamed over the old one (so a crash leaves the old or the new file, never half of one),
//! every second while counts move and once more at shutdown. Dollars are nano-dollars (spent,
//! and reserved by requests in flight when it was written); a file without them (written
//! before dollar budgets) reads as none spent.
//!
//! ```json
//! {"version":1,"day":"2026-12-01","tokens_today":{"alice":1234},
//!  "nanos_today":{"alice":1500000},"month":"2026-12","nanos_this_month":{"alice":42000000}}
//! ```

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::limiter::{Budgets, Limiter};
use crate::config::ConfigError;
use crate::vocab::calendar::{day_text, month_of, month_text};
use crate::vocab::price::Nanos;

const FILE: &str = "budgets.json";
pub const WRITE_EVERY: Duration = Duration::from_secs(1);

#[derive(Serialize, Deserialize)]
struct BudgetsFile {
    version: u32,
    day: String,
    tokens_today: BTreeMap<String, u64>,
    #[serde(default)]
    nanos_today: BTreeMap<String, Nanos>,
    /// The month of `day`, written for the reader: the counts are `day`'s month's.
    #[serde(default, skip_deserializing)]
    month: String,
    #[serde(default)]
    nanos_this_month: BTreeMap<String, Nanos>,
}

/// What a file in `STATE_DIR` keeps: the daily budgets, the spend ledger. Each is written whole
/// to a temporary file and renamed over the old one (so a crash leaves the old or the new file,
/// never half of one), every second while it moves and once more at shutdown.
pub trait Kept: Send + 'static {
    /// The file's name in `STATE_DIR`.
    const FILE: &'static str;
    /// What the file is for, in errors: "... are kept there across restarts".
    const WHAT: &'static str;
    /// Bumped by every change: a write is skipped when it did not move.
    fn generation(&self) -> u64;
    /// The file's content; `None`: nothing to write.
    fn contents(&self) -> serde_json::Result<Option<Vec<u8>>>;
    /// Takes back what an earlier process wrote; `Err` when it does not parse.
    fn restore(&self, bytes: &[u8], path: &Path) -> serde_json::Result<()>;
}

/// One [`Kept`] value and its file.
pub struct StateFile<K> {
    path: PathBuf,
    kept: K,
    written: u64,
}

pub type BudgetStore = StateFile<KeptBudgets>;

/// The limiter's daily and monthly counts, as `budgets.json` keeps them.
pub struct KeptBudgets(Arc<dyn Limiter>);

fn state_dir_error(dir: &Path, what: &str, kept: &str, err: impl std::fmt::Display) -> ConfigError {
    ConfigError {
        variable: "STATE_DIR".to_string(),
        message: format!(
            "{} {what}: {err}; {kept} are kept there across restarts",
            dir.display()
        ),
    }
}

fn day_number(text: &str) -> Option<u64> {
    let midnight = humantime::parse_rfc3339(&format!("{text}T00:00:00Z")).ok()?;
    Some(midnight.duration_since(UNIX_EPOCH).ok()?.as_secs() / (24 * 60 * 60))
}

impl Kept for KeptBudgets {
    const FILE: &'static str = FILE;
    const WHAT: &'static str = "budgets (tokens_per_day, usd_per_day, usd_per_month)";

    fn generation(&self) -> u64 {
        self.0.budget_generation()
    }

    fn contents(&self) -> serde_json::Result<Option<Vec<u8>>> {
        let Some(budgets) = self.0.budgets() else {
            return Ok(None);
        };
        serde_json::to_vec(&BudgetsFile {
            version: 1,
            day: day_text(budgets.day),
            tokens_today: budgets.tokens.into_iter().collect(),
            nanos_today: budgets.usd_today.into_iter().collect(),
            month: month_text(month_of(budgets.day)),
            nanos_this_month: budgets.usd_month.into_iter().collect(),
        })
        .map(Some)
    }

    fn restore(&self, bytes: &[u8], path: &Path) -> serde_json::Result<()> {
        let file: BudgetsFile = serde_json::from_slice(bytes)?;
        match day_number(&file.day) {
            Some(day) => self.0.restore_budgets(Budgets {
                day,
                tokens: file.tokens_today.into_iter().collect(),
                usd_today: file.nanos_today.into_iter().collect(),
                usd_month: file.nanos_this_month.into_iter().collect(),
            }),
            None => log::warn!("{}: unreadable day; starting from zero", path.display()),
        }
        Ok(())
    }
}

impl BudgetStore {
    /// Reads the counts kept in `dir` into `limiter` and proves the directory writable by
    /// writing them back: a budget that cannot be kept must stop start-up, not reset silently.
    pub fn open(dir: &Path, limiter: Arc<dyn Limiter>) -> Result<BudgetStore, ConfigError> {
        StateFile::open_in(dir, KeptBudgets(limiter))
    }
}

impl<K: Kept> StateFile<K> {
    /// Reads what `dir` keeps into `kept` and proves the directory writable by writing it back.
    /// A file that does not parse is kept aside, not overwritten: what is in it may be all an
    /// operator has to go on, and nothing may reset without a trace.
    pub fn open_in(dir: &Path, kept: K) -> Result<StateFile<K>, ConfigError> {
        let error =
            |what: &str, err: &dyn std::fmt::Display| state_dir_error(dir, what, K::WHAT, err);
        std::fs::create_dir_all(dir).map_err(|err| error("cannot be created", &err))?;
        let path = dir.join(K::FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                if let Err(err) = kept.restore(&bytes, &path) {
                    let aside = path.with_extension(format!(
                        "json.corrupt-{}",
                        SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .map_or(0, |since| since.as_secs())
                    ));
                    std::fs::rename(&path, &aside)
                        .map_err(|err| error("cannot be written", &err))?;
                    log::error!(
                        "{} cannot be parsed ({err}); kept as {} and the {} start from zero",
                        path.display(),
                        aside.display(),
                        K::WHAT
                    );
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(error("cannot be read", &err)),
        }
        let mut store = StateFile {
            path,
            kept,
            written: u64::MAX,
        };
        store
            .write()
            .map_err(|err| error("cannot be written", &err))?;
        Ok(store)
    }

    /// Writes what is kept if it moved since the last write.
    pub fn write_if_changed(&mut self) {
        if self.kept.generation() == self.written {
            return;
        }
        if let Err(err) = self.write() {
            log::error!(
                "cannot write {} (STATE_DIR): {err}; the {} would not survive a restart",
                self.path.display(),
                K::WHAT
            );
        }
    }

    pub fn write(&mut self) -> std::io::Result<()> {
        let generation = self.kept.generation();
        let Some(text) = self.kept.contents().map_err(std::io::Error::other)? else {
            return Ok(());
        };
        let temporary = self.path.with_extension("json.tmp");
        {
            let mut out = std::fs::File::create(&temporary)?;
            out.write_all(&text)?;
            out.sync_all()?;
        }
        std::fs::rename(&temporary, &self.path)?;
        self.written = generation;
        Ok(())
    }

    /// Writes every [`WRITE_EVERY`] until the task is dropped; the final write at shutdown is the
    /// caller's.
    pub async fn run(store: Arc<parking_lot::Mutex<StateFile<K>>>) {
        let mut tick = tokio::time::interval(WRITE_EVERY);
        loop {
            tick.tick().await;
            let store = store.clone();
            // File system calls block: off the request workers.
            let _ = tokio::task::spawn_blocking(move || store.lock().write_if_changed()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_round_trip_through_their_text() {
        assert_eq!(day_text(0), "1970-01-01");
        assert_eq!(
            day_number("2026-12-01").map(day_text).as_deref(),
            Some("2026-12-01")
        );
        assert_eq!(day_number("yesterday"), None);
    }

    #[test]
    fn a_state_file_that_does_not_parse_is_kept_aside_not_overwritten() {
        let dir = std::env::temp_dir().join(format!("llm-proxy-corrupt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(FILE), b"{\"version\":1,\"day\":").unwrap();
        let limiter: Arc<dyn Limiter> = Arc::new(super::super::memory::MemoryLimiter::new());
        BudgetStore::open(&dir, limiter).unwrap();
        let aside: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.file_name().to_string_lossy().contains(".corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1);
        assert_eq!(
            std::fs::read(aside[0].path()).unwrap(),
            b"{\"version\":1,\"day\":"
        );
        let rewritten: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(FILE)).unwrap()).unwrap();
        assert_eq!(rewritten["version"], 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_state_file_from_before_dollar_budgets_still_reads_and_dollars_are_kept() {
        let dir = std::env::temp_dir().join(format!("llm-proxy-old-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let today = day_text(crate::vocab::calendar::utc_day(SystemTime::now()));
        let old =
            format!("{{\"version\":1,\"day\":\"{today}\",\"tokens_today\":{{\"alice\":39}}}}");
        std::fs::write(dir.join(FILE), old).unwrap();
        let memory = super::super::memory::MemoryLimiter::new();
        let limiter: Arc<dyn Limiter> = Arc::new(memory.clone());
        let mut store = BudgetStore::open(&dir, limiter.clone()).unwrap();
        let usage = futures::executor::block_on(limiter.usage("alice"));
        assert_eq!((usage.tokens_today, usage.usd_today), (39, 0));
        let limits = crate::config::ClientLimits {
            usd_per_month: Some(1_000_000_000),
            ..crate::config::ClientLimits::default()
        };
        let (charge, _) =
            futures::executor::block_on(limiter.acquire("alice", &limits, 0, 2_500)).unwrap();
        limiter.settle("alice", &limits, charge, 0, 1_234);
        store.write().unwrap();
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(FILE)).unwrap()).unwrap();
        assert_eq!(written["tokens_today"]["alice"], 39);
        assert_eq!(written["nanos_today"]["alice"], 1_234);
        assert_eq!(written["nanos_this_month"]["alice"], 1_234);
        assert_eq!(written["month"], today[..7]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
