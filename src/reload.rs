//! Reloading what can change without a restart: the clients file, the upstreams and prices files
//! and the token settings (`ALLOWED_TOKENS`, `ADMIN_TOKEN`, `METRICS_TOKEN`), re-read on `SIGHUP`
//! and whenever one of those files changes.
//!
//! The whole configuration is loaded and validated again; only when that succeeds are the new
//! rules swapped in, in one step ([`crate::auth::Authenticator::replace`]). A request holds the
//! client it was admitted as for its whole life, so a reload never changes the rules under a
//! running stream. A configuration that fails is rejected whole: the old rules stay.
//!
//! The file's directory is watched rather than the file: editors and `mv` replace the file (a
//! watch on the old inode would go quiet), and a Kubernetes ConfigMap swaps a `..data` symlink
//! next to it. Should the watch fail to start, the file is polled every second instead.
//!
//! A clients file that disappears (deleted, a dangling link, no longer readable) is not taken
//! for "no clients": the clients loaded before stay in force, and an error line says so once
//! the file has been gone for [`GRACE`] and then every minute, with the
//! `llm_proxy_clients_file_missing` gauge at 1, until the file is back and loaded. A shorter
//! absence is not reported: a ConfigMap update or an editor's save may remove and re-create an
//! entry in a moment.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::auth::Authenticator;
use crate::auth::redact::Redactor;
use crate::config::UpstreamsConfig;
use crate::config::prices::unpriced;
use crate::config::{Client, Config, ConfigError};
use crate::ops::metrics::Metrics;
use crate::proxy::router::Router;
use crate::shared::Shared;

/// The variables as at start-up, read afresh: what `main` reloads is
/// [`crate::config::environment`], the environment over `.env.local` over `.env`.
pub type Source = Arc<dyn Fn() -> Result<HashMap<String, String>, ConfigError> + Send + Sync>;

/// The parts a reload swaps rules into or reports to, and the configuration it compares with.
/// Cloning the handles is shallow.
pub struct Reloadable {
    /// As loaded at start-up: the restart-only settings stay as they were then.
    pub config: Config,
    pub auth: Authenticator,
    /// Told about new secrets before they are accepted.
    pub redactor: Arc<Redactor>,
    pub metrics: Metrics,
    /// Whether the daily budgets are written to `STATE_DIR`.
    pub budgets_kept: Arc<AtomicBool>,
    /// The upstreams, swapped for the ones a changed `UPSTREAMS_FILE` describes.
    pub router: Router,
    pub shared: Shared,
}

/// Events closer together than this are one change (an editor writes, renames, chmods).
const SETTLE: Duration = Duration::from_millis(100);
const POLL: Duration = Duration::from_secs(1);
/// How long the clients file may be gone before that is reported.
pub const GRACE: Duration = Duration::from_secs(1);
/// While the file is missing, how often it is looked for: the watch may have gone with its
/// directory, or may never say that the file is back.
const LOOK_AGAIN: Duration = Duration::from_secs(1);
/// How often the error line of a missing file is repeated.
pub const MISSING_REPEAT: Duration = Duration::from_secs(60);
/// A test-only knob (not a setting, not in the README's table): [`MISSING_REPEAT`] in
/// milliseconds, so that a test can see the line repeated without waiting a minute.
pub const TEST_MISSING_REPEAT_VARIABLE: &str = "LLM_PROXY_TEST_CLIENTS_FILE_REPEAT_MS";

/// [`MISSING_REPEAT`], or the test knob's value.
fn missing_repeat() -> Duration {
    std::env::var(TEST_MISSING_REPEAT_VARIABLE)
        .ok()
        .and_then(|value| value.parse::<u64>().ok())
        .filter(|millis| *millis > 0)
        .map_or(MISSING_REPEAT, Duration::from_millis)
}

/// The clients file could not be read when last looked at.
struct Missing {
    since: Instant,
    /// Whether the error line and the gauge have said so (only after [`GRACE`]).
    reported: bool,
    /// When the error line is due: the end of the grace, then every [`missing_repeat`].
    due: Instant,
}

