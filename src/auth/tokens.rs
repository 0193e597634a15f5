//! Accepted tokens, kept only as SHA-256 digests with the label each one stands for, and the
//! token a request presents.

use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};
use warp::http::HeaderValue;

use crate::config::Secret;

/// A set of accepted tokens and what each stands for: a label (the name in logs and metrics),
/// or a whole client with its limits.
///
/// Comparing fixed-size digests, and always comparing against every entry, means neither the
/// length of a valid token nor which entry matched can be learnt from response timing.
#[derive(Clone)]
pub struct TokenSet<T = Arc<str>> {
    entries: Vec<([u8; 32], T)>,
}

impl<T> Default for TokenSet<T> {
    fn default() -> Self {
        TokenSet {
            entries: Vec::new(),
        }
    }
}

impl TokenSet {
    pub fn new<'a>(tokens: impl IntoIterator<Item = (Arc<str>, &'a Secret)>) -> TokenSet {
        TokenSet::from_digests(
            tokens
                .into_iter()
                .map(|(label, token)| (digest(token.expose().as_bytes()), label)),
        )
    }

    /// One token with a fixed label, such as the admin token.
    pub fn single(label: &str, token: &Secret) -> TokenSet {
        TokenSet::new([(Arc::from(label), token)])
    }
}

impl<T> TokenSet<T> {
    /// Entries already hashed, such as a clients file's `token_sha256`.
    pub fn from_digests(entries: impl IntoIterator<Item = ([u8; 32], T)>) -> TokenSet<T> {
        TokenSet {
            entries: entries.into_iter().collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, candidate: &[u8]) -> bool {
        self.find(candidate).is_some()
    }

    /// The label of the entry `candidate` is, compared against every entry without branching on
    /// the result.
    pub fn find(&self, candidate: &[u8]) -> Option<&T> {
        let candidate = digest(candidate);
        let mut found = Choice::from(0);
        let mut position = 0u64;
        for (index, (known, _)) in self.entries.iter().enumerate() {
            let matches = known.ct_eq(&candidate);
            position.conditional_assign(&(index as u64), matches);
            found |= matches;
        }
        if bool::from(found) {
            self.entries.get(position as usize).map(|(_, label)| label)
        } else {
            None
        }
    }
}

/// Labels only: digests of tokens are not for logs either.
impl<T: fmt::Debug> fmt::Debug for TokenSet<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|(_, label)| label))
            .finish()
    }
}

/// A short, non-reversible label for a token: the first 8 hex digits of its SHA-256.
pub fn token_label(token: &Secret) -> String {
    digest(token.expose().as_bytes())[..4]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// SHA-256, the form every accepted token is kept in.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The token in a header value: `Bearer <t>` (scheme case-insensitive) or a bare `<t>`.
pub fn presented_token(value: &HeaderValue) -> &[u8] {
    let bytes = value.as_bytes().trim_ascii();
    let without_scheme = match bytes.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => &bytes[7..],
        _ => bytes,
    };
    without_scheme.trim_ascii()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(list: &[&str]) -> TokenSet {
        let secrets: Vec<Secret> = list.iter().map(|t| Secret::new(*t)).collect();
        TokenSet::new(
            secrets
                .iter()
                .map(|secret| (Arc::from(format!("label-{}", secret.expose())), secret)),
        )
    }

    #[test]
    fn matches_only_listed_tokens_and_names_their_label() {
        let set = tokens(&["alpha", "beta"]);
        assert!(set.contains(b"alpha"));
        assert!(set.contains(b"beta"));
        assert!(!set.contains(b"alph"));
        assert!(!set.contains(b""));
        assert!(!tokens(&[]).contains(b""));
        assert_eq!(set.find(b"beta").map(|label| &**label), Some("label-beta"));
        assert_eq!(
            set.find(b"alpha").map(|label| &**label),
            Some("label-alpha")
        );
        assert_eq!(set.find(b"gamma"), None);
    }

    #[test]
    fn debug_output_shows_labels_only() {
        let set = tokens(&["alpha"]);
        assert_eq!(format!("{set:?}"), "[\"label-alpha\"]");
    }

    #[test]
    fn token_labels_are_short_hashes() {
        // SHA-256("alpha") starts 8ed3f6ad.
        assert_eq!(token_label(&Secret::new("alpha")), "8ed3f6ad");
    }

    #[test]
    fn bearer_prefix_is_optional_and_case_insensitive() {
        let token = |v: &'static str| presented_token(&HeaderValue::from_static(v)).to_vec();
        assert_eq!(token("Bearer abc"), b"abc");
        assert_eq!(token("bearer   abc "), b"abc");
        assert_eq!(token("BEARER abc"), b"abc");
        assert_eq!(token("abc"), b"abc");
        assert_eq!(token("Bearer"), b"Bearer");
    }
}
