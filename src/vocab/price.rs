//! Money: what a model's tokens cost at an upstream, and what a request cost. The upstreams file
//! writes the prices (config), the policy reserves and settles dollars with them, the proxy and
//! the access line price the answers; so the words live down here.
//!
//! Dollars are integers everywhere, so that a sum of a million requests is exact: a price in
//! pico-dollars per token (USD per million tokens x 10^6, which keeps six decimals of a price
//! per million), an amount in nano-dollars ([`Nanos`]). A request's cost is computed exactly in
//! pico-dollars and rounded up to the next nano-dollar: never under-billed, and never by as much
//! as a billionth of a dollar.

use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::Usage;
use super::models::ModelPattern;

/// An amount in US dollars x 10^9. `u64` holds 18 billion dollars.
pub type Nanos = u64;

pub const NANOS_PER_USD: u64 = 1_000_000_000;
const PICOS_PER_NANO: u128 = 1_000;
/// The largest price accepted, in USD per million tokens: anything above is a typo (a price per
/// token written where a price per million belongs is the other way round, and is too small to
/// catch).
pub const MAX_USD_PER_MILLION: f64 = 1_000_000.0;

/// What one token costs at an upstream, in pico-dollars (10^-12 USD).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Price {
    pub input: u64,
    /// Prompt tokens the upstream read from its cache; `None`: at `input`.
    pub cached_input: Option<u64>,
    /// Completion tokens, reasoning included; 0 for a model that only reads (embeddings).
    pub output: u64,
}

/// A price the file wrote (USD per million tokens) that is not a price.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadPrice;

impl std::fmt::Display for BadPrice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a price is US dollars per million tokens: a number from 0 to {MAX_USD_PER_MILLION}"
        )
    }
}

/// USD per million tokens into pico-dollars per token, the nearest integer (`2.5` ->
/// 2_500_000, `0.075` -> 75_000, where the binary fraction lies just off the decimal one).
pub fn picos_per_token(usd_per_million: f64) -> Result<u64, BadPrice> {
    if !usd_per_million.is_finite() || !(0.0..=MAX_USD_PER_MILLION).contains(&usd_per_million) {
        return Err(BadPrice);
    }
    Ok((usd_per_million * 1e6).round() as u64)
}

/// US dollars (a budget, a price per token of LiteLLM's file) into nano-dollars, the nearest
/// integer; `None` for a negative, infinite or unrepresentable amount.
pub fn nanos_of_usd(usd: f64) -> Option<Nanos> {
    let nanos = (usd * NANOS_PER_USD as f64).round();
    (usd.is_finite() && usd >= 0.0 && nanos < u64::MAX as f64).then_some(nanos as u64)
}

impl Price {
    /// What `usage` cost: uncached prompt tokens at `input`, cached ones at `cached_input`,
    /// completion tokens at `output`; rounded up to the next nano-dollar, saturating (usage is
    /// the upstream's to report).
    pub fn cost(&self, usage: &Usage) -> Nanos {
        let cached = usage.cached.min(usage.prompt);
        let picos = u128::from(usage.prompt - cached) * u128::from(self.input)
            + u128::from(cached) * u128::from(self.cached_input.unwrap_or(self.input))
            + u128::from(usage.completion) * u128::from(self.output);
        nanos_rounded_up(picos)
    }

    /// The most a request may cost before it is sent: `input_tokens` at `input` (none of them
    /// counted as cached) and `output_tokens` at `output`.
    pub fn reservation(&self, input_tokens: u64, output_tokens: u64) -> Nanos {
        let picos = u128::from(input_tokens) * u128::from(self.input)
            + u128::from(output_tokens) * u128::from(self.output);
        nanos_rounded_up(picos)
    }
}

fn nanos_rounded_up(picos: u128) -> Nanos {
    u64::try_from(picos.div_ceil(PICOS_PER_NANO)).unwrap_or(u64::MAX)
}

/// Nano-dollars as a JSON number of dollars.
pub fn usd(nanos: Nanos) -> f64 {
    nanos as f64 / NANOS_PER_USD as f64
}

/// Nano-dollars as the access line writes them: dollars with six decimals, rounded to the
/// nearest micro-dollar (`0.001234`).
pub fn format_usd(nanos: Nanos) -> String {
    let micros = nanos.saturating_add(500) / 1_000;
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

/// A correction of nano-dollars (either sign) as dollars with six decimals, for a log line.
pub fn format_signed_usd(nanos: i64) -> String {
    let sign = if nanos < 0 { "-" } else { "" };
    format!("{sign}{}", format_usd(nanos.unsigned_abs()))
}

/// Prices by model name: exact names, then the longest prefix of a trailing-`*` pattern. Each
/// entry keeps the name spend is counted under (the model, or the pattern as written), so that
/// pricing a request copies no string.
///
/// The maps hash with FxHash rather than the keyed SipHash: they are looked up on every priced
/// request, and their keys are the files' own names, so a caller cannot choose colliding keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PriceList {
    exact: FxHashMap<Arc<str>, Price>,
    /// Longest prefix first: (prefix, the pattern as written, price).
    prefixes: Vec<(String, Arc<str>, Price)>,
}

