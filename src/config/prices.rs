//! Prices, in US dollars per million tokens: the `[prices]` table for every upstream, each
//! upstream's own `[upstreams.<name>.prices]`, and a `prices_file` in LiteLLM's
//! `model_prices_and_context_window.json` format for the models the tables do not price. An
//! entry that does not parse rejects the whole file, naming the table, the model and the field.
//!
//! Without an upstreams file, `PRICES_FILE` holds the same `[prices]` table (and optionally
//! `prices_file`) for the environment's one upstream.

use std::sync::Arc;

use rustc_hash::FxHashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::Error as _;

use super::UpstreamsConfig;
use super::clients::{at_path, one_line, value};
use super::error::{ConfigError, invalid};
use crate::vocab::PriceTable;
use crate::vocab::models::ModelPattern;
use crate::vocab::price::{Price, PriceList, picos_per_token};

/// `PRICES_FILE`: what an upstreams file says of prices, without the upstreams.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PricesFile {
    #[serde(default)]
    prices: toml::Table,
    #[serde(default, deserialize_with = "path")]
    prices_file: Option<String>,
}

fn path<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    match value(deserializer)? {
        toml::Value::String(text) if !text.trim().is_empty() => Ok(Some(text.trim().to_string())),
        _ => Err(D::Error::custom("must be a non-empty string")),
    }
}

/// The prices `PRICES_FILE` names, for every model of the environment's one upstream, and the
/// LiteLLM file it read them from too, if any (watched with it). The error names `PRICES_FILE`,
/// the path, and the table, model and field.
pub fn load_prices_file(path: &Path) -> Result<(PriceTable, Option<PathBuf>), ConfigError> {
    let failed = |message: String| invalid("PRICES_FILE", format!("{}: {message}", path.display()));
    let text =
        std::fs::read_to_string(path).map_err(|err| failed(format!("cannot be read: {err}")))?;
    parse_prices_file(&text).map_err(failed)
}

fn parse_prices_file(text: &str) -> Result<(PriceTable, Option<PathBuf>), String> {
    let document: toml::Table = text
        .parse()
        .map_err(|err: toml::de::Error| format!("is not valid TOML: {}", one_line(&err)))?;
    let file: PricesFile = serde_path_to_error::deserialize(toml::Value::Table(document))
        .map_err(|err| at_path("", &err))?;
    let litellm = file.prices_file.map(PathBuf::from);
    let table = PriceTable {
        per_upstream: FxHashMap::default(),
        shared: price_list("prices", file.prices)?,
        file: match &litellm {
            Some(path) => litellm_file(path)?,
            None => FxHashMap::default(),
        },
    };
    Ok((table, litellm))
}

/// One model's entry: `{ input = 2.50, cached_input = 1.25, output = 10.00 }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    #[serde(deserialize_with = "per_million")]
    input: u64,
    #[serde(default, deserialize_with = "some_per_million")]
    cached_input: Option<u64>,
    #[serde(default, deserialize_with = "per_million")]
    output: u64,
}

/// A number (whole or not) of dollars per million tokens, as pico-dollars per token.
fn per_million<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let number = match value(deserializer)? {
        toml::Value::Float(number) => number,
        toml::Value::Integer(number) => number as f64,
        _ => {
            return Err(D::Error::custom(
                "must be a number of US dollars per million tokens",
            ));
        }
    };
    picos_per_token(number).map_err(D::Error::custom)
}

fn some_per_million<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u64>, D::Error> {
    per_million(deserializer).map(Some)
}

/// A `prices` table (`at` is where it sits: `prices`, `upstreams.azure-eu.prices`), each key an
/// exact model name or a prefix ending in `*`.
pub fn price_list(at: &str, table: toml::Table) -> Result<PriceList, String> {
    let mut entries = Vec::with_capacity(table.len());
    for (model, entry) in table {
        let place = format!("{at}.{}", quoted(&model));
        if model == "prices_file" {
            // TOML puts a key written after a table's header into that table.
            return Err(format!(
                "{place}: prices_file is a top-level setting: write it before the first [table]"
            ));
        }
        let pattern = ModelPattern::parse(&model).map_err(|err| format!("{place}: {err}"))?;
        let entry: Entry =
            serde_path_to_error::deserialize(entry).map_err(|err| at_path(&place, &err))?;
        entries.push((
            pattern,
            Price {
                input: entry.input,
                cached_input: entry.cached_input,
                output: entry.output,
            },
        ));
    }
    Ok(PriceList::new(entries))
}

