//! Accepted tokens, kept only as SHA-256 digests with the label each one stands for, and the
//! token a request presents.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;

use subtle::ConstantTimeEq;
use warp::http::HeaderValue;

use crate::config::Secret;
pub use crate::config::{digest, token_label};

/// A set of accepted tokens and what each stands for: a label (the name in logs and metrics),
/// or a whole client with its limits.
///
/// Looked up by the SHA-256 digest of the presented token in a hash map, so the cost is the same
/// for one client or ten thousand. What the lookup's timing depends on is the presented token's
/// digest, never its bytes: learning that a digest shares a bucket or a prefix with a stored one
/// would take preimages of SHA-256 to turn into a token. The final comparison of the two digests
/// is constant-time anyway, and the length of a valid token cannot show (digests are all 32 bytes).
#[derive(Clone)]
pub struct TokenSet<T = Arc<str>> {
    /// In configuration order, for `Debug`.
    entries: Vec<([u8; 32], T)>,
    /// Digest to position in `entries`; a digest given twice means its last entry.
    index: HashMap<DigestKey, usize, BuildDigestHasher>,
}

impl<T> Default for TokenSet<T> {
    fn default() -> Self {
        TokenSet {
            entries: Vec::new(),
            index: HashMap::default(),
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
        let entries: Vec<([u8; 32], T)> = entries.into_iter().collect();
        let mut index = HashMap::with_capacity_and_hasher(entries.len(), BuildDigestHasher);
        for (position, (known, _)) in entries.iter().enumerate() {
            index.insert(DigestKey(*known), position);
        }
        TokenSet { entries, index }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, candidate: &[u8]) -> bool {
        self.find(candidate).is_some()
    }

    /// The label of the entry `candidate` is: one digest and one map lookup, however many entries.
    pub fn find(&self, candidate: &[u8]) -> Option<&T> {
        let position = *self.index.get(&DigestKey(digest(candidate)))?;
        self.entries.get(position).map(|(_, label)| label)
    }
}

/// A digest as a map key: hashed by its first eight bytes (SHA-256 output is uniform already, so
/// running SipHash over it again would buy nothing), compared in constant time.
#[derive(Clone, Copy)]
struct DigestKey([u8; 32]);

impl PartialEq for DigestKey {
    fn eq(&self, other: &DigestKey) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for DigestKey {}

impl Hash for DigestKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

#[derive(Clone, Copy, Default)]
struct BuildDigestHasher;

impl BuildHasher for BuildDigestHasher {
    type Hasher = DigestHasher;

    fn build_hasher(&self) -> DigestHasher {
        DigestHasher(0)
    }
}

/// Takes the `u64` a `DigestKey` writes as the hash.
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }

    /// Not used by `DigestKey`; folds bytes in so that any other use still hashes.
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
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
    fn many_entries_each_find_their_own_label_and_a_repeat_means_the_last() {
        let secrets: Vec<Secret> = (0..10_000).map(|n| Secret::new(format!("t{n}"))).collect();
        let set = TokenSet::new(
            secrets
                .iter()
                .map(|secret| (Arc::from(secret.expose()), secret)),
        );
        for n in [0, 1, 4_999, 9_999] {
            assert_eq!(
                set.find(format!("t{n}").as_bytes()).map(|l| &**l),
                Some(&*format!("t{n}"))
            );
        }
        assert_eq!(set.find(b"t10000"), None);
        let twice = TokenSet::from_digests([(digest(b"a"), 1), (digest(b"a"), 2)]);
        assert_eq!(twice.find(b"a"), Some(&2));
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
