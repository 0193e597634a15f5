//! Token usage as an upstream reports it: read from answers by the proxy, settled by the policy,
//! written on the access line and counted in the metrics.

/// Token counts as the OpenAI APIs report them; the Responses API says input/output where chat
/// completions say prompt/completion.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    pub total: u64,
    /// Prompt tokens the upstream read from its cache (`prompt_tokens_details.cached_tokens`,
    /// `input_tokens_details.cached_tokens`): part of `prompt`, and priced apart.
    pub cached: u64,
}
