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
    pub fn exact_names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|pattern| match pattern {
            ModelPattern::Exact(name) => Some(name.as_str()),
            ModelPattern::Prefix(_) => None,
        })
    }
}