impl PriceList {
    pub fn new(entries: impl IntoIterator<Item = (ModelPattern, Price)>) -> PriceList {
        let mut list = PriceList::default();
        for (pattern, price) in entries {
            match pattern {
                ModelPattern::Exact(name) => {
                    list.exact.insert(Arc::from(name), price);
                }
                ModelPattern::Prefix(prefix) => {
                    let label = Arc::from(format!("{prefix}*"));
                    list.prefixes.push((prefix, label, price));
                }
            }
        }
        list.prefixes
            .sort_by(|(a, _, _), (b, _, _)| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        list
    }

    pub fn get(&self, model: &str) -> Option<Price> {
        self.entry(model).map(|(price, _)| price)
    }

    /// The price of `model` and the entry that priced it: the model's name, or the pattern.
    fn entry(&self, model: &str) -> Option<(Price, &Arc<str>)> {
        if let Some((name, price)) = self.exact.get_key_value(model) {
            return Some((*price, name));
        }
        self.prefixes
            .iter()
            .find(|(prefix, _, _)| model.starts_with(prefix.as_str()))
            .map(|(_, label, price)| (*price, label))
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }

    /// Whether every model starting with `prefix` has a price here: a price pattern whose
    /// prefix is a prefix of it (`o3*` covers `o3-pro*`; exact names never cover a pattern).
    pub fn covers(&self, prefix: &str) -> bool {
        self.prefixes
            .iter()
            .any(|(priced, _, _)| prefix.starts_with(priced.as_str()))
    }
}

/// A price found, and the entry of the tables that gave it: its exact name, or a trailing-`*`
/// pattern as written. Both are written in a file, so a metric labelled with the entry has as
/// many series as the file has entries, whatever names callers make up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Priced<'a> {
    pub price: Price,
    pub entry: &'a Arc<str>,
}

/// Every price the proxy knows: each upstream's own, the `[prices]` table for every upstream,
/// and the prices file (LiteLLM's format) for what the tables do not price.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PriceTable {
    pub per_upstream: FxHashMap<Arc<str>, PriceList>,
    pub shared: PriceList,
    /// Exact model names only, as the file keys them.
    pub file: FxHashMap<Arc<str>, Price>,
}

impl PriceTable {
    /// The price of `model` served by `upstream`: the upstream's own wins, then `[prices]`, then
    /// the prices file.
    pub fn price(&self, upstream: &str, model: &str) -> Option<Price> {
        self.priced(upstream, model).map(|priced| priced.price)
    }