pub struct Reloader {
    state: Reloadable,
    source: Source,
    /// SHA-256 of the clients file as last loaded, so that events which leave it unchanged
    /// (another file in the directory, a touch) do not reload.
    loaded: Option<[u8; 32]>,
    hangups: Hangups,
    changes: mpsc::UnboundedReceiver<()>,
    /// For a new watch once a missing file is back: a watch on a directory that was removed
    /// with it has gone quiet.
    changed: mpsc::UnboundedSender<()>,
    /// Kept alive for as long as the reloader.
    watcher: Option<notify::RecommendedWatcher>,
    missing: Option<Missing>,
    repeat: Duration,
    /// The upstreams file and its keys files, each with its digest as last loaded and the
    /// watch of its directory: a change reloads, as one of the clients file does.
    routing_files: Vec<Watched>,
}

struct Watched {
    path: PathBuf,
    loaded: Option<[u8; 32]>,
    _watcher: Option<notify::RecommendedWatcher>,
}

/// The files of the routing configuration: `UPSTREAMS_FILE` and every `keys_file` it names,
/// `PRICES_FILE`, and the `prices_file` either of them names.
fn routing_paths(config: &Config) -> Vec<PathBuf> {
    config
        .upstreams
        .file
        .iter()
        .cloned()
        .chain(
            config
                .upstreams
                .list
                .iter()
                .filter_map(|upstream| upstream.keys_file.clone()),
        )
        .chain(config.prices_file.clone())
        .chain(config.upstreams.litellm_file.clone())
        .collect()
}

/// Never a silent $0: one line naming the routed models that have no price (see
/// [`crate::config::prices::unpriced`]), nothing when every one has; or, with no price at all,
/// that spend is not tracked, said once rather than after every reload (`said_untracked`: the
/// prices in force until now had none either).
pub fn report_prices(upstreams: &UpstreamsConfig, said_untracked: bool) {
    if upstreams.prices.is_empty() {
        if !said_untracked {
            log::info!(
                "prices: none configured, spend is not tracked (PRICES_FILE, or [prices] in \
                 UPSTREAMS_FILE, sets them)"
            );
        }
        return;
    }
    let missing = unpriced(upstreams);
    if !missing.is_empty() {
        log::warn!("prices: no price for {}", missing.join(", "));
    }
}

fn watch_all(paths: Vec<PathBuf>, changed: &mpsc::UnboundedSender<()>) -> Vec<Watched> {
    paths
        .into_iter()
        .map(|path| {
            let watcher = watch(&path, changed.clone());
            if watcher.is_none() {
                tokio::spawn(poll(path.clone(), changed.clone()));
            }
            Watched {
                loaded: file_digest(&path),
                path,
                _watcher: watcher,
            }
        })
        .collect()
}

fn read_digest(path: &Path) -> std::io::Result<[u8; 32]> {
    std::fs::read(path).map(|bytes| Sha256::digest(bytes).into())
}

fn file_digest(path: &Path) -> Option<[u8; 32]> {
    read_digest(path).ok()
}

impl Reloader {
    /// From here on `SIGHUP` is this reloader's (it no longer ends the process), and changes
    /// of the clients file are noticed; [`Reloader::run`] acts on them.
    pub fn new(state: Reloadable, source: Source) -> Reloader {
        let file = state.config.clients_file.clone();
        let loaded = file.as_deref().and_then(file_digest);
        let (changed, changes) = mpsc::unbounded_channel::<()>();
        let watcher = file
            .as_deref()
            .and_then(|file| watch(file, changed.clone()));
        if let Some(file) = file.filter(|_| watcher.is_none()) {
            tokio::spawn(poll(file, changed.clone()));
        }
        let routing_files = watch_all(routing_paths(&state.config), &changed);
        Reloader {
            state,
            source,
            loaded,
            hangups: hangups(),
            changes,
            changed,
            watcher,
            missing: None,
            repeat: missing_repeat(),
            routing_files,
        }
    }

