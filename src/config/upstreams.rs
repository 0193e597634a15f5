//! The upstreams (`UPSTREAMS_FILE`): a TOML file naming several upstreams, the models each
//! serves, their weights and tiers, and aliases; without the file, the environment's one
//! upstream (`TARGET_HOST`/`TARGET_BASE_URL`, `AUTH_BEARER`, `UPSTREAM_*`) named `default`,
//! serving every model. Read by serde with unknown fields refused; every problem names the
//! upstream and the field (`upstreams.<name>.<field>`), and nothing here echoes a key.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use warp::http::StatusCode;

use super::clients::{at_path, count, one_line, value};
use super::env::Settings;
use super::error::{ConfigError, invalid};
use super::prices::{litellm_file, price_list};
use super::upstream::{self, ConnectionSettings, UpstreamConfig};
use super::values::{self, Elsewhere};
use crate::vocab::price::PriceList;
use crate::vocab::{ModelPatterns, PriceTable};

/// `max_attempts` when the file does not say.
const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// `failover_on` when the file does not say: rate limits, and the server errors that mean this
/// upstream (not the request) is in trouble; 529 is Anthropic's "overloaded".
const DEFAULT_FAILOVER_ON: [u16; 6] = [429, 500, 502, 503, 504, 529];
/// `request_timeout_secs` when the file does not say.
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// What a base URL in the file must not carry goes in these fields instead.
const IN_THE_FILE: Elsewhere = Elsewhere {
    keys: "keys_file or keys_env",
    query: "query",
};

/// Every upstream and the rules across them. Equal when nothing in it changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamsConfig {
    /// `UPSTREAMS_FILE`, read again on reload; `None`: the environment's one upstream.
    pub file: Option<PathBuf>,
    /// Index into `list` of the upstream that serves requests without a model.
    pub default: usize,
    /// `None` without a file: every key of the one upstream once, as before.
    pub max_attempts: Option<u32>,
    /// The statuses that send a request on to the next upstream.
    pub failover_on: Vec<StatusCode>,
    /// From the first attempt to the last response head, across every attempt.
    pub request_timeout: Duration,
    /// File order; never empty.
    pub list: Vec<NamedUpstream>,
    /// Alias -> model; a model is never itself an alias (one level).
    pub aliases: BTreeMap<String, String>,
    /// `[prices]`, each upstream's own and the `prices_file`'s (from `PRICES_FILE` without an
    /// upstreams file).
    pub prices: PriceTable,
    /// The `prices_file` (LiteLLM's JSON) the prices were read from: watched, as the file
    /// naming it is.
    pub litellm_file: Option<PathBuf>,
}

/// One upstream with its place in the routing. Equal (`==`) to the same upstream of another
/// load when nothing about it changed, its keys compared by value: a reload keeps what was built
/// for it (connection pools, key states, breaker).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedUpstream {
    /// `default` for the environment's upstream.
    pub name: Arc<str>,
    pub settings: UpstreamConfig,
    /// Longest wait for a response head: `timeout_secs`, else `UPSTREAM_TIMEOUT_SECS`.
    pub timeout: Duration,
    /// The environment's upstream: every model.
    pub models: ModelPatterns,
    /// Our name of a model -> this upstream's.
    pub model_names: BTreeMap<String, String>,
    /// This upstream's share within its tier, at least 1.
    pub weight: u32,
    /// Lower tiers are tried first.
    pub tier: u32,
    /// Re-read on reload when it changed.
    pub keys_file: Option<PathBuf>,
    /// The variable the keys came from; a new value needs a restart.
    pub keys_env: Option<String>,
}

/// What an upstream of the file takes from the environment when it does not say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpstreamDefaults {
    /// `UPSTREAM_CONNECT_TIMEOUT_SECS`.
    pub connect_timeout: Duration,
    /// `UPSTREAM_TIMEOUT_SECS`.
    pub timeout: Duration,
    /// Whether the process environment names an outbound proxy.
    pub outbound_proxy: bool,
}

impl UpstreamDefaults {
    pub(super) fn from_limits(limits: &super::Limits) -> UpstreamDefaults {
        UpstreamDefaults {
            connect_timeout: limits.upstream_connect_timeout,
            timeout: limits.upstream_timeout,
            outbound_proxy: upstream::outbound_proxy_set(),
        }
    }
}

impl UpstreamsConfig {
    /// The environment's one upstream, named `default`, serving every model, as the proxy was
    /// before the file existed.
    pub fn single(settings: UpstreamConfig, timeout: Duration) -> UpstreamsConfig {
        // Each key of the pool may be tried once, each for up to `timeout`: a deadline any shorter
        // would cut a request that was served before there were several upstreams.
        let keys = u32::try_from(settings.keys.len())
            .unwrap_or(u32::MAX)
            .max(1);
        UpstreamsConfig {
            file: None,
            default: 0,
            max_attempts: None,
            failover_on: default_failover_on(),
            request_timeout: timeout.saturating_mul(keys),
            list: vec![NamedUpstream {
                name: Arc::from("default"),
                settings,
                timeout,
                models: ModelPatterns::any(),
                model_names: BTreeMap::new(),
                weight: 1,
                tier: 0,
                keys_file: None,
                keys_env: None,
            }],
            aliases: BTreeMap::new(),
            prices: PriceTable::default(),
            litellm_file: None,
        }
    }

