//! Which route a request is for, decided once from its path. The metrics, admission and the
//! access line all ask this one enum; the warp filters in this folder match the same paths, and a
//! test below holds the two together.

use warp::http::Method;

/// Every route the proxy knows, as its consumers need to tell them apart.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Route {
    /// `POST /v1/chat/completions`, the route most dashboards want on its own.
    Chat,
    /// `GET /v1/models`, answered from the cache.
    Models,
    /// Everything else under `/v1`, forwarded as it is.
    Passthrough,
    /// `/admin/...` but `/admin/clients`; only `/admin/cache/clear` exists.
    Admin,
    /// `GET /admin/clients`: every client's limits and usage.
    AdminClients,
    Healthz,
    Readyz,
    Metrics,
    /// Unknown paths (404s) and refused requests.
    Other,
}

impl Route {
    /// How many variants there are, for tables indexed by `route as usize`.
    pub const COUNT: usize = 9;

    pub fn of(path: &str) -> Route {
        match path {
            "/v1/chat/completions" => Route::Chat,
            "/v1/models" => Route::Models,
            "/healthz" => Route::Healthz,
            "/readyz" => Route::Readyz,
            "/metrics" => Route::Metrics,
            "/admin/clients" => Route::AdminClients,
            _ if path == "/v1" || path.starts_with("/v1/") => Route::Passthrough,
            _ if path.starts_with("/admin/") => Route::Admin,
            _ => Route::Other,
        }
    }

    /// The `route` label of the metrics: a small fixed set, the two health probes sharing one.
    pub fn label(self) -> &'static str {
        match self {
            Route::Chat => "chat",
            Route::Models => "models",
            Route::Passthrough => "passthrough",
            Route::Admin | Route::AdminClients => "admin",
            Route::Healthz | Route::Readyz => "health",
            Route::Metrics => "metrics",
            Route::Other => "other",
        }
    }

    /// Probes must answer under overload: a liveness check that gets 503 because traffic is high
    /// would have the orchestrator restart a healthy proxy.
    pub fn bypasses_admission(self) -> bool {
        matches!(self, Route::Healthz | Route::Readyz | Route::Metrics)
    }

    /// The methods a route the proxy answers itself accepts, as the `Allow` header lists them.
    /// `None` for `/v1/...`: every method is forwarded there (OpenAI has `GET` and `DELETE` on
    /// paths that also take `POST`), so the proxy never answers 405 for them.
    pub fn allow(self) -> Option<&'static str> {
        match self {
            Route::Healthz | Route::Readyz | Route::Metrics | Route::AdminClients => Some("GET"),
            Route::Admin => Some("POST"),
            Route::Chat | Route::Models | Route::Passthrough | Route::Other => None,
        }
    }

    /// Whether `method` is the one `allow` names (each such route takes a single method).
    pub fn accepts(self, method: &Method) -> bool {
        self.allow().is_none_or(|allow| method.as_str() == allow)
    }
}

/// The endpoints whose answers carry a `usage` object worth counting (sub-paths included: the
/// Responses API answers `GET /v1/responses/{id}` with one).
pub fn reports_usage(path: &str) -> bool {
    [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
    ]
    .iter()
    .any(|endpoint| {
        path.strip_prefix(endpoint)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_classified_once() {
        let cases = [
            ("/v1/chat/completions", Route::Chat),
            ("/v1/models", Route::Models),
            ("/v1/models/gpt-4o", Route::Passthrough),
            ("/v1", Route::Passthrough),
            ("/v1/files/f-1/content", Route::Passthrough),
            ("/v1x", Route::Other),
            ("/admin/cache/clear", Route::Admin),
            ("/admin/other", Route::Admin),
            ("/admin/clients", Route::AdminClients),
            ("/healthz", Route::Healthz),
            ("/readyz", Route::Readyz),
            ("/metrics", Route::Metrics),
            ("/", Route::Other),
        ];
        for (path, route) in cases {
            assert_eq!(Route::of(path), route, "{path}");
        }
        assert_eq!(Route::Healthz.label(), Route::Readyz.label());
    }

    #[test]
    fn the_methods_a_route_accepts_are_the_ones_it_allows() {
        assert!(Route::Healthz.accepts(&Method::GET));
        assert!(!Route::Healthz.accepts(&Method::POST));
        assert!(Route::Admin.accepts(&Method::POST));
        assert!(!Route::Admin.accepts(&Method::GET));
        assert!(Route::Passthrough.accepts(&Method::DELETE));
    }

    #[test]
    fn usage_endpoints_include_their_sub_paths_only() {
        assert!(reports_usage("/v1/responses/resp_1"));
        assert!(reports_usage("/v1/chat/completions"));
        assert!(!reports_usage("/v1/chat/completionsx"));
        assert!(!reports_usage("/v1/models"));
    }
}
