//! Running out of file descriptors told apart from a peer that cannot be reached: the accept loop
//! (server) and the upstream code (proxy) both ask.

use std::error::Error;

/// Whether an error, or any of its causes, is this process running out of descriptors (EMFILE,
/// or ENFILE for the whole system): a local limit, not a fault of the peer.
pub fn is_out_of_descriptors(err: &(dyn Error + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(current) = cause {
        if let Some(io) = current.downcast_ref::<std::io::Error>()
            && io
                .raw_os_error()
                .is_some_and(|errno| errno == libc::EMFILE || errno == libc::ENFILE)
        {
            return true;
        }
        cause = current.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_descriptors_is_recognised_through_the_chain() {
        #[derive(Debug)]
        struct Wrapper(std::io::Error);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("connect failed")
            }
        }
        impl Error for Wrapper {
            fn source(&self) -> Option<&(dyn Error + 'static)> {
                Some(&self.0)
            }
        }
        let emfile = Wrapper(std::io::Error::from_raw_os_error(libc::EMFILE));
        assert!(is_out_of_descriptors(&emfile));
        let refused = Wrapper(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(!is_out_of_descriptors(&refused));
    }
}