    /// Reads and checks the file at `path`. `lookup` is where a `keys_env` variable is read
    /// (the same source as every other variable). The error names `UPSTREAMS_FILE`, the path, the
    /// upstream and the field.
    pub fn load(
        path: &Path,
        lookup: impl Fn(&str) -> Option<String>,
        defaults: UpstreamDefaults,
    ) -> Result<UpstreamsConfig, ConfigError> {
        let failed =
            |message: String| invalid("UPSTREAMS_FILE", format!("{}: {message}", path.display()));
        let text = std::fs::read_to_string(path)
            .map_err(|err| failed(format!("cannot be read: {err}")))?;
        let mut config = parse(&text, &Settings::new(lookup), defaults).map_err(failed)?;
        config.file = Some(path.to_path_buf());
        Ok(config)
    }

    /// The upstream for requests without a model.
    pub fn default_upstream(&self) -> &NamedUpstream {
        &self.list[self.default]
    }
}

fn default_failover_on() -> Vec<StatusCode> {
    DEFAULT_FAILOVER_ON
        .iter()
        .filter_map(|code| StatusCode::from_u16(*code).ok())
        .collect()
}

/// The file: the rules across upstreams, `[upstreams.<name>]` tables and `[aliases]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamsFile {
    #[serde(default, deserialize_with = "text")]
    default: Option<String>,
    #[serde(default, deserialize_with = "count")]
    max_attempts: Option<u64>,
    #[serde(default, deserialize_with = "statuses")]
    failover_on: Option<Vec<StatusCode>>,
    #[serde(default, deserialize_with = "count")]
    request_timeout_secs: Option<u64>,
    /// Kept as TOML until each name is checked, so an error names the upstream it is about.
    #[serde(default)]
    upstreams: toml::Table,
    #[serde(default)]
    aliases: BTreeMap<String, Name>,
    #[serde(default)]
    prices: toml::Table,
    #[serde(default, deserialize_with = "text")]
    prices_file: Option<String>,
}

/// One `[upstreams.<name>]` table. Each field's parser checks its type; what the value means is
/// checked by the same code as the `UPSTREAM_*` variables.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    #[serde(default, deserialize_with = "text")]
    base_url: Option<String>,
    #[serde(default, deserialize_with = "text")]
    keys_file: Option<String>,
    #[serde(default, deserialize_with = "text")]
    keys_env: Option<String>,
    #[serde(default, deserialize_with = "text")]
    auth_header: Option<String>,
    #[serde(default, deserialize_with = "text")]
    query: Option<String>,
    #[serde(default, deserialize_with = "text")]
    ca_file: Option<String>,
    #[serde(default, deserialize_with = "count")]
    timeout_secs: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    connect_timeout_secs: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    http2_connections: Option<u64>,
    #[serde(default, deserialize_with = "models")]
    models: Option<ModelPatterns>,
    #[serde(default)]
    model_names: BTreeMap<String, Name>,
    #[serde(default, deserialize_with = "count")]
    weight: Option<u64>,
    #[serde(default, deserialize_with = "tier")]
    tier: Option<u32>,
    #[serde(default)]
    prices: toml::Table,
}

/// Only the position of each upstream's table, for keeping the file's order: the table above is
/// a sorted map.
#[derive(Deserialize)]
struct Order {
    #[serde(default)]
    upstreams: BTreeMap<String, toml::Spanned<serde::de::IgnoredAny>>,
}

/// Parses the text of an upstreams file. The error is one line naming the upstream and field.
fn parse<F: Fn(&str) -> Option<String>>(
    text: &str,
    variables: &Settings<F>,
    defaults: UpstreamDefaults,
) -> Result<UpstreamsConfig, String> {
    let document: toml::Table = text
        .parse()
        .map_err(|err: toml::de::Error| format!("is not valid TOML: {}", one_line(&err)))?;
    let file: UpstreamsFile = serde_path_to_error::deserialize(toml::Value::Table(document))
        .map_err(|err| at_path("", &err))?;
    if file.upstreams.is_empty() {
        return Err("has no upstreams (no [upstreams.<name>] table)".to_string());
    }
    let mut list = Vec::new();
    let mut per_upstream = FxHashMap::default();
    for (name, entry) in file.upstreams {
        let (upstream, prices) = parse_upstream(&name, entry, variables, defaults)?;
        if !prices.is_empty() {
            per_upstream.insert(upstream.name.clone(), prices);
        }
        list.push(upstream);
    }
    let litellm = file.prices_file.map(PathBuf::from);
    let prices = PriceTable {
        per_upstream,
        shared: price_list("prices", file.prices)?,
        file: match &litellm {
            Some(path) => litellm_file(path)?,
            None => FxHashMap::default(),
        },
    };
    // The document parsed above, so this parse of the same text succeeds; a failure would only
    // lose the order, never the content.
    if let Ok(order) = toml::from_str::<Order>(text) {
        list.sort_by_key(|upstream| {
            order
                .upstreams
                .get(&*upstream.name)
                .map(|table| table.span().start)
        });
    }

    let default_name = file.default.ok_or_else(|| {
        "default: is required: the name of the upstream that serves requests without a model \
         (files, batches, uploads)"
            .to_string()
    })?;
    let default = list
        .iter()
        .position(|upstream| *upstream.name == default_name)
        .ok_or_else(|| {
            let names: Vec<&str> = list.iter().map(|upstream| &*upstream.name).collect();
            format!(
                "default: {default_name:?} is not an upstream of this file (upstreams: {})",
                names.join(", ")
            )
        })?;
    let aliases = names("aliases", file.aliases)?;
    check_aliases(&aliases, &list)?;

    Ok(UpstreamsConfig {
        file: None,
        default,
        max_attempts: Some(match file.max_attempts {
            None => DEFAULT_MAX_ATTEMPTS,
            Some(attempts) => {
                u32::try_from(attempts).map_err(|_| "max_attempts: is too large".to_string())?
            }
        }),
        failover_on: file.failover_on.unwrap_or_else(default_failover_on),
        request_timeout: file
            .request_timeout_secs
            .map_or(DEFAULT_REQUEST_TIMEOUT, Duration::from_secs),
        list,
        aliases,
        prices,
        litellm_file: litellm,
    })
}

