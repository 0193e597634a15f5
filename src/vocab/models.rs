//! Which models an upstream serves: a list of exact names or prefixes ending in `*`. The
//! upstreams file writes them (config), the router matches requests against them (proxy), the
//! model list falls back to their exact names; so the words live down here.

use std::fmt;

/// One entry of an upstream's `models`: `"gpt-4o"` (that name only) or `"o3*"` (every name
/// starting with `o3`); `"*"` alone is the empty prefix, every model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelPattern {
    Exact(String),
    Prefix(String),
}

/// A pattern with a `*` anywhere but at its end, or an empty one: refused rather than read as
/// something the operator did not mean (`gpt-*-mini` is not a glob here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadPattern;

impl fmt::Display for BadPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "a model pattern is an exact name, or a prefix followed by one * at its end \
             (\"o3*\"; \"*\" alone: every model)",
        )
    }
}

impl ModelPattern {
    pub fn parse(text: &str) -> Result<ModelPattern, BadPattern> {
        let (stem, prefix) = match text.strip_suffix('*') {
            Some(stem) => (stem, true),
            None => (text, false),
        };
        if stem.contains('*') || text.is_empty() {
            return Err(BadPattern);
        }
        Ok(if prefix {
            ModelPattern::Prefix(stem.to_string())
        } else {
            ModelPattern::Exact(stem.to_string())
        })
    }

    pub fn matches(&self, model: &str) -> bool {
        match self {
            ModelPattern::Exact(name) => model == name,
            ModelPattern::Prefix(prefix) => model.starts_with(prefix.as_str()),
        }
    }
}

/// As the file writes it: `gpt-4o`, `o3*`.
impl fmt::Display for ModelPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelPattern::Exact(name) => f.write_str(name),
            ModelPattern::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

/// An upstream's `models`, in the order written. A linear scan: lists are short (tens), and a
/// request is matched against them once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelPatterns(Vec<ModelPattern>);

impl ModelPatterns {
    /// Every pattern of `list`, or the first bad one's position (from 0) and why.
    pub fn parse<S: AsRef<str>>(list: &[S]) -> Result<ModelPatterns, (usize, BadPattern)> {
        list.iter()
            .enumerate()
            .map(|(index, text)| ModelPattern::parse(text.as_ref()).map_err(|bad| (index, bad)))
            .collect::<Result<Vec<_>, _>>()
            .map(ModelPatterns)
    }

    /// Every model: the environment's one upstream serves whatever it is asked for.
    pub fn any() -> ModelPatterns {
        ModelPatterns(vec![ModelPattern::Prefix(String::new())])
    }

    pub fn matches(&self, model: &str) -> bool {
        self.0.iter().any(|pattern| pattern.matches(model))
    }

    /// The names written without a `*`: what the model list can show for an upstream whose own
    /// list cannot be had.
    pub fn exact_names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|pattern| match pattern {
            ModelPattern::Exact(name) => Some(name.as_str()),
            ModelPattern::Prefix(_) => None,
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = &ModelPattern> {
        self.0.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pattern_is_an_exact_name_or_a_trailing_star() {
        assert_eq!(
            ModelPattern::parse("gpt-4o"),
            Ok(ModelPattern::Exact("gpt-4o".into()))
        );
        assert_eq!(
            ModelPattern::parse("o3*"),
            Ok(ModelPattern::Prefix("o3".into()))
        );
        assert_eq!(
            ModelPattern::parse("*"),
            Ok(ModelPattern::Prefix(String::new()))
        );
        for bad in ["", "**", "*o3", "gpt-*-mini", "o3**", "a*b*"] {
            assert_eq!(ModelPattern::parse(bad), Err(BadPattern), "{bad:?}");
        }
    }

    #[test]
    fn exact_names_match_only_themselves_and_prefixes_their_continuations() {
        let patterns = ModelPatterns::parse(&["gpt-4o", "text-embedding-3-*"]).unwrap();
        assert!(patterns.matches("gpt-4o"));
        assert!(!patterns.matches("gpt-4o-mini"));
        assert!(!patterns.matches("gpt-4"));
        assert!(patterns.matches("text-embedding-3-"));
        assert!(patterns.matches("text-embedding-3-large"));
        assert!(!patterns.matches("text-embedding-ada-002"));
        assert!(!patterns.matches(""));
        assert_eq!(patterns.exact_names().collect::<Vec<_>>(), ["gpt-4o"]);
    }

    #[test]
    fn a_star_alone_and_any_match_every_model() {
        let star = ModelPatterns::parse(&["*"]).unwrap();
        assert_eq!(star, ModelPatterns::any());
        for model in ["gpt-4o", "", "llama-3.1-70b", "*"] {
            assert!(star.matches(model), "{model:?}");
        }
        assert_eq!(star.exact_names().count(), 0);
    }

    #[test]
    fn the_first_bad_pattern_is_named_by_position_and_patterns_print_as_written() {
        assert_eq!(
            ModelPatterns::parse(&["a", "b*", "c*d"]),
            Err((2, BadPattern))
        );
        let patterns = ModelPatterns::parse(&["gpt-4o", "o3*", "*"]).unwrap();
        let shown: Vec<String> = patterns.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["gpt-4o", "o3*", "*"]);
    }
}
