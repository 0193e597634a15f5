//! STUB (replaced by the config branch).
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use warp::http::StatusCode;

use super::UpstreamConfig;
use crate::vocab::models::ModelPatterns;

#[derive(Clone, Debug)]
pub struct UpstreamsConfig {
    pub file: Option<PathBuf>,
    pub default: usize,
    pub max_attempts: Option<u32>,
    pub failover_on: Vec<StatusCode>,
    pub request_timeout: Duration,
    pub list: Vec<NamedUpstream>,
    pub aliases: BTreeMap<String, String>,
}

#[derive(Clone, Debug)]
pub struct NamedUpstream {
    pub name: Arc<str>,
    pub settings: UpstreamConfig,
    pub timeout: Duration,
    pub models: ModelPatterns,
    pub model_names: BTreeMap<String, String>,
    pub weight: u32,
    pub tier: u32,
    pub keys_file: Option<PathBuf>,
    pub keys_env: Option<String>,
}

impl UpstreamsConfig {
    pub fn from_env(settings: &UpstreamConfig, timeout: Duration) -> UpstreamsConfig {
        UpstreamsConfig {
            file: None,
            default: 0,
            max_attempts: None,
            failover_on: [429, 500, 502, 503, 504, 529]
                .into_iter()
                .filter_map(|code| StatusCode::from_u16(code).ok())
                .collect(),
            request_timeout: Duration::from_secs(600),
            list: vec![NamedUpstream {
                name: Arc::from("default"),
                settings: settings.clone(),
                timeout,
                models: ModelPatterns::any(),
                model_names: BTreeMap::new(),
                weight: 1,
                tier: 0,
                keys_file: None,
                keys_env: None,
            }],
            aliases: BTreeMap::new(),
        }
    }
}

impl NamedUpstream {
    pub fn unchanged(&self, _other: &NamedUpstream) -> bool {
        false
    }
}
