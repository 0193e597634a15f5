#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use llm_proxy::ops::logging::{init_logging, report_configuration_error};
use llm_proxy::{AppState, Config};

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::load() {
        Ok(config) => config,
        Err(err) => {
            report_configuration_error(&err);
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    log::info!("configuration: {config:?}");

    let port = config.port;
    let state = AppState::new(config);
    let address = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let listener = match tokio::net::TcpListener::bind(address).await {
        Ok(listener) => listener,
        Err(err) => {
            log::error!("cannot listen on {address} (PROXY_PORT): {err}");
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(bound) => log::info!("listening on {bound}"),
        Err(_) => log::info!("listening on {address}"),
    }
    let (trigger, shutdown) = llm_proxy::server::shutdown_channel();
    tokio::spawn(forward_signals(trigger));
    llm_proxy::serve(listener, state, shutdown).await;
    log::info!("stopped");
    ExitCode::SUCCESS
}

/// Turns every SIGTERM or Ctrl-C into a shutdown request: the first drains, the second stops.
async fn forward_signals(trigger: llm_proxy::server::ShutdownTrigger) {
    #[cfg(unix)]
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => Some(signal),
            Err(err) => {
                log::error!("cannot listen for SIGTERM: {err}");
                None
            }
        };
    loop {
        #[cfg(unix)]
        let sigterm = async {
            match terminate.as_mut() {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let sigterm = std::future::pending::<()>();
        tokio::select! {
            result = tokio::signal::ctrl_c() => {
                if let Err(err) = result {
                    log::error!("cannot listen for Ctrl-C: {err}");
                    std::future::pending::<()>().await;
                }
                log::info!("Ctrl-C received");
            }
            () = sigterm => log::info!("SIGTERM received"),
        }
        trigger.trigger();
    }
}
