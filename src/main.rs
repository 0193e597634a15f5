#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use llm_proxy::cli::{self, Command};
use llm_proxy::config::{self, LogFormat};
use llm_proxy::ops::logging::{init_logging, report_configuration_error};
use llm_proxy::policy::MemoryLimiter;
use llm_proxy::policy::ledger::LedgerStore;
use llm_proxy::policy::store::BudgetStore;
use llm_proxy::reload::Reloader;
use llm_proxy::server::{descriptors, listener};
use llm_proxy::{AppState, Config};

fn main() -> ExitCode {
    match cli::parse(std::env::args_os().skip(1)) {
        Ok(Command::Serve) => serve(),
        Ok(Command::Help) => {
            print!("{}", cli::help());
            ExitCode::SUCCESS
        }
        Ok(Command::Version) => {
            println!("{}", cli::version());
            ExitCode::SUCCESS
        }
        Ok(Command::Healthcheck) => match runtime(Some(1)) {
            Ok(runtime) => runtime.block_on(cli::healthcheck()),
            Err(err) => {
                eprintln!("cannot start the runtime: {err}");
                ExitCode::FAILURE
            }
        },
        Err(err) => {
            eprintln!("{err}; see --help");
            ExitCode::from(2)
        }
    }
}

/// A multi-threaded runtime of `workers` threads; `None`: tokio's default, one per core the
/// process may run on (or `TOKIO_WORKER_THREADS`).
fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = workers {
        builder.worker_threads(workers);
    }
    builder.enable_all().build()
}