/// Names become metric labels and log words: a character set no dashboard has to escape.
fn is_upstream_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.'))
}

fn parse_upstream<F: Fn(&str) -> Option<String>>(
    name: &str,
    entry: toml::Value,
    variables: &Settings<F>,
    defaults: UpstreamDefaults,
) -> Result<(NamedUpstream, PriceList), String> {
    if !is_upstream_name(name) {
        return Err(format!(
            "upstreams.{}: an upstream name is one or more of A-Z a-z 0-9 _ . -",
            name.chars().take(40).collect::<String>()
        ));
    }
    let at = format!("upstreams.{name}");
    let entry: Entry = serde_path_to_error::deserialize(entry).map_err(|err| at_path(&at, &err))?;
    // The shared parsers name the field they are given; their error reads `upstreams.<name>.<field>: ...`.
    let field = |field: &str| format!("{at}.{field}");
    let shared = |err: ConfigError| err.to_string();

    let base_url = entry
        .base_url
        .ok_or_else(|| format!("{at}.base_url: is required"))?;
    let base_url = values::upstream_base(
        &field("base_url"),
        &base_url,
        "https://api.openai.com/v1",
        &IN_THE_FILE,
    )
    .map_err(shared)?;
    let auth_header = values::header_name(
        &field("auth_header"),
        entry.auth_header.as_deref().unwrap_or("Authorization"),
    )
    .map_err(shared)?;
    let keys = match (&entry.keys_file, &entry.keys_env) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "{at}.keys_file: give keys_file or keys_env, not both"
            ));
        }
        // A server that takes no key (a local vLLM): requests go without a credential.
        (None, None) => Vec::new(),
        (Some(path), None) => {
            let text = std::fs::read_to_string(path)
                .map_err(|err| format!("{at}.keys_file: {path} cannot be read: {err}"))?;
            let lines = key_lines(&text);
            if lines.is_empty() {
                return Err(format!(
                    "{at}.keys_file: {path} holds no key for upstream {name} (one key a line; \
                     blank lines and # comments are skipped)"
                ));
            }
            upstream::upstream_keys(&field("keys_file"), &lines, &auth_header).map_err(shared)?
        }
        (None, Some(variable)) => {
            let value = variables.set(variable).ok_or_else(|| {
                format!(
                    "{at}.keys_env: {variable} is not set or empty: upstream {name} has no keys"
                )
            })?;
            upstream::comma_separated_keys(&field("keys_env"), &value, &auth_header)
                .map_err(shared)?
        }
    };
    let query = values::upstream_query(&field("query"), entry.query).map_err(shared)?;
    let ca_file = entry
        .ca_file
        .as_deref()
        .map(|path| upstream::ca_file(&field("ca_file"), path))
        .transpose()
        .map_err(shared)?;
    let pools = upstream::pools(
        &field("http2_connections"),
        entry.http2_connections.unwrap_or(1),
    )
    .map_err(shared)?;

    let models = entry.models.ok_or_else(|| {
        format!("{at}.models: is required: the models this upstream serves, such as [\"gpt-4o\", \"o3*\"]")
    })?;
    if models.is_empty() {
        return Err(format!(
            "{at}.models: is empty: list the models this upstream serves"
        ));
    }
    let model_names = names(&field("model_names"), entry.model_names)?;
    if let Some(ours) = model_names.keys().find(|ours| !models.matches(ours)) {
        return Err(format!(
            "{at}.model_names: {ours:?} is not one of this upstream's models"
        ));
    }
    let prices = price_list(&field("prices"), entry.prices)?;
    let weight = match entry.weight {
        None => 1,
        Some(weight) => u32::try_from(weight).map_err(|_| format!("{at}.weight: is too large"))?,
    };

    let upstream = NamedUpstream {
        name: Arc::from(name),
        settings: UpstreamConfig {
            keys,
            auth_header,
            query,
            connection: ConnectionSettings {
                ca_file,
                connect_timeout: entry
                    .connect_timeout_secs
                    .map_or(defaults.connect_timeout, Duration::from_secs),
                pools,
                outbound_proxy: defaults.outbound_proxy,
                cleartext: base_url.scheme() == "http",
            },
            base_url,
        },
        timeout: entry
            .timeout_secs
            .map_or(defaults.timeout, Duration::from_secs),
        models,
        model_names,
        weight,
        tier: entry.tier.unwrap_or(0),
        keys_file: entry.keys_file.map(PathBuf::from),
        keys_env: entry.keys_env,
    };
    Ok((upstream, prices))
}

/// The keys of a keys file: one a line, trimmed; blank lines and `#` comment lines skipped.
fn key_lines(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect()
}