    /// The price of `model` served by `upstream`, with the name of the entry that priced it.
    pub fn priced(&self, upstream: &str, model: &str) -> Option<Priced<'_>> {
        self.per_upstream
            .get(upstream)
            .and_then(|list| list.entry(model))
            .or_else(|| self.shared.entry(model))
            .or_else(|| {
                self.file
                    .get_key_value(model)
                    .map(|(name, price)| (*price, name))
            })
            .map(|(price, entry)| Priced { price, entry })
    }

    /// Whether every model starting with `prefix` has a price at `upstream`. The prices file
    /// names exact models only, so it never covers a pattern.
    pub fn covers(&self, upstream: &str, prefix: &str) -> bool {
        self.per_upstream
            .get(upstream)
            .is_some_and(|list| list.covers(prefix))
            || self.shared.covers(prefix)
    }

    /// Whether any price is known at all: without, nothing is priced and nothing need be looked
    /// up.
    pub fn is_empty(&self) -> bool {
        self.shared.is_empty()
            && self.file.is_empty()
            && self.per_upstream.values().all(PriceList::is_empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(input: f64, cached: Option<f64>, output: f64) -> Price {
        Price {
            input: picos_per_token(input).unwrap(),
            cached_input: cached.map(|cached| picos_per_token(cached).unwrap()),
            output: picos_per_token(output).unwrap(),
        }
    }

    #[test]
    fn prices_per_million_become_exact_picos_per_token() {
        assert_eq!(picos_per_token(2.5), Ok(2_500_000));
        assert_eq!(picos_per_token(0.075), Ok(75_000));
        assert_eq!(picos_per_token(0.15), Ok(150_000));
        assert_eq!(picos_per_token(0.0), Ok(0));
        assert_eq!(picos_per_token(-0.01), Err(BadPrice));
        assert_eq!(picos_per_token(f64::NAN), Err(BadPrice));
        assert_eq!(picos_per_token(f64::INFINITY), Err(BadPrice));
        assert_eq!(picos_per_token(1_000_001.0), Err(BadPrice));
        // LiteLLM's price per token lands on the same integer.
        assert_eq!(picos_per_token(2.5e-6 * 1e6), Ok(2_500_000));
    }

    #[test]
    fn a_cost_is_exact_and_rounded_up_to_the_nano_dollar() {
        let gpt_4o = price(2.50, Some(1.25), 10.00);
        // 1000 prompt tokens of which 400 cached, 200 completion tokens:
        // 600 x $2.50/M + 400 x $1.25/M + 200 x $10/M = $0.0015 + $0.0005 + $0.002 = $0.004.
        let usage = Usage {
            prompt: 1000,
            completion: 200,
            total: 1200,
            cached: 400,
        };
        assert_eq!(gpt_4o.cost(&usage), 4_000_000);
        assert_eq!(format_usd(gpt_4o.cost(&usage)), "0.004000");
        // 7 tokens of gpt-4o-mini input: 7 x 0.15 = 1.05 micro-dollars, exactly 1050 nanos.
        let mini = price(0.15, Some(0.075), 0.60);
        let seven = Usage {
            prompt: 7,
            ..Usage::default()
        };
        assert_eq!(mini.cost(&seven), 1_050);
        // One cached token at $0.075/M is 75 nanos.
        let one_cached = Usage {
            prompt: 1,
            cached: 1,
            ..Usage::default()
        };
        assert_eq!(mini.cost(&one_cached), 75);
        // One token at $0.0001/M is a tenth of a nano-dollar: rounded up to one.
        let tiny = price(0.0001, None, 0.0);
        assert_eq!(tiny.cost(&one_cached), 1);
        // Without a cached price, cached tokens cost `input`; more cached than prompt is capped.
        let plain = price(1.0, None, 2.0);
        let odd = Usage {
            prompt: 10,
            cached: 50,
            completion: 0,
            total: 10,
        };
        assert_eq!(plain.cost(&odd), 10_000);
        let absurd = Usage {
            prompt: u64::MAX,
            completion: u64::MAX,
            total: u64::MAX,
            cached: 0,
        };
        assert_eq!(
            price(1_000_000.0, None, 1_000_000.0).cost(&absurd),
            u64::MAX
        );
    }

    #[test]
    fn a_reservation_prices_the_input_and_the_output_cap() {
        let gpt_4o = price(2.50, Some(1.25), 10.00);
        // 100 tokens in at $2.50/M, 4096 out at $10/M.
        assert_eq!(gpt_4o.reservation(100, 4096), 250_000 + 40_960_000);
    }

    #[test]
    fn dollars_are_shown_with_six_decimals() {
        assert_eq!(format_usd(0), "0.000000");
        assert_eq!(format_usd(1_234_499), "0.001234");
        assert_eq!(format_usd(1_234_500), "0.001235");
        assert_eq!(format_usd(12 * NANOS_PER_USD + 5_000), "12.000005");
        assert_eq!(usd(1_500_000_000), 1.5);
        assert_eq!(nanos_of_usd(20.0), Some(20 * NANOS_PER_USD));
        assert_eq!(nanos_of_usd(0.01), Some(10_000_000));
        assert_eq!(nanos_of_usd(-1.0), None);
        assert_eq!(nanos_of_usd(f64::NAN), None);
        assert_eq!(nanos_of_usd(1e30), None);
    }

    #[test]
    fn the_upstreams_own_price_wins_then_the_shared_table_then_the_file() {
        let pattern = |text: &str| ModelPattern::parse(text).unwrap();
        let shared = PriceList::new([
            (pattern("gpt-4o"), price(2.5, None, 10.0)),
            (pattern("o3*"), price(2.0, None, 8.0)),
            (pattern("o3-pro*"), price(20.0, None, 80.0)),
        ]);
        let azure = PriceList::new([(pattern("gpt-4o"), price(2.75, None, 11.0))]);
        let table = PriceTable {
            per_upstream: [(Arc::from("azure-eu"), azure)].into_iter().collect(),
            shared,
            file: [(Arc::from("claude-x"), price(3.0, None, 15.0))]
                .into_iter()
                .collect(),
        };
        assert_eq!(
            table.price("azure-eu", "gpt-4o"),
            Some(price(2.75, None, 11.0))
        );
        assert_eq!(
            table.price("openai", "gpt-4o"),
            Some(price(2.5, None, 10.0))
        );
        // The longest prefix wins, whatever the order the file wrote them in.
        assert_eq!(
            table.price("openai", "o3-pro-2025"),
            Some(price(20.0, None, 80.0))
        );
        assert_eq!(
            table.price("openai", "o3-mini"),
            Some(price(2.0, None, 8.0))
        );
        assert_eq!(
            table.price("azure-eu", "claude-x"),
            Some(price(3.0, None, 15.0))
        );
        assert_eq!(table.price("openai", "gpt-4o-mini"), None);
        // The entry that priced a model names it: the model itself, or the pattern.
        let entry = |upstream, model| {
            table
                .priced(upstream, model)
                .map(|priced| priced.entry.to_string())
        };
        assert_eq!(entry("openai", "o3-pro-2025").as_deref(), Some("o3-pro*"));
        assert_eq!(entry("azure-eu", "gpt-4o").as_deref(), Some("gpt-4o"));
        assert_eq!(entry("openai", "claude-x").as_deref(), Some("claude-x"));
        assert!(!table.is_empty());
        assert!(PriceTable::default().is_empty());
    }
}