    /// Loads, validates and swaps in; `false` (and an error line) when the new configuration
    /// was rejected and the old one kept.
    pub fn reload(&mut self, why: &str) -> bool {
        let clients_file = self.state.config.clients_file.clone();
        let upstreams_file = self.state.config.upstreams.file.clone();
        let prices_file = self.state.config.prices_file.clone();
        let digest = clients_file.as_deref().and_then(file_digest);
        let routing_digests: Vec<_> = self
            .routing_files
            .iter()
            .map(|watched| file_digest(&watched.path))
            .collect();
        // The files being watched are the ones read: a new CLIENTS_FILE or UPSTREAMS_FILE waits
        // for a restart.
        let loaded = (self.source)().and_then(|variables| {
            let named = |variable: &str| {
                variables
                    .get(variable)
                    .map(|value| value.trim())
                    .filter(|value| !value.is_empty())
                    .map(PathBuf::from)
            };
            if named("CLIENTS_FILE") != clients_file {
                log::warn!("CLIENTS_FILE changed: it takes effect only after a restart");
            }
            if named("UPSTREAMS_FILE") != upstreams_file {
                log::warn!("UPSTREAMS_FILE changed: it takes effect only after a restart");
            }
            if named("PRICES_FILE") != prices_file {
                log::warn!("PRICES_FILE changed: it takes effect only after a restart");
            }
            Config::from_lookup(|name| match name {
                "CLIENTS_FILE" => clients_file.as_ref().map(|path| path.display().to_string()),
                "UPSTREAMS_FILE" => upstreams_file
                    .as_ref()
                    .map(|path| path.display().to_string()),
                "PRICES_FILE" => prices_file.as_ref().map(|path| path.display().to_string()),
                _ => variables.get(name).cloned(),
            })
        });
        let untracked_before = self.state.router.table().prices().is_empty();
        // The upstreams are built before anything is swapped in: a configuration whose
        // upstreams cannot be built is rejected whole.
        let loaded = loaded.and_then(|config| {
            self.state
                .router
                .reload(
                    &config,
                    self.state.metrics.clone(),
                    self.state.redactor.clone(),
                    &self.state.shared,
                )
                .map(|()| config)
        });
        let config = match loaded {
            Ok(config) => config,
            Err(err) => {
                // Not tried again until a file changes again (or SIGHUP).
                self.loaded = digest;
                for (watched, digest) in self.routing_files.iter_mut().zip(routing_digests) {
                    watched.loaded = digest;
                }
                log::error!(
                    "reload ({why}) rejected, the previous clients, upstreams and prices stay in \
                     force: {err}"
                );
                self.state.metrics.reload(false);
                return false;
            }
        };
        for variable in self.state.config.changed_restart_only(&config) {
            log::warn!("{variable} changed: it takes effect only after a restart");
        }
        self.loaded = digest;
        if config
            .clients
            .iter()
            .any(|client| client.limits.has_budget())
            && !self.state.budgets_kept.load(Ordering::Relaxed)
        {
            log::warn!(
                "a budget (tokens_per_day, usd_per_day or usd_per_month) was added by a reload: it \
                 is enforced, but kept across restarts (STATE_DIR) only after a restart"
            );
        }
        // Masked before accepted: a new token must never be in force while a debug log could
        // still print it.
        self.state.redactor.add_secrets(&config);
        self.state.auth.replace(&config);
        report_budgets(&self.state.metrics, &config.clients);
        self.state.metrics.reload(true);
        // A keys file added or dropped by the new upstreams file is watched from now on.
        let paths = routing_paths(&config);
        if paths
            .iter()
            .ne(self.routing_files.iter().map(|watched| &watched.path))
        {
            self.routing_files = watch_all(paths, &self.changed);
        } else {
            for (watched, digest) in self.routing_files.iter_mut().zip(routing_digests) {
                watched.loaded = digest;
            }
        }
        log::info!(
            "reloaded ({why}): {} clients, {} upstreams",
            config.clients.len(),
            config.upstreams.list.len()
        );
        report_prices(&config.upstreams, untracked_before);
        true
    }