/// Each alias names a model some upstream serves, is not itself a model name an upstream lists,
/// and does not name another alias.
fn check_aliases(aliases: &BTreeMap<String, String>, list: &[NamedUpstream]) -> Result<(), String> {
    for (alias, model) in aliases {
        if let Some(upstream) = list
            .iter()
            .find(|upstream| upstream.models.exact_names().any(|name| name == alias))
        {
            return Err(format!(
                "aliases.{alias}: is a model of upstream {}: an alias of the same name would \
                 hide it",
                upstream.name
            ));
        }
        if aliases.contains_key(model) {
            return Err(format!(
                "aliases.{alias}: {model:?} is itself an alias: an alias names a model (one \
                 level)"
            ));
        }
        if !list.iter().any(|upstream| upstream.models.matches(model)) {
            return Err(format!(
                "aliases.{alias}: {model:?} is not served by any upstream (no upstream's models \
                 match it)"
            ));
        }
    }
    Ok(())
}

fn text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    match value(deserializer)? {
        toml::Value::String(text) if !text.trim().is_empty() => Ok(Some(text.trim().to_string())),
        _ => Err(D::Error::custom("must be a non-empty string")),
    }
}

fn tier<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
    value(deserializer)?
        .as_integer()
        .and_then(|number| u32::try_from(number).ok())
        .map(Some)
        .ok_or_else(|| D::Error::custom("must be a whole number of at least 0"))
}

fn statuses<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Vec<StatusCode>>, D::Error> {
    let accepted = || {
        D::Error::custom(
            "must be a list of HTTP error statuses (400 to 599), such as [429, 500, 502, 503]",
        )
    };
    let value = value(deserializer)?;
    let list = value.as_array().ok_or_else(accepted)?;
    let mut statuses = Vec::new();
    for item in list {
        let status = item
            .as_integer()
            .filter(|code| (400..=599).contains(code))
            .and_then(|code| StatusCode::from_u16(code as u16).ok())
            .ok_or_else(accepted)?;
        if !statuses.contains(&status) {
            statuses.push(status);
        }
    }
    Ok(Some(statuses))
}

fn models<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<ModelPatterns>, D::Error> {
    let accepted = || {
        D::Error::custom(
            "must be a list of model names, each exact or a prefix ending in one *, such as \
             [\"gpt-4o\", \"o3*\"]",
        )
    };
    let value = value(deserializer)?;
    let list = value.as_array().ok_or_else(accepted)?;
    let names = list
        .iter()
        .map(|item| item.as_str().ok_or_else(accepted))
        .collect::<Result<Vec<_>, _>>()?;
    ModelPatterns::parse(&names)
        .map(Some)
        .map_err(|(index, bad)| D::Error::custom(format!("entry {}: {bad}", index + 1)))
}

/// A model name on the right of `model_names` or `[aliases]`: a non-empty string. Its own
/// type, so that an error's path ends at the entry it is about.
struct Name(String);

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Name, D::Error> {
        match value(deserializer)? {
            toml::Value::String(name) if !name.is_empty() => Ok(Name(name)),
            _ => Err(D::Error::custom(
                "must be a model name (a non-empty string)",
            )),
        }
    }
}

