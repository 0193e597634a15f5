use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use std::io::Write as _;

use llm_proxy::access::ACCESS_TARGET;
use llm_proxy::config::LogFormat;
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
    let state = match AppState::new(config) {
        Ok(state) => state,
        Err(err) => {
            log::error!("start-up failed: {err}");
            return ExitCode::FAILURE;
        }
    };
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

/// One line on stderr; a JSON object when `LOG_FORMAT=json` was asked for, so a log pipeline
/// that expects JSON sees this line too.
fn report_configuration_error(err: &llm_proxy::config::ConfigError) {
    let json =
        std::env::var("LOG_FORMAT").is_ok_and(|format| format.trim().eq_ignore_ascii_case("json"));
    if json {
        let line = serde_json::json!({
            "time": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            "level": "ERROR",
            "target": "llm_proxy",
            "message": format!("configuration error: {err}"),
            "variable": err.variable,
        });
        eprintln!("{line}");
    } else {
        eprintln!("configuration error: {err}");
    }
}

/// Our own crate logs at the configured level; dependencies only at `warn`, because their debug
/// output is noise to an operator and is not reviewed for secrets the way ours is.
fn init_logging(config: &Config) {
    let level = if config.debug_mode {
        log::LevelFilter::Debug
    } else {
        config.log_level.as_filter()
    };
    let mut builder = match config.log_format {
        LogFormat::Text => pretty_env_logger::formatted_timed_builder(),
        LogFormat::Json => {
            let mut builder = pretty_env_logger::env_logger::Builder::new();
            builder.format(write_json_line);
            builder
        }
    };
    builder
        .filter_level(log::LevelFilter::Warn.min(level))
        .filter_module("llm_proxy", level)
        .init();
}

/// `LOG_FORMAT=json`: one JSON object per line. Access lines arrive as JSON objects already and
/// are spliced in, so their fields sit at the top level next to time and level.
fn write_json_line(
    out: &mut pretty_env_logger::env_logger::fmt::Formatter,
    record: &log::Record,
) -> std::io::Result<()> {
    let time = humantime::format_rfc3339_micros(std::time::SystemTime::now());
    let message = record.args().to_string();
    if record.target() == ACCESS_TARGET
        && let Some(fields) = message.strip_prefix('{')
    {
        return writeln!(
            out,
            "{{\"time\":\"{time}\",\"level\":\"{}\",\"target\":\"access\",{fields}",
            record.level()
        );
    }
    let line = serde_json::json!({
        "time": time.to_string(),
        "level": record.level().as_str(),
        "target": record.target(),
        "message": message,
    });
    writeln!(out, "{line}")
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
