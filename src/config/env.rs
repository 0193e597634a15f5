//! The environment merge: the process environment over `.env.local` over `.env` in the working
//! directory. Serving, reloading, `healthcheck` and the start-up error line all read the
//! variables through [`environment`], so a setting in `.env` means the same everywhere.

use std::collections::HashMap;
use std::path::Path;

use super::error::{ConfigError, invalid};
use super::variables;

/// Every variable, as the process would see it: the environment wins over `.env.local`, which
/// wins over `.env`. Names and values that are not UTF-8 are left out (ours all are).
pub fn environment() -> Result<HashMap<String, String>, ConfigError> {
    let mut variables = HashMap::new();
    for file in [".env", ".env.local"] {
        variables.extend(env_file(Path::new(file))?);
    }
    // `vars_os`: `vars` would panic on a variable that is not UTF-8.
    variables.extend(
        std::env::vars_os().filter_map(|(name, value)| {
            Some((name.into_string().ok()?, value.into_string().ok()?))
        }),
    );
    Ok(variables)
}

/// The variables of a `.env`-style file; a missing file has none.
fn env_file(path: &Path) -> Result<HashMap<String, String>, ConfigError> {
    if !path.exists() {
        return Ok(HashMap::new());
    }
    let name = path.display().to_string();
    let entries = dotenvy::from_path_iter(path)
        .map_err(|err| invalid(&name, format!("cannot be read: {err}")))?;
    entries
        .map(|entry| entry.map_err(|err| invalid(&name, format!("cannot be parsed: {err}"))))
        .collect()
}

/// The variables as the parser reads them.
pub struct Settings<F> {
    lookup: F,
}

impl<F: Fn(&str) -> Option<String>> Settings<F> {
    pub fn new(lookup: F) -> Settings<F> {
        Settings { lookup }
    }

    /// The value the operator set, trimmed; an empty value means "not set": `docker run -e
    /// ADMIN_TOKEN=` should not enable anything.
    pub fn set(&self, name: &str) -> Option<String> {
        (self.lookup)(name)
            .map(|value| value.trim().to_string())
            .filter(|value| !value.is_empty())
    }

    /// The value set, else the default in the table of variables.
    pub fn value(&self, name: &str) -> Option<String> {
        self.set(name)
            .or_else(|| variables::default_value(name).map(str::to_string))
    }
}