/// The table without its wrapper; `at` names it in the error for an empty name on the left.
fn names(at: &str, table: BTreeMap<String, Name>) -> Result<BTreeMap<String, String>, String> {
    if table.contains_key("") {
        return Err(format!("{at}: \"\" is not a model name"));
    }
    Ok(table
        .into_iter()
        .map(|(from, Name(to))| (from, to))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const DEFAULTS: UpstreamDefaults = UpstreamDefaults {
        connect_timeout: Duration::from_secs(10),
        timeout: Duration::from_secs(600),
        outbound_proxy: false,
    };

    /// A directory of its own for each test's files, removed when the test ends.
    struct Dir(PathBuf);

    impl Dir {
        fn new() -> Dir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "llm-proxy-upstreams-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }

        fn file(&self, name: &str, text: &str) -> String {
            let path = self.0.join(name);
            std::fs::write(&path, text).unwrap();
            path.to_str().unwrap().to_string()
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn load_with(
        dir: &Dir,
        text: &str,
        vars: &[(&str, &str)],
    ) -> Result<UpstreamsConfig, ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        let path = dir.file("upstreams.toml", text);
        UpstreamsConfig::load(Path::new(&path), |name| vars.get(name).cloned(), DEFAULTS)
    }

    /// The message after `UPSTREAMS_FILE: <path>: `.
    fn error(text: &str) -> String {
        let dir = Dir::new();
        let err =
            load_with(&dir, text, &[("KEYS", "k1")]).expect_err("the file should be rejected");
        assert_eq!(err.variable, "UPSTREAMS_FILE");
        let prefix = format!("{}: ", dir.0.join("upstreams.toml").display());
        err.message
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("the path first: {}", err.message))
            .to_string()
    }

    /// One upstream named `a` with keys from `KEYS`, and `extra` lines in its table.
    fn one(extra: &str) -> String {
        format!(
            "default = \"a\"\n[upstreams.a]\nbase_url = \"https://a.example/v1\"\n\
             keys_env = \"KEYS\"\nmodels = [\"m\", \"p-*\"]\n{extra}\n"
        )
    }

    #[test]
    fn prices_come_from_the_upstreams_own_table_the_shared_one_and_the_prices_file() {
        let dir = Dir::new();
        let litellm = dir.file(
            "model_prices.json",
            r#"{"claude-x": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05}}"#,
        );
        let text = format!(
            "default = \"a\"\nprices_file = {litellm:?}\n\
             [prices]\n\"m\" = {{ input = 1.0, output = 2.0 }}\n\
             [upstreams.a]\nbase_url = \"https://a.example/v1\"\nmodels = [\"m\", \"claude-x\"]\n\
             [upstreams.a.prices]\n\"m\" = {{ input = 1.5, output = 3.0 }}\n\
             [upstreams.b]\nbase_url = \"https://b.example/v1\"\nmodels = [\"m\"]\n"
        );
        let config = load_with(&dir, &text, &[]).unwrap();
        let input = |upstream: &str, model: &str| {
            config
                .prices
                .price(upstream, model)
                .map(|price| price.input)
        };
        assert_eq!(input("a", "m"), Some(1_500_000));
        assert_eq!(input("b", "m"), Some(1_000_000));
        assert_eq!(input("b", "claude-x"), Some(3_000_000));
        assert_eq!(input("b", "other"), None);
        // A price is not part of an upstream: changing one rebuilds nothing.
        let cheaper = text.replace("input = 1.5", "input = 1.25");
        let reloaded = load_with(&dir, &cheaper, &[]).unwrap();
        assert_eq!(reloaded.list, config.list);
        assert_ne!(reloaded.prices, config.prices);
    }

    #[test]
    fn the_unpriced_are_each_upstreams_names_alias_targets_and_uncovered_patterns() {
        let dir = Dir::new();
        let text = "default = \"openai\"\n\
             [prices]\n\"gpt-4o\" = { input = 2.5 }\n\"o3*\" = { input = 2.0 }\n\
             [upstreams.openai]\nbase_url = \"https://o.example/v1\"\n\
             models = [\"gpt-4o\", \"o3-pro*\", \"gpt-4o-mini\", \"gpt-5*\"]\n\
             [upstreams.azure-eu]\nbase_url = \"https://a.example/v1\"\n\
             models = [\"gpt-4o\", \"gpt-4o-mini\"]\n\
             [upstreams.azure-eu.prices]\n\"gpt-4o-mini\" = { input = 0.15 }\n\
             [upstreams.local]\nbase_url = \"http://127.0.0.1:8000/v1\"\n\
             models = [\"llama*\"]\n\
             [aliases]\n\"fast\" = \"gpt-5-mini\"\n\"small\" = \"gpt-4o-mini\"\n";
        let config = load_with(&dir, text, &[]).unwrap();
        // o3-pro* is covered by o3*; azure-eu prices gpt-4o-mini itself; the alias fast goes
        // to a model only openai's gpt-5* serves, small to one listed already.
        assert_eq!(
            crate::config::prices::unpriced(&config),
            [
                "openai:gpt-4o-mini",
                "openai:gpt-5*",
                "openai:gpt-5-mini",
                "local:llama*",
            ]
        );
        let priced = text.replace(
            "[upstreams.openai]",
            "\"gpt-*\" = { input = 1.0 }\n\"llama*\" = { input = 0.1 }\n[upstreams.openai]",
        );
        let config = load_with(&dir, &priced, &[]).unwrap();
        assert!(crate::config::prices::unpriced(&config).is_empty());
    }

    #[test]
    fn a_bad_price_rejects_the_file_naming_where_it_is() {
        assert_eq!(
            error(&format!(
                "{}[upstreams.a.prices]\n\"m\" = {{ output = 1.0 }}\n",
                one("")
            )),
            "upstreams.a.prices.m: missing field `input`"
        );
        assert_eq!(
            error(&format!(
                "{}[prices]\n\"m\" = {{ input = \"free\" }}\n",
                one("")
            )),
            "prices.m.input: must be a number of US dollars per million tokens"
        );
        // Written after a table, prices_file would belong to that table.
        assert_eq!(
            error(&format!(
                "{}[upstreams.a.prices]\nprices_file = \"/x.json\"\n",
                one("")
            )),
            "upstreams.a.prices.prices_file: prices_file is a top-level setting: write it before the first [table]"
        );
        assert!(
            error(&format!(
                "prices_file = \"/nonexistent/prices.json\"\n{}",
                one("")
            ))
            .starts_with("prices_file: /nonexistent/prices.json cannot be read: ")
        );
    }

    #[test]
    fn an_upstream_without_keys_file_or_keys_env_takes_no_key() {
        let dir = Dir::new();
        let text = "default = \"local\"\n[upstreams.local]\nbase_url = \"http://vllm:8000/v1\"\n\
                    models = [\"llama\"]\n";
        let loaded = load_with(&dir, text, &[]).unwrap();
        assert!(loaded.list[0].settings.keys.is_empty());
        assert_eq!(loaded.list[0].keys_file, None);
        assert_eq!(loaded.list[0].keys_env, None);
    }

    #[test]
    fn every_field_is_read_in_file_order() {
        let dir = Dir::new();
        let keys = dir.file(
            "openai-keys",
            "# rotated monthly\n  sk-1  \n\n sk-2\n#sk-old\n",
        );
        let text = format!(
            r#"
            default = "openai"
            max_attempts = 5
            failover_on = [503, 429, 503]
            request_timeout_secs = 90

            [upstreams.openai]
            base_url = "https://api.openai.com/v1/"
            keys_file = "{keys}"
            models = ["gpt-4o", "gpt-4o-mini", "o3*"]
            weight = 3

            [upstreams.azure-eu]
            base_url = "https://example-eu.openai.azure.com/openai/v1"
            keys_env = "AZURE_EU_KEYS"
            auth_header = "api-key"
            query = "api-version=preview"
            models = ["gpt-4o"]
            tier = 1

            [upstreams.local]
            base_url = "http://vllm:8000/v1"
            models = ["llama-3.1-70b"]
            model_names = {{ "llama-3.1-70b" = "meta-llama/Llama-3.1-70B-Instruct" }}
            timeout_secs = 120
            connect_timeout_secs = 2
            http2_connections = 4

            [aliases]
            "gpt-4" = "gpt-4o"
            "fast" = "gpt-4o-mini"
            "#
        );
        let config = load_with(&dir, &text, &[("AZURE_EU_KEYS", " az-1 , az-2 ")]).unwrap();
        let names: Vec<&str> = config.list.iter().map(|up| &*up.name).collect();
        assert_eq!(names, ["openai", "azure-eu", "local"], "the file's order");
        assert_eq!(config.default, 0);
        assert_eq!(config.default_upstream().name.as_ref(), "openai");
        assert_eq!(config.max_attempts, Some(5));
        assert_eq!(
            config.failover_on,
            [
                StatusCode::SERVICE_UNAVAILABLE,
                StatusCode::TOO_MANY_REQUESTS
            ]
        );
        assert_eq!(config.request_timeout, Duration::from_secs(90));
        assert_eq!(
            config.file.as_deref(),
            Some(dir.0.join("upstreams.toml").as_path())
        );

        let openai = &config.list[0];
        assert_eq!(
            openai.settings.base_url.as_str(),
            "https://api.openai.com/v1"
        );
        let keys: Vec<&str> = openai
            .settings
            .keys
            .iter()
            .map(|k| k.key.expose())
            .collect();
        assert_eq!(keys, ["sk-1", "sk-2"]);
        assert_eq!(openai.settings.keys[0].header_value, "Bearer sk-1");
        assert_eq!(openai.weight, 3);
        assert_eq!(openai.tier, 0);
        assert_eq!(openai.timeout, DEFAULTS.timeout);
        assert_eq!(
            openai.settings.connection.connect_timeout,
            DEFAULTS.connect_timeout
        );
        assert_eq!(openai.settings.connection.pools, 1);
        assert!(openai.models.matches("o3-mini") && !openai.models.matches("gpt-4"));
        assert_eq!(
            openai.keys_file.as_deref(),
            Some(Path::new(&keys_path(&dir)))
        );
        assert_eq!(openai.keys_env, None);

        let azure = &config.list[1];
        assert_eq!(azure.settings.auth_header, "api-key");
        let keys: Vec<&str> = azure.settings.keys.iter().map(|k| k.key.expose()).collect();
        assert_eq!(keys, ["az-1", "az-2"]);
        assert_eq!(azure.settings.keys[0].header_value, "az-1");
        assert_eq!(
            azure.settings.query.as_ref().unwrap().encoded,
            "api-version=preview"
        );
        assert_eq!((azure.tier, azure.weight), (1, 1));
        assert_eq!(azure.keys_env.as_deref(), Some("AZURE_EU_KEYS"));

        let local = &config.list[2];
        assert!(
            local.settings.keys.is_empty(),
            "no keys_file or keys_env: no key"
        );
        assert_eq!(local.timeout, Duration::from_secs(120));
        assert_eq!(
            local.settings.connection.connect_timeout,
            Duration::from_secs(2)
        );
        assert_eq!(local.settings.connection.pools, 4);
        assert_eq!(
            local.model_names.get("llama-3.1-70b").map(String::as_str),
            Some("meta-llama/Llama-3.1-70B-Instruct")
        );
        assert_eq!(
            config.aliases.get("gpt-4").map(String::as_str),
            Some("gpt-4o")
        );
        assert_eq!(config.aliases.len(), 2);
    }

    fn keys_path(dir: &Dir) -> String {
        dir.0.join("openai-keys").to_str().unwrap().to_string()
    }

    #[test]
    fn the_rules_across_upstreams_have_defaults() {
        let dir = Dir::new();
        let config = load_with(&dir, &one(""), &[("KEYS", "k")]).unwrap();
        assert_eq!(config.max_attempts, Some(3));
        let statuses: Vec<u16> = config.failover_on.iter().map(StatusCode::as_u16).collect();
        assert_eq!(statuses, [429, 500, 502, 503, 504, 529]);
        assert_eq!(config.request_timeout, Duration::from_secs(600));
        assert!(config.aliases.is_empty());
        let a = &config.list[0];
        assert_eq!((a.weight, a.tier), (1, 0));
        assert_eq!(a.settings.auth_header, "authorization");
        assert!(a.settings.query.is_none() && a.settings.connection.ca_file.is_none());
        let empty = load_with(
            &dir,
            &format!("failover_on = []\n{}", one("")),
            &[("KEYS", "k")],
        );
        assert!(
            empty.unwrap().failover_on.is_empty(),
            "no failover on a status"
        );
    }

    #[test]
    fn errors_name_the_upstream_and_the_field() {
        let cases = [
            (one("wieght = 2"), "upstreams.a.wieght: unknown field"),
            (
                one("weight = 0"),
                "upstreams.a.weight: must be a whole number of at least 1",
            ),
            (one("weight = \"heavy\""), "upstreams.a.weight: must be"),
            (
                one("tier = -1"),
                "upstreams.a.tier: must be a whole number of at least 0",
            ),
            (one("timeout_secs = 0"), "upstreams.a.timeout_secs: must be"),
            (
                one("connect_timeout_secs = 1.5"),
                "upstreams.a.connect_timeout_secs: must be",
            ),
            (
                one("http2_connections = 65"),
                "upstreams.a.http2_connections: is more than 64",
            ),
            (
                one("http2_connections = 0"),
                "upstreams.a.http2_connections: must be",
            ),
            (
                one("auth_header = \"bad header\""),
                "upstreams.a.auth_header: ",
            ),
            (
                one("query = \"=1\""),
                "upstreams.a.query: has a parameter without a name",
            ),
            (
                one("ca_file = \"/nonexistent/ca.pem\""),
                "upstreams.a.ca_file: ",
            ),
            (
                one("model_names = { \"x\" = \"y\" }"),
                "upstreams.a.model_names: \"x\" is not one",
            ),
            (
                one("model_names = { \"m\" = \"\" }"),
                "upstreams.a.model_names.m: must be a model name",
            ),
            (
                one("keys_file = \"/k\""),
                "upstreams.a.keys_file: give keys_file or keys_env, not both",
            ),
            (
                "default = \"a\"\n[upstreams.a]\nkeys_env = \"KEYS\"\nmodels = [\"m\"]".into(),
                "upstreams.a.base_url: is required",
            ),
            (
                "default = \"a\"\n[upstreams.a]\nbase_url = \"https://h/v1\"\nkeys_env = \"KEYS\""
                    .into(),
                "upstreams.a.models: is required",
            ),
            (
                "default = \"a\"\n[upstreams.\"a b\"]\nbase_url = \"https://h/v1\"".into(),
                "upstreams.a b: an upstream name is one or more of A-Z a-z 0-9 _ . -",
            ),
            (
                "default = \"a\"\n[upstreams.\"\"]\nbase_url = \"https://h/v1\"".into(),
                "upstreams.: an upstream name",
            ),
            (
                "default = \"a\"\n[upstreams]\na = 5".into(),
                "upstreams.a: ",
            ),
        ];
        for (text, named) in cases {
            let message = error(&text);
            assert!(message.starts_with(named), "{text:?}: {message}");
        }
        let unknown = error(&one("wieght = 2"));
        assert!(
            unknown.contains("`weight`"),
            "names what is accepted: {unknown}"
        );
    }

    #[test]
    fn a_base_url_is_checked_as_target_base_url_is_pointing_at_the_files_fields() {
        for (url, says) in [
            (
                "api.openai.com",
                "must be an absolute http:// or https:// URL",
            ),
            ("ftp://h/v1", "must be an absolute http:// or https:// URL"),
            (
                "https://u:pw@h/v1",
                "put the upstream key in keys_file or keys_env",
            ),
            ("https://h/v1?api-version=1", "in query"),
        ] {
            let text = format!(
                "default = \"a\"\n[upstreams.a]\nbase_url = \"{url}\"\nkeys_env = \"KEYS\"\nmodels = [\"m\"]"
            );
            let message = error(&text);
            assert!(
                message.starts_with("upstreams.a.base_url: "),
                "{url}: {message}"
            );
            assert!(message.contains(says), "{url}: {message}");
            assert!(!message.contains("pw"), "{message}");
        }
    }

    #[test]
    fn the_rules_across_upstreams_are_checked() {
        let cases = [
            (
                one("").replace("default = \"a\"\n", ""),
                "default: is required",
            ),
            (
                one("").replace("\"a\"\n[", "\"b\"\n["),
                "default: \"b\" is not an upstream of this file (upstreams: a)",
            ),
            (
                format!("max_attempts = 0\n{}", one("")),
                "max_attempts: must be a whole number of at least 1",
            ),
            (
                format!("request_timeout_secs = 0\n{}", one("")),
                "request_timeout_secs: must be",
            ),
            (
                format!("failover_on = [200]\n{}", one("")),
                "failover_on: must be a list of HTTP error statuses",
            ),
            (
                format!("failover_on = [600]\n{}", one("")),
                "failover_on: must be",
            ),
            (
                format!("failover_on = 503\n{}", one("")),
                "failover_on: must be",
            ),
            (
                format!("retries = 2\n{}", one("")),
                "retries: unknown field",
            ),
            ("default = \"a\"\n".to_string(), "has no upstreams"),
            (
                "default = \"a\"\n[upstreams.a\n".to_string(),
                "is not valid TOML",
            ),
        ];
        for (text, named) in cases {
            let message = error(&text);
            assert!(message.starts_with(named), "{text:?}: {message}");
        }
    }

    #[test]
    fn models_are_a_non_empty_list_of_patterns() {
        let dir = Dir::new();
        let everything = load_with(
            &dir,
            &one("").replace("[\"m\", \"p-*\"]", "[\"*\"]"),
            &[("KEYS", "k")],
        );
        assert_eq!(everything.unwrap().list[0].models, ModelPatterns::any());
        for (models, says) in [
            ("[]", "upstreams.a.models: is empty"),
            (
                "[\"gpt-*-mini\"]",
                "upstreams.a.models: entry 1: a model pattern is",
            ),
            (
                "[\"m\", \"*x\"]",
                "upstreams.a.models: entry 2: a model pattern is",
            ),
            ("[\"\"]", "upstreams.a.models: entry 1: "),
            ("\"m\"", "upstreams.a.models: must be a list"),
            ("[5]", "upstreams.a.models: must be a list"),
        ] {
            let message = error(&one("").replace("[\"m\", \"p-*\"]", models));
            assert!(message.starts_with(says), "{models}: {message}");
        }
        // A model_names entry may name a model a prefix matches.
        let renamed = load_with(
            &dir,
            &one("model_names = { \"p-1\" = \"vendor/p-1\" }"),
            &[("KEYS", "k")],
        );
        assert!(renamed.is_ok(), "{:?}", renamed.err());
    }

    #[test]
    fn missing_or_empty_keys_stop_the_load_naming_the_upstream() {
        let dir = Dir::new();
        let with_file = |text: &str| {
            let keys = dir.file("keys", text);
            let file = one("").replace("keys_env = \"KEYS\"", &format!("keys_file = \"{keys}\""));
            load_with(&dir, &file, &[]).map_err(|err| err.message)
        };
        for text in ["", "\n  \n", "# only a comment\n\n"] {
            let message = with_file(text).unwrap_err();
            assert!(
                message.contains("upstreams.a.keys_file: ")
                    && message.contains("holds no key for upstream a"),
                "{text:?}: {message}"
            );
        }
        let bad = with_file("sk-good\nsk-bad\u{7f}key\n").unwrap_err();
        assert!(
            bad.contains("upstreams.a.keys_file: key 2 contains characters"),
            "{bad}"
        );
        assert!(!bad.contains("sk-bad") && !bad.contains("sk-good"), "{bad}");
        let gone = one("").replace("keys_env = \"KEYS\"", "keys_file = \"/nonexistent/keys\"");
        let message = load_with(&dir, &gone, &[]).unwrap_err().message;
        assert!(
            message.contains("upstreams.a.keys_file: /nonexistent/keys cannot be read"),
            "{message}"
        );

        for vars in [&[][..], &[("KEYS", "  ")][..]] {
            let message = load_with(&dir, &one(""), vars).unwrap_err().message;
            assert!(
                message.contains(
                    "upstreams.a.keys_env: KEYS is not set or empty: upstream a has no keys"
                ),
                "{vars:?}: {message}"
            );
        }
        let message = load_with(&dir, &one(""), &[("KEYS", "k1,,k3")])
            .unwrap_err()
            .message;
        assert!(
            message.contains("upstreams.a.keys_env: key 2 is empty"),
            "{message}"
        );
    }

    #[test]
    fn aliases_name_a_served_model_one_level_deep() {
        let dir = Dir::new();
        let good = load_with(
            &dir,
            &one("[aliases]\n\"big\" = \"m\"\n\"pro\" = \"p-1\""),
            &[("KEYS", "k")],
        );
        assert_eq!(good.unwrap().aliases.len(), 2);
        for (aliases, says) in [
            (
                "\"big\" = \"gone\"",
                "aliases.big: \"gone\" is not served by any upstream",
            ),
            (
                "\"big\" = \"m\"\n\"huge\" = \"big\"",
                "aliases.huge: \"big\" is itself an alias",
            ),
            (
                "\"self\" = \"self\"",
                "aliases.self: \"self\" is itself an alias",
            ),
            ("\"m\" = \"p-1\"", "aliases.m: is a model of upstream a"),
            ("\"big\" = 5", "aliases.big: must be a model name"),
            ("\"big\" = \"\"", "aliases.big: must be a model name"),
            ("\"\" = \"m\"", "aliases: \"\" is not a model name"),
        ] {
            let message = error(&one(&format!("[aliases]\n{aliases}")));
            assert!(message.starts_with(says), "{aliases}: {message}");
        }
    }

    #[test]
    fn an_unchanged_upstream_compares_equal_across_loads() {
        let dir = Dir::new();
        let text = format!(
            "{}\n[upstreams.b]\nbase_url = \"https://b/v1\"\nkeys_env = \"B\"\nmodels = [\"n\"]\n",
            one("")
        );
        let load = |vars: &[(&str, &str)], text: &str| load_with(&dir, text, vars).unwrap();
        let first = load(&[("KEYS", "k"), ("B", "b1")], &text);
        let same = load(&[("KEYS", "k"), ("B", "b1")], &text);
        assert_eq!(first, same);
        let new_key = load(&[("KEYS", "k"), ("B", "b2")], &text);
        assert_eq!(first.list[0], new_key.list[0], "a kept untouched");
        assert_ne!(first.list[1], new_key.list[1], "a key compared by value");
        for change in [
            "weight = 2",
            "tier = 1",
            "timeout_secs = 5",
            "query = \"x=1\"",
            "model_names = { \"m\" = \"n\" }",
        ] {
            let changed = load(
                &[("KEYS", "k"), ("B", "b1")],
                &text.replace(
                    "models = [\"m\", \"p-*\"]",
                    &format!("models = [\"m\", \"p-*\"]\n{change}"),
                ),
            );
            assert_ne!(first.list[0], changed.list[0], "{change}");
            assert_eq!(first.list[1], changed.list[1], "{change}");
        }
    }

    #[test]
    fn the_environments_upstream_is_one_named_default_serving_every_model() {
        let dir = Dir::new();
        let settings = load_with(&dir, &one(""), &[("KEYS", "k1,k2")])
            .unwrap()
            .list[0]
            .settings
            .clone();
        let single = UpstreamsConfig::single(settings.clone(), Duration::from_secs(30));
        assert_eq!(single.file, None);
        assert_eq!(single.max_attempts, None);
        assert_eq!(single.default_upstream().name.as_ref(), "default");
        assert_eq!(single.default_upstream().settings, settings);
        assert_eq!(single.default_upstream().timeout, Duration::from_secs(30));
        assert!(single.default_upstream().models.matches("anything-at-all"));
        assert_eq!((single.list[0].weight, single.list[0].tier), (1, 0));
        assert_eq!(
            single.request_timeout,
            Duration::from_secs(60),
            "each key once"
        );
    }
}
