//! Logging: our own crate at the configured level, text or one JSON object per line, and the one
//! line a configuration error gets before logging is set up.

use std::io::{IsTerminal as _, Write as _};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::access::ACCESS_TARGET;
use crate::config::{Config, ConfigError, LogFormat};

/// One line on stderr; a JSON object when `LOG_FORMAT=json` was asked for (in the environment or
/// the `.env` files), so a log pipeline that expects JSON sees this line too.
pub fn report_configuration_error(err: &ConfigError, format: LogFormat) {
    let message = format!("configuration error: {err}");
    match format {
        LogFormat::Json => eprintln!(
            "{}",
            json_line(log::Level::Error, &message, Some(&err.variable))
        ),
        LogFormat::Text => eprintln!("{message}"),
    }
}

/// A line written before logging is set up (`healthcheck`), in the format asked for: the
/// message as it is, or a JSON object with the time and level.
pub fn standalone_line(format: LogFormat, level: log::Level, message: &str) -> String {
    match format {
        LogFormat::Json => json_line(level, message, None),
        LogFormat::Text => message.to_string(),
    }
}

fn json_line(level: log::Level, message: &str, variable: Option<&str>) -> String {
    let mut line = serde_json::json!({
        "time": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
        "level": level.as_str(),
        "target": "llm_proxy",
        "message": message,
    });
    if let Some(variable) = variable {
        line["variable"] = variable.into();
    }
    line.to_string()
}

/// Our own crate logs at the configured level; dependencies only at `warn`, because their debug
/// output is noise to an operator and is not reviewed for secrets the way ours is.
pub fn init_logging(config: &Config) {
    let level = if config.debug_mode {
        log::LevelFilter::Debug
    } else {
        config.log_level.as_filter()
    };
    let mut builder = match config.log_format {
        // On a terminal, pretty_env_logger's colours; into a file or a pipe (every deployment),
        // the same line without them, written by a formatter that costs a third as much.
        LogFormat::Text if std::io::stderr().is_terminal() => {
            pretty_env_logger::formatted_timed_builder()
        }
        LogFormat::Text => {
            let mut builder = pretty_env_logger::env_logger::Builder::new();
            builder
                .format(write_text_line)
                .write_style(pretty_env_logger::env_logger::WriteStyle::Never);
            builder
        }
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

/// pretty_env_logger's line without colours: ` {time} {LEVEL} {target} > {message}`, the target
/// padded to the longest seen so far so that messages line up.
fn write_text_line(
    out: &mut pretty_env_logger::env_logger::fmt::Formatter,
    record: &log::Record,
) -> std::io::Result<()> {
    static TARGET_WIDTH: AtomicUsize = AtomicUsize::new(0);
    let target = record.target();
    let width = TARGET_WIDTH
        .fetch_max(target.len(), Ordering::Relaxed)
        .max(target.len());
    let level = match record.level() {
        log::Level::Error => "ERROR",
        log::Level::Warn => "WARN ",
        log::Level::Info => "INFO ",
        log::Level::Debug => "DEBUG",
        log::Level::Trace => "TRACE",
    };
    let time = out.timestamp_millis();
    write!(out, " {time} ")?;
    out.write_all(level.as_bytes())?;
    out.write_all(b" ")?;
    out.write_all(target.as_bytes())?;
    const SPACES: &[u8] = &[b' '; 64];
    let mut padding = width - target.len();
    while padding > 0 {
        let run = padding.min(SPACES.len());
        out.write_all(&SPACES[..run])?;
        padding -= run;
    }
    out.write_all(b" > ")?;
    match record.args().as_str() {
        Some(message) => out.write_all(message.as_bytes())?,
        None => out.write_fmt(*record.args())?,
    }
    out.write_all(b"\n")
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
