//! Caller tokens: extraction from the configured header and constant-time matching.

use sha2::{Digest, Sha256};
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};
use warp::http::HeaderValue;

use crate::secret::Secret;

/// A set of accepted tokens, kept only as SHA-256 digests.
///
/// Comparing fixed-size digests, and always comparing against every entry, means neither the
/// length of a valid token nor which entry matched can be learnt from response timing.
#[derive(Clone)]
pub struct TokenSet {
    digests: Vec<[u8; 32]>,
}

impl TokenSet {
    pub fn new<'a>(tokens: impl IntoIterator<Item = &'a Secret>) -> TokenSet {
        TokenSet {
            digests: tokens
                .into_iter()
                .map(|token| digest(token.expose().as_bytes()))
                .collect(),
        }
    }

    pub fn contains(&self, candidate: &[u8]) -> bool {
        self.position(candidate).is_some()
    }

    /// Which entry `candidate` is, compared against every entry without branching on the result.
    pub fn position(&self, candidate: &[u8]) -> Option<usize> {
        let candidate = digest(candidate);
        let mut found = Choice::from(0);
        let mut position = 0u64;
        for (index, known) in self.digests.iter().enumerate() {
            let matches = known.ct_eq(&candidate);
            position.conditional_assign(&(index as u64), matches);
            found |= matches;
        }
        bool::from(found).then_some(position as usize)
    }
}

/// A short, non-reversible label for a token: the first 8 hex digits of its SHA-256.
pub fn token_label(token: &Secret) -> String {
    digest(token.expose().as_bytes())[..4]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn digest(bytes: &[u8]) -> [u8; 32] {
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
        TokenSet::new(&secrets)
    }

    #[test]
    fn matches_only_listed_tokens() {
        let set = tokens(&["alpha", "beta"]);
        assert!(set.contains(b"alpha"));
        assert!(set.contains(b"beta"));
        assert!(!set.contains(b"alph"));
        assert!(!set.contains(b""));
        assert!(!tokens(&[]).contains(b""));
        assert_eq!(set.position(b"beta"), Some(1));
        assert_eq!(set.position(b"alpha"), Some(0));
        assert_eq!(set.position(b"gamma"), None);
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
