//! STUB (replaced by the config branch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelPattern {
    Exact(String),
    Prefix(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ModelPatterns(pub Vec<ModelPattern>);

impl ModelPatterns {
    pub fn any() -> ModelPatterns {
        ModelPatterns(vec![ModelPattern::Prefix(String::new())])
    }
    pub fn matches(&self, model: &str) -> bool {
        self.0.iter().any(|pattern| match pattern {
            ModelPattern::Exact(name) => name == model,
            ModelPattern::Prefix(prefix) => model.starts_with(prefix.as_str()),
        })
    }
    pub fn matches_all(&self) -> bool {
        self.0.iter().any(|pattern| matches!(pattern, ModelPattern::Prefix(prefix) if prefix.is_empty()))
    }
    pub fn matching(&self, model: &str) -> Option<&ModelPattern> {
        self.0.iter().find(|pattern| match pattern {
            ModelPattern::Exact(name) => name == model,
            ModelPattern::Prefix(prefix) => model.starts_with(prefix.as_str()),
        })
    }
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }
    pub fn exact_names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|pattern| match pattern {
            ModelPattern::Exact(name) => Some(name.as_str()),
            ModelPattern::Prefix(_) => None,
        })
    }
}

impl std::fmt::Display for ModelPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelPattern::Exact(name) => f.write_str(name),
            ModelPattern::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}