/// The routed models that have no price, as `upstream:model`, in file order: for each upstream,
/// each of its exact model names and of the alias targets it serves that has no price there, and
/// each of its patterns not wholly covered by a price pattern (`local:llama*`; `default:*` for
/// the environment's one upstream unless a `"*"` price covers everything). Each is a way to a
/// request that would be served without a cost.
pub fn unpriced(upstreams: &UpstreamsConfig) -> Vec<String> {
    let mut missing = Vec::new();
    for upstream in &upstreams.list {
        let name = &*upstream.name;
        let targets = upstreams
            .aliases
            .values()
            .filter(|target| upstream.models.matches(target))
            .map(|target| ModelPattern::Exact(target.clone()));
        for pattern in upstream.models.iter().cloned().chain(targets) {
            let priced = match &pattern {
                ModelPattern::Exact(model) => upstreams.prices.price(name, model).is_some(),
                ModelPattern::Prefix(prefix) => upstreams.prices.covers(name, prefix),
            };
            let entry = format!("{name}:{pattern}");
            if !priced && !missing.contains(&entry) {
                missing.push(entry);
            }
        }
    }
    missing
}

/// A model name as TOML writes a key: bare when it can be, quoted otherwise (`"gpt-4o"` is
/// bare-able, `"o3*"` is not).
fn quoted(model: &str) -> String {
    let bare = !model.is_empty()
        && model
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-'));
    if bare {
        model.to_string()
    } else {
        format!("{:?}", model.chars().take(80).collect::<String>())
    }
}

/// LiteLLM's price file: an object of models, each with its costs in US dollars per token.
/// Entries without `input_cost_per_token` (images priced per pixel, audio per second, the
/// `sample_spec` that documents the format) price nothing and are skipped; a cost that is there
/// but is not a price rejects the file.
pub fn litellm_file(path: &Path) -> Result<FxHashMap<Arc<str>, Price>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| format!("prices_file: {} cannot be read: {err}", path.display()))?;
    litellm_prices(&text).map_err(|err| format!("prices_file: {}: {err}", path.display()))
}

