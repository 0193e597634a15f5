//! `mock-upstream [--host 127.0.0.1] [--port 0] [--no-record] [--tls-self-signed DIR]`
//!
//! Prints one line, `mock-upstream listening on http://HOST:PORT`, once the
//! port is bound (scripts wait for it to learn the port), then serves until
//! SIGTERM or Ctrl-C. With `--tls-self-signed DIR` it serves HTTPS instead
//! (ALPN `h2` and `http/1.1`) with a certificate made at start-up and written
//! to `DIR/cert.pem` before the line, which then says `https://`.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

use mock_upstream::{MockUpstream, SelfSigned};

const USAGE: &str = "usage: mock-upstream [--host HOST] [--port PORT] [--no-record]
                     [--tls-self-signed DIR [--h2-max-streams N]]
  --host HOST               address to bind (default 127.0.0.1)
  --port PORT               port to bind, 0 for any free port (default 0)
  --no-record               do not keep requests in memory (for long benchmarks)
  --tls-self-signed DIR     serve HTTPS (ALPN h2 and http/1.1) with a self-signed certificate
                            for 127.0.0.1, ::1 and localhost, written to DIR/cert.pem
                            (trust it with the proxy's UPSTREAM_CA_FILE)
  --h2-max-streams N        HTTP/2 concurrent streams a connection allows (default: no limit)";

struct Args {
    host: String,
    port: u16,
    record: bool,
    /// Where the certificate goes; `Some` means TLS mode.
    tls_dir: Option<std::path::PathBuf>,
    h2_max_streams: Option<u32>,
}

enum Parsed {
    Run(Args),
    Help,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Parsed, String> {
    let mut parsed = Args {
        host: "127.0.0.1".to_owned(),
        port: 0,
        record: true,
        tls_dir: None,
        h2_max_streams: None,
    };
    while let Some(arg) = args.next() {
        // Both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg, None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "--host" => parsed.host = value("--host")?,
            "--port" => {
                let raw = value("--port")?;
                parsed.port = raw.parse().map_err(|_| format!("invalid port {raw:?}"))?;
            }
            "--no-record" if inline.is_none() => parsed.record = false,
            "--tls-self-signed" => parsed.tls_dir = Some(value("--tls-self-signed")?.into()),
            "--h2-max-streams" => {
                let raw = value("--h2-max-streams")?;
                match raw.parse() {
                    Ok(n) if n > 0 => parsed.h2_max_streams = Some(n),
                    _ => return Err(format!("invalid stream count {raw:?}")),
                }
            }
            "-h" | "--help" => return Ok(Parsed::Help),
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    if parsed.h2_max_streams.is_some() && parsed.tls_dir.is_none() {
        return Err("--h2-max-streams needs --tls-self-signed".to_owned());
    }
    Ok(Parsed::Run(parsed))
}

/// Makes the certificate and writes it to `dir/cert.pem` (creating `dir`), before the
/// listening line: a script that reads the line finds the file complete.
fn self_signed_into(dir: &std::path::Path) -> Result<SelfSigned, String> {
    let identity = SelfSigned::generate().map_err(|e| format!("cannot make a certificate: {e}"))?;
    let path = dir.join("cert.pem");
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&path, identity.cert_pem()))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(identity)
}

async fn resolve(host: &str, port: u16) -> std::io::Result<SocketAddr> {
    // `[::1]` is how people write IPv6 next to a port; accept it bare too.
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    tokio::net::lookup_host((host, port))
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{host} resolves to no address")))
}

/// Installs the stop handlers and returns what resolves on SIGTERM or Ctrl-C. Installed before
/// the listening line is printed: a script that reads the line and signals at once must find
/// the handler in place, not the default action that kills the process with no exit code.
fn stop_requested() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    async move {
        #[cfg(unix)]
        if let Some(mut term) = term {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Parsed::Run(args)) => args,
        Ok(Parsed::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("mock-upstream: {err}\n{USAGE}");
            return ExitCode::from(2);
        }
    };

    let addr = match resolve(&args.host, args.port).await {
        Ok(addr) => addr,
        Err(err) => {
            eprintln!("mock-upstream: cannot resolve {}: {err}", args.host);
            return ExitCode::from(2);
        }
    };
    let started = match &args.tls_dir {
        Some(dir) => match self_signed_into(dir) {
            Ok(identity) => {
                MockUpstream::start_tls_on(addr, args.record, identity, args.h2_max_streams).await
            }
            Err(err) => {
                eprintln!("mock-upstream: {err}");
                return ExitCode::FAILURE;
            }
        },
        None if args.record => MockUpstream::start_on(addr).await,
        None => MockUpstream::start_without_recording_on(addr).await,
    };
    let mock = match started {
        Ok(mock) => mock,
        Err(err) => {
            eprintln!("mock-upstream: cannot listen on {addr}: {err}");
            return ExitCode::FAILURE;
        }
    };

    let stop = stop_requested();
    let mut stdout = std::io::stdout().lock();
    // A script reading this line may be gone already; that is not our failure.
    let _ = writeln!(stdout, "mock-upstream listening on {}", mock.base_url());
    let _ = stdout.flush();
    drop(stdout);

    stop.await;
    mock.shutdown().await;
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Parsed, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn defaults() {
        let Ok(Parsed::Run(args)) = parse(&[]) else {
            panic!("expected defaults to parse");
        };
        assert_eq!(args.host, "127.0.0.1");
        assert_eq!(args.port, 0);
        assert!(args.record);
        assert!(args.tls_dir.is_none());
        assert!(args.h2_max_streams.is_none());
    }

    #[test]
    fn tls_flags() {
        let Ok(Parsed::Run(args)) = parse(&["--tls-self-signed=/tmp/x", "--h2-max-streams", "100"])
        else {
            panic!("expected TLS flags to parse");
        };
        assert_eq!(
            args.tls_dir.as_deref(),
            Some(std::path::Path::new("/tmp/x"))
        );
        assert_eq!(args.h2_max_streams, Some(100));
        assert!(parse(&["--h2-max-streams", "100"]).is_err());
        assert!(parse(&["--tls-self-signed", "/tmp/x", "--h2-max-streams", "0"]).is_err());
        assert!(parse(&["--tls-self-signed"]).is_err());
    }

    #[test]
    fn all_flags_both_forms() {
        let Ok(Parsed::Run(args)) = parse(&["--host", "0.0.0.0", "--port=8080", "--no-record"])
        else {
            panic!("expected flags to parse");
        };
        assert_eq!(args.host, "0.0.0.0");
        assert_eq!(args.port, 8080);
        assert!(!args.record);
    }

    #[test]
    fn bad_args() {
        assert!(parse(&["--port"]).is_err());
        assert!(parse(&["--port", "70000"]).is_err());
        assert!(parse(&["--bogus"]).is_err());
        assert!(parse(&["--no-record=1"]).is_err());
        assert!(matches!(parse(&["--help"]), Ok(Parsed::Help)));
    }
}
