//! The command line: serving is the default; `--help`, `--version` and `healthcheck` need no
//! configuration beyond the listen address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use crate::config::{self, LogFormat, Settings, variables};
use crate::ops::logging::standalone_line;

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Serve,
    Help,
    Version,
    Healthcheck,
}

/// The command the arguments (program name excluded) ask for; anything unknown is an error, so a
/// typo never starts a server the operator did not mean to start. Arguments that are not UTF-8
/// are unknown too, never a panic.
pub fn parse<A: Into<std::ffi::OsString>>(
    args: impl IntoIterator<Item = A>,
) -> Result<Command, String> {
    let args: Vec<String> = args
        .into_iter()
        .map(|arg| arg.into().to_string_lossy().into_owned())
        .collect();
    match args.as_slice() {
        [] => Ok(Command::Serve),
        [one] => match one.as_str() {
            "-h" | "--help" | "help" => Ok(Command::Help),
            "-V" | "--version" => Ok(Command::Version),
            "healthcheck" => Ok(Command::Healthcheck),
            other => Err(format!("unknown argument {other:?}")),
        },
        _ => Err(format!("unexpected arguments {args:?}")),
    }
}

/// `--help`: what the program is and every variable with its default.
pub fn help() -> String {
    let mut text = format!(
        "{name} {version}: {description}\n\n\
         Usage:\n  {name}               serve (configured by environment variables, then .env.local, then .env)\n  \
         {name} healthcheck   ask the running proxy's /healthz; exit 0 when healthy, 1 otherwise\n  \
         {name} --help        this text\n  {name} --version     the name and version\n\n\
         Variables (default):\n",
        name = env!("CARGO_PKG_NAME"),
        version = env!("CARGO_PKG_VERSION"),
        description = env!("CARGO_PKG_DESCRIPTION"),
    );
    let width = variables::VARIABLES
        .iter()
        .map(|variable| variable.name.len())
        .max()
        .unwrap_or(0);
    for variable in variables::VARIABLES {
        text.push_str(&format!(
            "  {:width$}  {} [default: {}]\n",
            variable.name,
            variable.meaning,
            variable.default.shown()
        ));
    }
    text
}

pub fn version() -> String {
    format!("{} {}", env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
}

/// Asks the proxy listening on `PROXY_HOST`:`PROXY_PORT` for `/healthz`: exit 0 when it answers
/// 200 within a few seconds, 1 otherwise. For a `HEALTHCHECK` in an image with no other program.
/// Its lines are in the `LOG_FORMAT` the proxy logs in.
pub async fn healthcheck() -> ExitCode {
    let variables = config::environment();
    let format = match &variables {
        Ok(variables) => LogFormat::asked_for(|name| variables.get(name).cloned()),
        Err(_) => LogFormat::asked_for(|name| std::env::var(name).ok()),
    };
    let say = |level: log::Level, message: String| {
        let line = standalone_line(format, level, &message);
        if level == log::Level::Info {
            println!("{line}");
        } else {
            eprintln!("{line}");
        }
    };
    let address = match variables.and_then(|variables| {
        config::listen_address(&Settings::new(|name| variables.get(name).cloned()))
    }) {
        Ok(address) => probe_address(address),
        Err(err) => {
            say(
                log::Level::Error,
                format!("healthcheck: configuration error: {err}"),
            );
            return ExitCode::FAILURE;
        }
    };
    let url = format!("http://{address}/healthz");
    let client = match reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(3))
        .build()
    {
        Ok(client) => client,
        Err(err) => {
            say(log::Level::Error, format!("healthcheck: {err}"));
            return ExitCode::FAILURE;
        }
    };
    match client.get(&url).send().await {
        Ok(response) if response.status().is_success() => {
            say(log::Level::Info, format!("healthy: {url}"));
            ExitCode::SUCCESS
        }
        Ok(response) => {
            say(
                log::Level::Error,
                format!("unhealthy: {url} answered {}", response.status()),
            );
            ExitCode::FAILURE
        }
        Err(err) => {
            say(log::Level::Error, format!("unhealthy: {url}: {err}"));
            ExitCode::FAILURE
        }
    }
}

/// A wildcard listener is asked on loopback of its own family.
fn probe_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// The names in the environment and the `.env` files that are not ours but look meant to be,
/// each with the variable it most likely misspells.
pub fn misspelt_variables(names: impl IntoIterator<Item = String>) -> Vec<(String, &'static str)> {
    let mut found: Vec<(String, &'static str)> = names
        .into_iter()
        .filter_map(|name| variables::likely_meant(&name).map(|meant| (name, meant)))
        .collect();
    found.sort();
    found.dedup();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Command, String> {
        parse(list.iter().map(|arg| arg.to_string()))
    }

    #[test]
    fn arguments_choose_a_command_and_nothing_else_starts_the_server() {
        assert_eq!(args(&[]), Ok(Command::Serve));
        assert_eq!(args(&["--help"]), Ok(Command::Help));
        assert_eq!(args(&["-h"]), Ok(Command::Help));
        assert_eq!(args(&["--version"]), Ok(Command::Version));
        assert_eq!(args(&["healthcheck"]), Ok(Command::Healthcheck));
        assert!(args(&["--port=80"]).is_err());
        assert!(args(&["healthcheck", "now"]).is_err());
    }

    #[test]
    fn help_lists_every_variable() {
        let help = help();
        for variable in variables::VARIABLES {
            assert!(help.contains(variable.name), "{}", variable.name);
        }
    }

    #[test]
    fn wildcard_listeners_are_probed_on_loopback() {
        let probe = |listen: &str| probe_address(listen.parse().unwrap()).to_string();
        assert_eq!(probe("0.0.0.0:8080"), "127.0.0.1:8080");
        assert_eq!(probe("[::]:8080"), "[::1]:8080");
        assert_eq!(probe("10.1.2.3:9"), "10.1.2.3:9");
    }
}