/// The configuration is read before the runtime exists: `WORKER_THREADS` sizes it.
fn serve() -> ExitCode {
    let variables = match config::environment() {
        Ok(variables) => variables,
        Err(err) => {
            // A `.env` that cannot be read says nothing; the process environment still may.
            let format = LogFormat::asked_for(|name| std::env::var(name).ok());
            report_configuration_error(&err, format);
            return ExitCode::from(2);
        }
    };
    let config = match Config::from_lookup(|name| variables.get(name).cloned()) {
        Ok(config) => config,
        Err(err) => {
            let format = LogFormat::asked_for(|name| variables.get(name).cloned());
            report_configuration_error(&err, format);
            return ExitCode::from(2);
        }
    };
    match runtime(config.worker_threads) {
        Ok(runtime) => runtime.block_on(run(config, variables)),
        Err(err) => {
            eprintln!("cannot start the runtime (WORKER_THREADS): {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, variables: HashMap<String, String>) -> ExitCode {
    init_logging(&config);
    log::info!("configuration: {config:?}");
    warn_about_risky_settings(&config, variables.into_keys());
    llm_proxy::reload::report_prices(&config.upstreams, false);
    descriptors::raise_limit(config.limits.max_concurrent_requests);

    let address = SocketAddr::new(config.host, config.port);
    // With Redis the daily budgets live there (shared by every replica, kept across restarts
    // by Redis itself); without it they are this process's, read back from `STATE_DIR`.
    let in_redis = config.shared.redis.is_some();
    let limiter = Arc::new(MemoryLimiter::new());
    // Budgets are read back before the first request, and a budget that could not be kept
    // stops start-up rather than silently resetting at every restart.
    let store = if !in_redis
        && config
            .clients
            .iter()
            .any(|client| client.limits.has_budget())
    {
        match BudgetStore::open(&config.state_dir, limiter.clone()) {
            Ok(store) => Some(Arc::new(parking_lot::Mutex::new(store))),
            Err(err) => {
                report_configuration_error(&err, config.log_format);
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let format = config.log_format;
    let state = match AppState::with_limiter(config, |shared| {
        if in_redis {
            llm_proxy::state::default_limiter(shared)
        } else {
            limiter
        }
    }) {
        Ok(state) => state,
        Err(err) => {
            report_configuration_error(&err, format);
            return ExitCode::from(2);
        }
    };
    if store.is_some() || in_redis {
        state.keep_budgets();
    }
    if in_redis {
        log::info!(
            "per-client limits and daily budgets are kept in Redis (REDIS_URL), shared by every \
             replica using it; STATE_DIR is not used for budgets"
        );
    }
    // The spend ledger is kept beside the budgets once there are prices to spend by; with Redis
    // it is kept there.
    let ledger_store = if !in_redis && !state.router.table().prices().is_empty() {
        match LedgerStore::open(&state.config.state_dir, state.policy.ledger().clone()) {
            Ok(store) => Some(Arc::new(parking_lot::Mutex::new(store))),
            Err(err) => {
                report_configuration_error(&err, format);
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let ledger_writer = ledger_store
        .clone()
        .map(|store| tokio::spawn(LedgerStore::run(store)));
    let reloader = Reloader::new(state.reloadable(), Arc::new(config::environment));
    tokio::spawn(reloader.run());
    let writer = store
        .clone()
        .map(|store| tokio::spawn(BudgetStore::run(store)));
    // The start-up log says which mode the shared state begins in.
    state.shared.first_contact().await;
    // The rests and open breakers the other replicas recorded are known before the first
    // request; bounded, so that a subscriber that cannot connect never holds start-up.
    if state.shared.mode() == llm_proxy::shared::Mode::Shared {
        let bound = llm_proxy::shared::CONNECT_TIMEOUT * 2;
        let _ = tokio::time::timeout(bound, state.signals.caught_up()).await;
    }
    let listener = match listener::bind(address) {
        Ok(listener) => listener,
        Err(err) => {
            log::error!("cannot listen on {address} (PROXY_HOST, PROXY_PORT): {err}");
            return ExitCode::FAILURE;
        }
    };
    // The handlers are in place before "listening on" is logged: whoever waits for that line
    // and then sends SIGTERM must get the drain, not the default action.
    let (trigger, shutdown) = llm_proxy::server::shutdown_channel();
    tokio::spawn(forward_signals(trigger));
    match listener.local_addr() {
        Ok(bound) => log::info!("listening on {bound}"),
        Err(_) => log::info!("listening on {address}"),
    }
    llm_proxy::serve(listener, state.clone(), shutdown).await;
    state.policy.limiter().flush().await;
    state.policy.ledger().flush().await;
    if let Some(writer) = ledger_writer {
        writer.abort();
    }
    if let Some(store) = ledger_store
        && let Err(err) = store.lock().write()
    {
        log::error!("cannot write the spend ledger to STATE_DIR at shutdown: {err}");
    }
    // The last second's counts of the status page's hour, for the replicas that stay.
    let _ = state.activity.flush().await;
    if let Some(writer) = writer {
        writer.abort();
    }
    // After the drain: the streams that ran to the end have settled.
    if let Some(store) = store
        && let Err(err) = store.lock().write()
    {
        log::error!("cannot write the daily budgets to STATE_DIR at shutdown: {err}");
    }
    log::info!("stopped");
    ExitCode::SUCCESS
}

/// One warning per line for what is probably a mistake: a misspelt variable (ignored, so the
/// setting it was meant for keeps its default) and an open proxy reachable from the network.
fn warn_about_risky_settings(config: &Config, names: impl IntoIterator<Item = String>) {
    for (name, meant) in cli::misspelt_variables(names) {
        log::warn!("{name} is not a setting of this proxy and is ignored; did you mean {meant}?");
    }
    if !config.auth_validation && !listener::is_loopback_only(config.host) {
        log::warn!(
            "AUTH_VALIDATION is off and PROXY_HOST={} is not loopback-only: anyone who can \
             reach this port spends the upstream key",
            config.host
        );
    }
}

/// Turns every SIGTERM or Ctrl-C into a shutdown request: the first drains, the second stops.
/// Both handlers are installed when this is called, not when the returned future first runs.
fn forward_signals(
    trigger: llm_proxy::server::ShutdownTrigger,
) -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let listen = |kind: tokio::signal::unix::SignalKind, name: &str| {
        tokio::signal::unix::signal(kind)
            .map_err(|err| log::error!("cannot listen for {name}: {err}"))
            .ok()
    };
    #[cfg(unix)]
    let (mut terminate, mut interrupt) = (
        listen(tokio::signal::unix::SignalKind::terminate(), "SIGTERM"),
        listen(tokio::signal::unix::SignalKind::interrupt(), "Ctrl-C"),
    );
    async move {
        loop {
            #[cfg(unix)]
            let (sigterm, sigint) = (next(terminate.as_mut()), next(interrupt.as_mut()));
            #[cfg(not(unix))]
            let (sigterm, sigint) = (std::future::pending::<()>(), async {
                if tokio::signal::ctrl_c().await.is_err() {
                    std::future::pending::<()>().await;
                }
            });
            tokio::select! {
                () = sigint => log::info!("Ctrl-C received"),
                () = sigterm => log::info!("SIGTERM received"),
            }
            trigger.trigger();
        }
    }
}

/// The next delivery of `signal`; never, when it could not be listened for.
#[cfg(unix)]
async fn next(signal: Option<&mut tokio::signal::unix::Signal>) {
    match signal {
        Some(signal) => {
            signal.recv().await;
        }
        None => std::future::pending().await,
    }
}
