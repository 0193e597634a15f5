//! A wrapper for values that must never be printed (the upstream key, client tokens, the admin
//! token), and the SHA-256 forms a secret may be shown or kept in. A leaf: the configuration,
//! the token checks and the key pool all name these, so none of them has to reach up for them.

use std::fmt;

use sha2::{Digest, Sha256};

/// A string that prints as `***` through both `Debug` and `Display`, so a whole `Config` can be
/// logged at start-up without thinking about which fields are sensitive.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The only way to read the value; grep for it when auditing where secrets go.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// SHA-256, the form every accepted token is kept in.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// A short, non-reversible label for a token: the first 8 hex digits of its SHA-256.
pub fn token_label(token: &Secret) -> String {
    digest(token.expose().as_bytes())[..4]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints_its_value() {
        let secret = Secret::new("sk-live-123");
        assert_eq!(format!("{secret}"), "***");
        assert_eq!(format!("{secret:?}"), "***");
        assert_eq!(format!("{:?}", Some(secret.clone())), "Some(***)");
        assert_eq!(secret.expose(), "sk-live-123");
    }
}
