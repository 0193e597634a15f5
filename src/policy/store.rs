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
struct StateFile {
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

pub struct BudgetStore {
    path: PathBuf,
    limiter: Arc<dyn Limiter>,
    written: u64,
}

fn state_dir_error(dir: &Path, what: &str, err: impl std::fmt::Display) -> ConfigError {
    ConfigError {
        variable: "STATE_DIR".to_string(),
        message: format!(
            "{} {what}: {err}; budgets (tokens_per_day, usd_per_day, usd_per_month) are kept \
             there across restarts",
            dir.display()
        ),
    }
}

fn day_number(text: &str) -> Option<u64> {
    let midnight = humantime::parse_rfc3339(&format!("{text}T00:00:00Z")).ok()?;
    Some(midnight.duration_since(UNIX_EPOCH).ok()?.as_secs() / (24 * 60 * 60))
}

impl BudgetStore {
    /// Reads the counts kept in `dir` into `limiter` and proves the directory writable by
    /// writing them back: a budget that cannot be kept must stop start-up, not reset silently.
    pub fn open(dir: &Path, limiter: Arc<dyn Limiter>) -> Result<BudgetStore, ConfigError> {
        std::fs::create_dir_all(dir)
            .map_err(|err| state_dir_error(dir, "cannot be created", err))?;
        let path = dir.join(FILE);
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<StateFile>(&bytes) {
                Ok(file) => match day_number(&file.day) {
                    Some(day) => limiter.restore_budgets(Budgets {
                        day,
                        tokens: file.tokens_today.into_iter().collect(),
                        usd_today: file.nanos_today.into_iter().collect(),
                        usd_month: file.nanos_this_month.into_iter().collect(),
                    }),
                    None => log::warn!("{}: unreadable day; starting from zero", path.display()),
                },
                Err(err) => {
                    // Kept aside rather than overwritten below: the counts in it may be all an
                    // operator has to go on, and a budget must not reset without a trace.
                    let aside = path.with_extension(format!(
                        "json.corrupt-{}",
                        SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .map_or(0, |since| since.as_secs())
                    ));
                    std::fs::rename(&path, &aside)
                        .map_err(|err| state_dir_error(dir, "cannot be written", err))?;
                    log::error!(
                        "{} cannot be parsed ({err}); kept as {} and daily budgets start from zero",
                        path.display(),
                        aside.display()
                    );
                }
            },
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(state_dir_error(dir, "cannot be read", err)),
        }
        let mut store = BudgetStore {
            path,
            limiter,
            written: u64::MAX,
        };
        store
            .write()
            .map_err(|err| state_dir_error(dir, "cannot be written", err))?;
        Ok(store)
    }

    /// Writes the counts if they moved since the last write.
    pub fn write_if_changed(&mut self) {
        if self.limiter.budget_generation() == self.written {
            return;
        }
        if let Err(err) = self.write() {
            log::error!(
                "cannot write {} (STATE_DIR): {err}; the daily budgets would not survive a restart",
                self.path.display()
            );
        }
    }

    pub fn write(&mut self) -> std::io::Result<()> {
        let generation = self.limiter.budget_generation();
        let Some(budgets) = self.limiter.budgets() else {
            return Ok(());
        };
        let file = StateFile {
            version: 1,
            day: day_text(budgets.day),
            tokens_today: budgets.tokens.into_iter().collect(),
            nanos_today: budgets.usd_today.into_iter().collect(),
            month: month_text(month_of(budgets.day)),
            nanos_this_month: budgets.usd_month.into_iter().collect(),
        };
        let text = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
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
    pub async fn run(store: Arc<parking_lot::Mutex<BudgetStore>>) {
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