fn litellm_prices(text: &str) -> Result<FxHashMap<Arc<str>, Price>, String> {
    let document: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
        .map_err(|err| format!("is not a JSON object of models: {err}"))?;
    let mut prices = FxHashMap::default();
    for (model, entry) in document {
        if model == "sample_spec" {
            continue;
        }
        let Some(entry) = entry.as_object() else {
            continue;
        };
        let cost = |field: &str| -> Result<Option<u64>, String> {
            match entry.get(field) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::Number(number)) => number
                    .as_f64()
                    .and_then(|per_token| picos_per_token(per_token * 1e6).ok())
                    .map(Some)
                    .ok_or_else(|| {
                        format!(
                            "{}.{field}: must be US dollars per token, from 0 up",
                            quoted(&model)
                        )
                    }),
                Some(_) => Err(format!(
                    "{}.{field}: must be a number of US dollars per token",
                    quoted(&model)
                )),
            }
        };
        let Some(input) = cost("input_cost_per_token")? else {
            continue;
        };
        prices.insert(
            Arc::from(model.as_str()),
            Price {
                input,
                cached_input: cost("cache_read_input_token_cost")?,
                output: cost("output_cost_per_token")?.unwrap_or(0),
            },
        );
    }
    Ok(prices)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> Result<PriceList, String> {
        let document: toml::Table = text.parse().unwrap();
        price_list("prices", document)
    }

    #[test]
    fn a_table_prices_exact_names_and_prefixes() {
        let list = table(
            r#"
            "gpt-4o"      = { input = 2.50, cached_input = 1.25, output = 10.00 }
            "o3*"         = { input = 2, cached_input = 0.50, output = 8 }
            "text-embedding-3-small" = { input = 0.02 }
            "#,
        )
        .unwrap();
        assert_eq!(
            list.get("gpt-4o"),
            Some(Price {
                input: 2_500_000,
                cached_input: Some(1_250_000),
                output: 10_000_000,
            })
        );
        assert_eq!(
            list.get("o3-mini").map(|price| price.input),
            Some(2_000_000)
        );
        assert_eq!(
            list.get("text-embedding-3-small"),
            Some(Price {
                input: 20_000,
                cached_input: None,
                output: 0,
            })
        );
        assert_eq!(list.get("gpt-4o-mini"), None);
    }

    #[test]
    fn a_bad_entry_names_the_table_the_model_and_the_field() {
        assert_eq!(
            table(r#""gpt-4o" = { output = 10.0 }"#).unwrap_err(),
            "prices.gpt-4o: missing field `input`"
        );
        assert_eq!(
            table(r#""gpt-4o" = { input = -1.0 }"#).unwrap_err(),
            "prices.gpt-4o.input: a price is US dollars per million tokens: a number from 0 to 1000000"
        );
        assert_eq!(
            table(r#""o3*" = { input = 1.0, output = "ten" }"#).unwrap_err(),
            "prices.\"o3*\".output: must be a number of US dollars per million tokens"
        );
        let typo = table(r#""gpt-4o" = { input = 1.0, outptu = 2.0 }"#).unwrap_err();
        assert!(
            typo.starts_with("prices.gpt-4o.outptu: unknown field `outptu`"),
            "{typo}"
        );
        assert_eq!(
            table(r#""gpt-*-mini" = { input = 1.0 }"#).unwrap_err(),
            "prices.\"gpt-*-mini\": a model pattern is an exact name, or a prefix followed by one * at its end (\"o3*\"; \"*\" alone: every model)"
        );
        assert!(
            table(r#""gpt-4o" = 2.5"#)
                .unwrap_err()
                .starts_with("prices.gpt-4o: ")
        );
    }

    #[test]
    fn prices_file_holds_only_prices_and_prices_file() {
        let dir = std::env::temp_dir().join(format!("llm-proxy-prices-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json = dir.join("model_prices.json");
        std::fs::write(&json, r#"{"claude-x": {"input_cost_per_token": 3e-06}}"#).unwrap();
        let (table, litellm) = parse_prices_file(&format!(
            "prices_file = {:?}\n[prices]\n\"gpt-4o\" = {{ input = 2.5, output = 10 }}\n",
            json.display()
        ))
        .unwrap();
        assert_eq!(litellm.as_deref(), Some(json.as_path()));
        assert_eq!(
            table.price("default", "gpt-4o").map(|price| price.output),
            Some(10_000_000)
        );
        assert_eq!(
            table.price("default", "claude-x").map(|price| price.input),
            Some(3_000_000)
        );
        let (empty, none) = parse_prices_file("").unwrap();
        assert!(empty.is_empty() && none.is_none());

        let error = |text: &str| parse_prices_file(text).map(|_| ()).unwrap_err();
        let unknown = error("[upstreams.a]\nbase_url = \"https://a\"\n");
        assert!(
            unknown.starts_with("upstreams: unknown field `upstreams`"),
            "{unknown}"
        );
        assert_eq!(
            error("[prices]\n\"gpt-4o\" = { input = 2.5, outptu = 10 }\n")
                .split(", expected")
                .next(),
            Some("prices.gpt-4o.outptu: unknown field `outptu`")
        );
        assert_eq!(
            error("prices_file = 3\n"),
            "prices_file: must be a non-empty string"
        );
        assert!(
            error("prices_file = \"/nonexistent/prices.json\"\n")
                .starts_with("prices_file: /nonexistent/prices.json cannot be read: ")
        );
        assert!(error("[prices\n").starts_with("is not valid TOML: "));
        let missing = load_prices_file(&dir.join("absent.toml")).unwrap_err();
        assert_eq!(missing.variable, "PRICES_FILE");
        assert!(
            missing.message.starts_with(&format!(
                "{}: cannot be read: ",
                dir.join("absent.toml").display()
            )),
            "{missing}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn litellms_file_prices_per_token_entries_and_skips_the_rest() {
        let prices = litellm_prices(
            r#"{
              "sample_spec": {"input_cost_per_token": 0.0, "max_tokens": "LEGACY"},
              "claude-3-5-sonnet-20241022": {
                "input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
                "cache_read_input_token_cost": 3e-07, "litellm_provider": "anthropic"
              },
              "dall-e-3": {"input_cost_per_pixel": 4e-08},
              "text-embedding-3-large": {"input_cost_per_token": 1.3e-07}
            }"#,
        )
        .unwrap();
        assert_eq!(
            prices.get("claude-3-5-sonnet-20241022"),
            Some(&Price {
                input: 3_000_000,
                cached_input: Some(300_000),
                output: 15_000_000,
            })
        );
        assert_eq!(
            prices.get("text-embedding-3-large"),
            Some(&Price {
                input: 130_000,
                cached_input: None,
                output: 0,
            })
        );
        assert_eq!(prices.len(), 2);
        assert_eq!(
            litellm_prices(r#"{"m": {"input_cost_per_token": "cheap"}}"#).unwrap_err(),
            "m.input_cost_per_token: must be a number of US dollars per token"
        );
        assert_eq!(
            litellm_prices(r#"{"m": {"input_cost_per_token": 1e-6, "output_cost_per_token": -1}}"#)
                .unwrap_err(),
            "m.output_cost_per_token: must be US dollars per token, from 0 up"
        );
        assert!(litellm_prices("[1]").is_err());
    }
}