    /// Reloads on every `SIGHUP` and every change of the clients file, until the process ends.
    pub async fn run(mut self) {
        let watched = self.state.config.clients_file.clone();
        let mut hangups = std::mem::take(&mut self.hangups);
        loop {
            // Only while the file is missing: when to look for it again or repeat the error.
            let wake = self
                .missing
                .as_ref()
                .map(|missing| missing.due.min(Instant::now() + LOOK_AGAIN));
            tokio::select! {
                () = next_hangup(&mut hangups) => {
                    log::info!("SIGHUP received: reloading");
                    self.reload("SIGHUP");
                }
                Some(()) = self.changes.recv() => {
                    tokio::time::sleep(SETTLE).await;
                    while self.changes.try_recv().is_ok() {}
                    if self.routing_changed() {
                        self.reload("upstreams or prices file changed");
                    } else if let Some(file) = &watched {
                        self.look(file);
                    }
                }
                () = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                    if let Some(file) = &watched {
                        self.look(file);
                    }
                }
            }
        }
    }

    /// Whether the upstreams file or one of its keys files differs from the one loaded. One
    /// that cannot be read counts as changed: the reload then fails and says why, keeping the
    /// upstreams in force.
    fn routing_changed(&self) -> bool {
        self.routing_files
            .iter()
            .any(|watched| file_digest(&watched.path) != watched.loaded)
    }

    /// After a change in the file's directory, or while the file is missing: reloads when the
    /// file differs from the one loaded, and keeps account of its absence.
    fn look(&mut self, file: &Path) {
        let now = Instant::now();
        match read_digest(file) {
            Ok(digest) => {
                let why = match self.missing.take() {
                    Some(missing) if missing.reported => {
                        self.state.metrics.clients_file_missing(false);
                        log::info!(
                            "CLIENTS_FILE {} is back after {}: loading it",
                            file.display(),
                            humantime::format_duration(rounded(now - missing.since))
                        );
                        if self.watcher.is_some() {
                            self.watcher = watch(file, self.changed.clone());
                            if self.watcher.is_none() {
                                tokio::spawn(poll(file.to_path_buf(), self.changed.clone()));
                            }
                        }
                        "clients file is back"
                    }
                    _ => "clients file changed",
                };
                if Some(digest) != self.loaded {
                    self.reload(why);
                }
            }
            Err(err) => {
                let missing = self.missing.get_or_insert(Missing {
                    since: now,
                    reported: false,
                    due: now + GRACE,
                });
                if now < missing.due {
                    return;
                }
                if !missing.reported {
                    missing.reported = true;
                    self.state.metrics.clients_file_missing(true);
                }
                missing.due = now + self.repeat;
                // Whatever comes back is loaded, even the very file that went.
                self.loaded = None;
                log::error!(
                    "CLIENTS_FILE {} cannot be read ({err}) for {}: the clients loaded before \
                     stay in force until it is back; said again every {}",
                    file.display(),
                    humantime::format_duration(rounded(now - missing.since)),
                    humantime::format_duration(self.repeat)
                );
            }
        }
    }
}

/// To the millisecond: the log says "1s 3ms", not nine digits of nanoseconds.
fn rounded(duration: Duration) -> Duration {
    Duration::from_millis(duration.as_millis() as u64)
}

fn watch(file: &Path, changed: mpsc::UnboundedSender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let directory: PathBuf = match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let names = watched_names(file);
    let handler = move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && concerns(&event, &names)
        {
            let _ = changed.send(());
        }
    };
    let started = notify::recommended_watcher(handler).and_then(|mut watcher| {
        watcher.watch(&directory, notify::RecursiveMode::NonRecursive)?;
        Ok(watcher)
    });
    match started {
        Ok(watcher) => Some(watcher),
        Err(err) => {
            log::warn!(
                "cannot watch {} for changes ({err}); polling {} every second",
                directory.display(),
                file.display()
            );
            None
        }
    }
}

/// The directory entries whose change can change the clients file: its own name, the file a
/// symlink of that name points at (when it is in the same directory), and the `..`-names a
/// Kubernetes ConfigMap swaps (`..data`, `..2026_12_01...`).
fn watched_names(file: &Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<std::ffi::OsString> = file.file_name().map(Into::into).into_iter().collect();
    if let Ok(target) = std::fs::read_link(file)
        && target
            .parent()
            .is_none_or(|parent| parent.as_os_str().is_empty())
        && let Some(name) = target.file_name()
    {
        names.push(name.into());
    }
    names
}

