//! Open-file descriptors: the soft limit is raised to the hard one at start-up, and running out
//! of them is told apart from an upstream that cannot be reached.

/// Descriptors a proxied request holds: the caller's connection and the upstream's.
const PER_REQUEST: u64 = 2;
/// The listener, log files, the runtime's own, and idle keep-alive connections on both sides.
const HEADROOM: u64 = 256;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, logs the limit in effect, and warns when it
/// cannot carry `max_concurrent_requests`.
pub fn raise_limit(max_concurrent_requests: usize) {
    let (soft, hard) = match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok(limits) => limits,
        Err(err) => {
            log::warn!("cannot read the open-file limit: {err}");
            return;
        }
    };
    let in_effect = if soft < hard {
        match rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(err) => {
                log::warn!("cannot raise the open-file limit from {soft} to {hard}: {err}");
                soft
            }
        }
    } else {
        soft
    };
    log::info!("{}", limit_line(soft, in_effect));
    let needed = needed_for(max_concurrent_requests);
    if in_effect < needed {
        log::warn!(
            "the open-file limit {in_effect} is too low for MAX_CONCURRENT_REQUESTS={max_concurrent_requests} \
             (about {needed} needed: {PER_REQUEST} per request plus {HEADROOM}); beyond it requests \
             get 503 overloaded. Raise the hard limit (ulimit -Hn, LimitNOFILE=, docker --ulimit \
             nofile=) or lower MAX_CONCURRENT_REQUESTS"
        );
    }
}

/// "Raised" only when it was: a limit already at the hard one (a container's `--ulimit`, say) is
/// stated as it is, so the line never hints at a change that did not happen.
fn limit_line(soft: u64, in_effect: u64) -> String {
    if in_effect > soft {
        format!("open-file limit: {in_effect} (raised from {soft})")
    } else {
        format!("open-file limit: {in_effect}")
    }
}

fn needed_for(max_concurrent_requests: usize) -> u64 {
    (max_concurrent_requests as u64).saturating_mul(PER_REQUEST) + HEADROOM
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_request_needs_two_descriptors_beside_the_headroom() {
        assert_eq!(needed_for(1024), 2304);
    }

    #[test]
    fn the_limit_line_says_raised_only_when_it_was() {
        assert_eq!(
            limit_line(1024, 524_288),
            "open-file limit: 524288 (raised from 1024)"
        );
        assert_eq!(limit_line(20_000, 20_000), "open-file limit: 20000");
    }
}