/// Whether an event in the watched directory may have changed the clients file. Everything else
/// there (a log file written next to it, say, thousands of times a second) is not worth
/// re-reading and hashing the whole file for. Opening or reading a file changes nothing, and
/// inotify reports every open: counting them, each look at the file (its digest is read on
/// every wake-up) would wake the reloader again, re-reading and hashing the watched files about
/// ten times a second for the life of the process.
fn concerns(event: &notify::Event, names: &[std::ffi::OsString]) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    if let EventKind::Access(access) = event.kind
        && access != AccessKind::Close(AccessMode::Write)
        && !event.need_rescan()
    {
        return false;
    }
    event.need_rescan()
        || event.paths.is_empty()
        || event.paths.iter().any(|path| {
            path.file_name().is_none_or(|name| {
                names.iter().any(|watched| watched == name)
                    || name.as_encoded_bytes().starts_with(b"..")
            })
        })
}

async fn poll(file: PathBuf, changed: mpsc::UnboundedSender<()>) {
    let mut last = file_digest(&file);
    loop {
        tokio::time::sleep(POLL).await;
        let now = file_digest(&file);
        if now != last {
            last = now;
            if changed.send(()).is_err() {
                return;
            }
        }
    }
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = ();

fn hangups() -> Hangups {
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(err) => {
            log::error!("cannot listen for SIGHUP: {err}");
            None
        }
    }
}

async fn next_hangup(hangups: &mut Hangups) {
    #[cfg(unix)]
    match hangups {
        Some(signal) => {
            if signal.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
    #[cfg(not(unix))]
    {
        let () = hangups;
        std::future::pending().await
    }
}

/// The dollar budgets of `clients` as the `llm_proxy_client_budget_usd` gauge: at start-up and
/// on every reload, so that a dashboard draws the budget the proxy enforces.
pub(crate) fn report_budgets(metrics: &Metrics, clients: &[Client]) {
    metrics.client_budgets(clients.iter().flat_map(|client| {
        let limits = &client.limits;
        [("day", limits.usd_per_day), ("month", limits.usd_per_month)]
            .into_iter()
            .filter_map(move |(period, budget)| Some((&client.name, period, budget?)))
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RenameMode};

    fn event(kind: EventKind, paths: &[&str]) -> notify::Event {
        paths.iter().fold(notify::Event::new(kind), |event, path| {
            event.add_path(path.into())
        })
    }

    #[test]
    fn only_events_that_can_change_the_clients_file_count() {
        let names = watched_names(Path::new("/etc/llm-proxy/clients.toml"));
        let written = EventKind::Modify(ModifyKind::Any);
        assert!(concerns(
            &event(written, &["/etc/llm-proxy/clients.toml"]),
            &names
        ));
        let renamed = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        let over = event(
            renamed,
            &["/etc/llm-proxy/clients.new", "/etc/llm-proxy/clients.toml"],
        );
        assert!(concerns(&over, &names), "a file renamed over it");
        let swap = event(
            EventKind::Create(CreateKind::Any),
            &["/etc/llm-proxy/..data"],
        );
        assert!(concerns(&swap, &names), "a ConfigMap's ..data swap");
        assert!(
            concerns(&event(EventKind::Any, &[]), &names),
            "no paths: look"
        );

        assert!(!concerns(
            &event(written, &["/etc/llm-proxy/proxy.log"]),
            &names
        ));
        assert!(!concerns(
            &event(written, &["/etc/llm-proxy/clients.toml.swp"]),
            &names
        ));

        // Opened or read (the reloader's own look among them): nothing changed. Closed after
        // writing: it may have.
        for read in [
            AccessKind::Open(AccessMode::Any),
            AccessKind::Read,
            AccessKind::Close(AccessMode::Read),
        ] {
            assert!(
                !concerns(
                    &event(EventKind::Access(read), &["/etc/llm-proxy/clients.toml"]),
                    &names
                ),
                "{read:?}"
            );
        }
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert!(concerns(
            &event(closed, &["/etc/llm-proxy/clients.toml"]),
            &names
        ));
    }

    #[cfg(unix)]
    #[test]
    fn a_symlinks_target_next_to_it_is_watched_too() {
        let dir = std::env::temp_dir().join(format!("llm-proxy-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join("clients.toml");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("clients-v2.toml", &link).unwrap();
        let names = watched_names(&link);
        let written = EventKind::Modify(ModifyKind::Any);
        let target = dir.join("clients-v2.toml");
        assert!(concerns(
            &event(written, &[target.to_str().unwrap()]),
            &names
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
