//! What a request is for, decided once per request from its canonical path, method and shape:
//! its route, where the model check reads its model, whether its answer reports usage, and its
//! metrics label. Admission, the route table, the allow-list, the limits, the usage scan, the key
//! pool's retries, the metrics and the access line all read the one [`Endpoint`] value; there is
//! no other list of paths.
//!
//! Paths under `/v1` are compared in their canonical form, the one upstreams route by after
//! decoding `%XX` and folding `//` and a trailing `/`: compared as received,
//! `/v1/chat/%63ompletions` would be chat to the upstream but nothing to the usage scan, the
//! limits and the metrics. The request goes upstream under that canonical path, so what the
//! proxy counted is what the upstream served. Other paths (the proxy's own) are matched exactly
//! as received: `/admin//cache/clear` is not the admin route.

use std::sync::Arc;

use warp::http::{HeaderMap, Method, header};

use super::websocket::is_websocket_upgrade;

/// Declares [`Route`] and [`Route::ALL`] from one list of variants, so that tables sized by
/// [`Route::COUNT`] can never fall behind the enum.
macro_rules! routes {
    ($(#[$meta:meta])* pub enum Route { $($(#[$doc:meta])* $variant:ident,)* }) => {
        $(#[$meta])*
        pub enum Route {
            $($(#[$doc])* $variant,)*
        }

        impl Route {
            /// Every route, in declaration order: `Route::ALL[route.index()] == route`.
            pub const ALL: &'static [Route] = &[$(Route::$variant,)*];
        }
    };
}

routes! {
    /// Every route the proxy knows, as its consumers need to tell them apart.
    #[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
    pub enum Route {
        /// `/v1/chat/completions`, the route most dashboards want on its own.
        Chat,
        /// `/v1/models`: `GET` is answered from the cache.
        Models,
        /// Everything else under `/v1`, forwarded as it is.
        Passthrough,
        /// `POST /admin/cache/clear`.
        CacheClear,
        /// `GET /admin/clients`: every client's limits and usage.
        AdminClients,
        /// `GET /admin/upstreams`: every upstream's breaker, keys and load.
        AdminUpstreams,
        /// `GET /admin/spend`: today's and this month's spend by client, model or upstream.
        AdminSpend,
        /// `GET /admin/activity`: the last hour minute by minute.
        AdminActivity,
        /// `GET /admin/`, the status page (and `/admin`, sent there).
        AdminPage,
        /// `GET /admin/app.css` and `/admin/app.js`, the status page's stylesheet and script.
        AdminAsset,
        /// Any other `/admin/...` path: none exists, but its 404s count as admin traffic.
        Admin,
        Healthz,
        Readyz,
        Metrics,
        /// Unknown paths (404s).
        Other,
    }
}

impl Route {
    /// How many routes there are, for tables indexed by [`Route::index`].
    pub const COUNT: usize = Route::ALL.len();

    /// The route's place in [`Route::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The `route` label of the metrics: a small fixed set, the two health probes sharing one.
    pub fn label(self) -> &'static str {
        match self {
            Route::Chat => "chat",
            Route::Models => "models",
            Route::Passthrough => "passthrough",
            Route::CacheClear
            | Route::AdminClients
            | Route::AdminUpstreams
            | Route::AdminSpend
            | Route::AdminActivity
            | Route::AdminPage
            | Route::AdminAsset
            | Route::Admin => "admin",
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

    /// Whether requests for this route are forwarded upstream (everything under `/v1`).
    pub fn is_forwarded(self) -> bool {
        matches!(self, Route::Chat | Route::Models | Route::Passthrough)
    }

    /// The methods a route the proxy answers itself accepts, as the `Allow` header lists them.
    /// `None` for `/v1/...`: every method is forwarded there (OpenAI has `GET` and `DELETE` on
    /// paths that also take `POST`), so the proxy never answers 405 for them.
    pub fn allow(self) -> Option<&'static str> {
        match self {
            Route::Healthz
            | Route::Readyz
            | Route::Metrics
            | Route::AdminClients
            | Route::AdminUpstreams
            | Route::AdminSpend
            | Route::AdminActivity
            | Route::AdminPage
            | Route::AdminAsset => Some("GET"),
            Route::CacheClear => Some("POST"),
            Route::Chat | Route::Models | Route::Passthrough | Route::Admin | Route::Other => None,
        }
    }

    /// Whether `method` is the one `allow` names (each such route takes a single method).
    pub fn accepts(self, method: &Method) -> bool {
        self.allow().is_none_or(|allow| method.as_str() == allow)
    }
}

/// What the model check reads of a request to an endpoint, for a client with a `models` list.
/// The column of [`TABLE`] says it for the methods that can make the upstream act (`POST`, `PUT`,
/// `PATCH` and any other); `GET`, `HEAD`, `OPTIONS` and `DELETE` read or remove and pass
/// ([`Model::None`]), except a WebSocket upgrade, which opens a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Model {
    /// Nothing: the endpoint stores, reads or cancels, and makes the upstream generate nothing.
    None,
    /// The body's `model` (a JSON field, or a form field of a multipart upload), required.
    Body,
    /// A realtime session's model, from a JSON body: the top-level `model` and `session.model`
    /// are both read and every one present is checked. `nested` says which one the endpoint
    /// takes (`session.model` for client secrets, `model` for sessions): it is required, since
    /// without it the upstream picks its default model for the key it mints.
    Session { nested: bool },
    /// The `model` query parameter of a WebSocket upgrade (a Realtime tunnel): required, and
    /// only once, since the proxy cannot know which of two values the upstream takes.
    Query,
    /// Generates (or mints credentials) without naming a model where the proxy can read it (a
    /// batch's models are in its uploaded file, a run uses its assistant's): refused unless the
    /// client's `endpoints` list allows the path.
    Generates,
}

impl Model {
    /// Whether the check needs the request's body.
    pub fn in_body(self) -> bool {
        matches!(self, Model::Body | Model::Session { .. })
    }
}

/// How much of the path space a row covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Extent {
    /// The path itself; a `*` segment in it stands for any one segment.
    Exact,
    /// Every path below it, not the path itself.
    Below,
}

/// One known endpoint.
struct Row {
    path: &'static str,
    extent: Extent,
    route: Route,
    model: Model,
    /// Whether its answers carry a `usage` object worth counting.
    usage: bool,
}

const SESSION: Model = Model::Session { nested: false };
const SESSION_NESTED: Model = Model::Session { nested: true };
const GENERATES: Model = Model::Generates;

/// Every endpoint the proxy tells apart, first match winning. Paths under `/v1` are canonical.
/// A path under `/v1` that no other row names is taken as one that may generate: the proxy
/// cannot know that a new endpoint of the upstream does not.
#[rustfmt::skip]
const TABLE: &[Row] = &[
    //   path                                     extent         route               model             usage
    row("/v1/chat/completions",                   Extent::Exact, Route::Chat,        Model::Body,      true),
    // `POST /v1/chat/completions/{id}` updates a stored completion's metadata; `GET` answers with
    // its usage.
    row("/v1/chat/completions/*",                 Extent::Exact, Route::Passthrough, Model::None,      true),
    row("/v1/chat/completions",                   Extent::Below, Route::Passthrough, GENERATES,        true),
    row("/v1/completions",                        Extent::Exact, Route::Passthrough, Model::Body,      true),
    row("/v1/completions",                        Extent::Below, Route::Passthrough, GENERATES,        true),
    row("/v1/embeddings",                         Extent::Exact, Route::Passthrough, Model::Body,      true),
    row("/v1/embeddings",                         Extent::Below, Route::Passthrough, GENERATES,        true),
    row("/v1/responses",                          Extent::Exact, Route::Passthrough, Model::Body,      true),
    row("/v1/responses/input_tokens",             Extent::Exact, Route::Passthrough, Model::Body,      false),
    row("/v1/responses/compact",                  Extent::Exact, Route::Passthrough, Model::Body,      true),
    row("/v1/responses/*/cancel",                 Extent::Exact, Route::Passthrough, Model::None,      true),
    // `GET /v1/responses/{id}` answers with the response's usage.
    row("/v1/responses",                          Extent::Below, Route::Passthrough, GENERATES,        true),
    row("/v1/models",                             Extent::Exact, Route::Models,      Model::None,      false),
    row("/v1/models",                             Extent::Below, Route::Passthrough, Model::None,      false),
    row("/v1/moderations",                        Extent::Exact, Route::Passthrough, Model::Body,      false),
    row("/v1/audio/transcriptions",               Extent::Exact, Route::Passthrough, Model::Body,      false),
    row("/v1/audio/translations",                 Extent::Exact, Route::Passthrough, Model::Body,      false),
    row("/v1/audio/speech",                       Extent::Exact, Route::Passthrough, Model::Body,      false),
    row("/v1/images/generations",                 Extent::Exact, Route::Passthrough, Model::Body,      false),
    row("/v1/images/edits",                       Extent::Exact, Route::Passthrough, Model::Body,      false),
    row("/v1/images/variations",                  Extent::Exact, Route::Passthrough, Model::Body,      false),
    row("/v1/videos",                             Extent::Exact, Route::Passthrough, Model::Body,      false),
    // A Realtime WebSocket names its model in the query.
    row("/v1/realtime",                           Extent::Exact, Route::Passthrough, Model::Query,     false),
    // Both mint an ephemeral key the client then uses at the provider directly.
    row("/v1/realtime/sessions",                  Extent::Exact, Route::Passthrough, SESSION,          false),
    row("/v1/realtime/client_secrets",            Extent::Exact, Route::Passthrough, SESSION_NESTED,   false),
    // Mints a key too, but its transcription model can be changed over that key afterwards.
    row("/v1/realtime/transcription_sessions",    Extent::Exact, Route::Passthrough, GENERATES,        false),
    // A call's model is in its multipart `session` field (SDP offers), or in the body of accept.
    row("/v1/realtime/calls",                     Extent::Exact, Route::Passthrough, GENERATES,        false),
    row("/v1/realtime/calls/*/accept",            Extent::Exact, Route::Passthrough, Model::Body,      false),
    row("/v1/realtime/calls/*/hangup",            Extent::Exact, Route::Passthrough, Model::None,      false),
    row("/v1/realtime/calls/*/reject",            Extent::Exact, Route::Passthrough, Model::None,      false),
    row("/v1/realtime/calls/*/refer",             Extent::Exact, Route::Passthrough, Model::None,      false),
    // A batch's models are in its input file.
    row("/v1/batches",                            Extent::Exact, Route::Passthrough, GENERATES,        false),
    row("/v1/batches/*/cancel",                   Extent::Exact, Route::Passthrough, Model::None,      false),
    // Creating or renaming an eval runs nothing; a run samples with the models its data source
    // names, and with its graders'.
    row("/v1/evals",                              Extent::Exact, Route::Passthrough, Model::None,      false),
    row("/v1/evals/*",                            Extent::Exact, Route::Passthrough, Model::None,      false),
    row("/v1/evals/*/runs",                       Extent::Exact, Route::Passthrough, GENERATES,        false),
    row("/v1/evals/*/runs/*",                     Extent::Exact, Route::Passthrough, Model::None,      false),
    // A job's graders name models of their own, and resuming a job trains on.
    row("/v1/fine_tuning",                        Extent::Below, Route::Passthrough, GENERATES,        false),
    // An assistant generates only in a run, which uses the assistant's model (whoever made it)
    // unless the run names another.
    row("/v1/assistants",                         Extent::Exact, Route::Passthrough, Model::Body,      false),
    row("/v1/assistants",                         Extent::Below, Route::Passthrough, Model::None,      false),
    row("/v1/threads/runs",                       Extent::Exact, Route::Passthrough, GENERATES,        false),
    row("/v1/threads/*/runs",                     Extent::Exact, Route::Passthrough, GENERATES,        false),
    row("/v1/threads/*/runs/*/submit_tool_outputs", Extent::Exact, Route::Passthrough, GENERATES,      false),
    row("/v1/threads",                            Extent::Exact, Route::Passthrough, Model::None,      false),
    row("/v1/threads",                            Extent::Below, Route::Passthrough, Model::None,      false),
    row("/v1/files",                              Extent::Exact, Route::Passthrough, Model::None,      false),
    row("/v1/files",                              Extent::Below, Route::Passthrough, Model::None,      false),
    row("/v1/uploads",                            Extent::Exact, Route::Passthrough, Model::None,      false),
    row("/v1/uploads",                            Extent::Below, Route::Passthrough, Model::None,      false),
    row("/v1/conversations",                      Extent::Exact, Route::Passthrough, Model::None,      false),
    row("/v1/conversations",                      Extent::Below, Route::Passthrough, Model::None,      false),
    // Files added to a vector store, and its searches, are embedded.
    row("/v1/vector_stores",                      Extent::Exact, Route::Passthrough, GENERATES,        false),
    row("/v1/vector_stores",                      Extent::Below, Route::Passthrough, GENERATES,        false),
    row("/v1",                                    Extent::Exact, Route::Passthrough, GENERATES,        false),
    row("/v1",                                    Extent::Below, Route::Passthrough, GENERATES,        false),
    row("/healthz",                               Extent::Exact, Route::Healthz,     Model::None,      false),
    row("/readyz",                                Extent::Exact, Route::Readyz,      Model::None,      false),
    row("/metrics",                               Extent::Exact, Route::Metrics,     Model::None,      false),
    row("/admin/clients",                         Extent::Exact, Route::AdminClients, Model::None,     false),
    row("/admin/upstreams",                       Extent::Exact, Route::AdminUpstreams, Model::None,   false),
    row("/admin/spend",                           Extent::Exact, Route::AdminSpend,  Model::None,      false),
    row("/admin/cache/clear",                     Extent::Exact, Route::CacheClear,  Model::None,      false),
    row("/admin/activity",                        Extent::Exact, Route::AdminActivity, Model::None,    false),
    row("/admin/",                                Extent::Exact, Route::AdminPage,   Model::None,      false),
    row("/admin",                                 Extent::Exact, Route::AdminPage,   Model::None,      false),
    row("/admin/app.css",                         Extent::Exact, Route::AdminAsset,  Model::None,      false),
    row("/admin/app.js",                          Extent::Exact, Route::AdminAsset,  Model::None,      false),
    row("/admin",                                 Extent::Below, Route::Admin,       Model::None,      false),
];

const fn row(path: &'static str, extent: Extent, route: Route, model: Model, usage: bool) -> Row {
    Row {
        path,
        extent,
        route,
        model,
        usage,
    }
}

impl Row {
    /// Whether the path has a `*` segment.
    fn is_pattern(&self) -> bool {
        self.path.as_bytes().contains(&b'*')
    }

    /// One path: an exact row without a `*`.
    fn is_fixed(&self) -> bool {
        self.extent == Extent::Exact && !self.is_pattern()
    }

    fn matches(&self, path: &str) -> bool {
        match self.extent {
            Extent::Exact if self.is_pattern() => segments_match(self.path, path),
            Extent::Exact => path == self.path,
            Extent::Below => path
                .strip_prefix(self.path)
                .is_some_and(|rest| rest.starts_with('/')),
        }
    }
}

/// `pattern`'s segments against `path`'s, a `*` standing for any one segment.
fn segments_match(pattern: &str, path: &str) -> bool {
    let (mut pattern, mut path) = (pattern.split('/'), path.split('/'));
    loop {
        match (pattern.next(), path.next()) {
            (None, None) => return true,
            (Some(wanted), Some(segment)) if wanted == "*" || wanted == segment => {}
            _ => return false,
        }
    }
}

/// The one classification of a request. Cloning is cheap (the rare rewritten path is shared).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub route: Route,
    /// What the model check reads of this request: its row's column for the request's method.
    pub model: Model,
    /// Its answer carries a `usage` object worth counting.
    pub reports_usage: bool,
    /// The table row of a fixed path the request is for, see [`Endpoint::fixed`].
    fixed: Option<usize>,
    path: Spelling,
}

/// How the request's path relates to its canonical form.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Spelling {
    /// Canonical already, or kept as it came (a bodiless request whose path has no safe
    /// canonical form).
    AsReceived,
    Rewritten(Arc<str>),
    /// No safe canonical form, and a body the upstream would act on: refused.
    Unsafe,
}

impl Endpoint {
    /// The `route` label of the metrics and the access line.
    pub fn label(&self) -> &'static str {
        self.route.label()
    }

    /// The path the request is forwarded under, given the path it came with; `None` when the
    /// request must be refused (`invalid_path`) because its path has no safe canonical form.
    pub fn path<'a>(&'a self, received: &'a str) -> Option<&'a str> {
        match &self.path {
            Spelling::AsReceived => Some(received),
            Spelling::Rewritten(canonical) => Some(canonical),
            Spelling::Unsafe => None,
        }
    }

    /// For tables made once per fixed path (see [`fixed_paths`]): the position of the one this
    /// request is for, its forwarded path being exactly that path.
    pub fn fixed(&self) -> Option<usize> {
        self.fixed
    }
}

/// What the server hands the route table in the request's extensions: the classification and
/// the raw query string, taken from the request once. One extension, since each costs an
/// allocation; and the route table need not ask warp for a query that is not there, which warp
/// answers with an allocated rejection.
#[derive(Clone, Debug)]
pub struct Target {
    pub endpoint: Endpoint,
    pub query: Option<String>,
}

/// Every endpoint with one fixed path, with the position [`Endpoint::fixed`] gives it.
pub fn fixed_paths() -> impl Iterator<Item = (usize, &'static str)> {
    TABLE
        .iter()
        .enumerate()
        .filter(|(_, row)| row.is_fixed())
        .map(|(position, row)| (position, row.path))
}

/// How many positions [`Endpoint::fixed`] can give, for tables indexed by it.
pub const FIXED_POSITIONS: usize = TABLE.len();

/// The shape of a request, as far as its classification depends on more than its path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shape {
    /// It carries a body.
    pub has_body: bool,
    /// It asks to become a WebSocket.
    pub upgrade: bool,
}

/// Whether a message carries a body worth streaming on. Without one, no body is sent at all, so
/// a `GET` does not go out as an empty chunked message.
pub fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|length| length.as_bytes() != b"0")
}

impl Shape {
    /// What the classification needs of a request besides its method and path.
    pub fn of(method: &Method, headers: &HeaderMap) -> Shape {
        Shape {
            has_body: has_body(headers),
            upgrade: is_websocket_upgrade(method, headers),
        }
    }
}

/// Classifies a request. A request with a body whose path has no safe canonical form (an
/// encoded `/`, a dot segment, an invalid escape) is refused; without one its path is kept as it
/// came (model ids with an encoded `/` are real: `GET /v1/models/meta-llama%2FLlama-3.1-8B`) and
/// it is passthrough, checked as a path that may generate.
pub fn classify(method: &Method, path: &str, shape: Shape) -> Endpoint {
    let under_v1 = path
        .strip_prefix("/v1")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
    if !under_v1 {
        return lookup(method, path, shape, Spelling::AsReceived);
    }
    match canonical(path) {
        Canonical::Same => lookup(method, path, shape, Spelling::AsReceived),
        Canonical::Rewritten(canonical) => {
            let canonical: Arc<str> = Arc::from(canonical);
            lookup(
                method,
                &canonical,
                shape,
                Spelling::Rewritten(canonical.clone()),
            )
        }
        Canonical::Unsafe => Endpoint {
            route: Route::Passthrough,
            model: demand(Model::Generates, method, shape),
            reports_usage: false,
            fixed: None,
            path: if shape.has_body {
                Spelling::Unsafe
            } else {
                Spelling::AsReceived
            },
        },
    }
}

fn lookup(method: &Method, path: &str, shape: Shape, spelling: Spelling) -> Endpoint {
    match TABLE.iter().position(|row| row.matches(path)) {
        Some(position) => {
            let row = &TABLE[position];
            Endpoint {
                route: row.route,
                // Only what goes upstream is checked.
                model: if row.route.is_forwarded() {
                    demand(row.model, method, shape)
                } else {
                    Model::None
                },
                reports_usage: row.usage,
                fixed: row.is_fixed().then_some(position),
                path: spelling,
            }
        }
        None => Endpoint {
            route: Route::Other,
            model: Model::None,
            reports_usage: false,
            fixed: None,
            path: spelling,
        },
    }
}

/// What the model check reads of a request to an endpoint whose column is `column`. Every method
/// but the four that read or remove is checked (an upstream may take `PUT` or `PATCH` like
/// `POST`). A tunnel carries its requests in messages the proxy does not read, so only the
/// query of one to an endpoint that takes its model there says a model.
fn demand(column: Model, method: &Method, shape: Shape) -> Model {
    if shape.upgrade {
        return match column {
            Model::Query => Model::Query,
            _ => Model::Generates,
        };
    }
    if matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE
    ) {
        return Model::None;
    }
    match column {
        // Only an upgrade carries its model in the query.
        Model::Query => Model::Generates,
        column => column,
    }
}

enum Canonical {
    Same,
    Rewritten(String),
    Unsafe,
}

/// The path with escapes of unreserved characters (RFC 3986 2.3) decoded, other escapes kept,
/// empty segments dropped and no trailing `/`; `Unsafe` for an encoded `/`, a `.` or `..`
/// segment (literal or encoded) or an invalid escape.
fn canonical(path: &str) -> Canonical {
    if is_plainly_canonical(path.as_bytes()) {
        // The usual case, answered without copying the path.
        return Canonical::Same;
    }
    let mut canonical = String::with_capacity(path.len());
    for segment in path.split('/').filter(|segment| !segment.is_empty()) {
        canonical.push('/');
        let start = canonical.len();
        let mut rest = segment;
        while let Some(at) = rest.find('%') {
            canonical.push_str(&rest[..at]);
            let Some(escape) = rest
                .get(at + 1..at + 3)
                .filter(|hex| hex.bytes().all(|byte| byte.is_ascii_hexdigit()))
            else {
                return Canonical::Unsafe;
            };
            let Ok(byte) = u8::from_str_radix(escape, 16) else {
                return Canonical::Unsafe;
            };
            if byte == b'/' {
                return Canonical::Unsafe;
            }
            if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
                canonical.push(char::from(byte));
            } else {
                canonical.push_str(&rest[at..at + 3]);
            }
            rest = &rest[at + 3..];
        }
        canonical.push_str(rest);
        if matches!(&canonical[start..], "." | "..") {
            return Canonical::Unsafe;
        }
    }
    if canonical == path {
        Canonical::Same
    } else {
        Canonical::Rewritten(canonical)
    }
}

/// No `%`, no `//`, no trailing `/` and no segment starting with `.`: canonical for sure (a
/// segment such as `.well-known` is left to the slow path, which finds it canonical too).
fn is_plainly_canonical(path: &[u8]) -> bool {
    for (index, &byte) in path.iter().enumerate() {
        match byte {
            b'%' => return false,
            b'/' if matches!(path.get(index + 1), None | Some(b'/' | b'.')) => return false,
            _ => {}
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: Shape = Shape {
        has_body: true,
        upgrade: false,
    };

    fn route(path: &str) -> Route {
        classify(&Method::GET, path, Shape::default()).route
    }

    #[test]
    fn paths_are_classified_once() {
        let cases = [
            ("/v1/chat/completions", Route::Chat),
            ("/v1/models", Route::Models),
            ("/v1/models/gpt-4o", Route::Passthrough),
            ("/v1", Route::Passthrough),
            ("/v1/files/f-1/content", Route::Passthrough),
            ("/v1x", Route::Other),
            ("/admin/cache/clear", Route::CacheClear),
            ("/admin/other", Route::Admin),
            ("/admin/clients", Route::AdminClients),
            ("/admin/upstreams", Route::AdminUpstreams),
            ("/admin/spend", Route::AdminSpend),
            ("/admin/activity", Route::AdminActivity),
            ("/admin/", Route::AdminPage),
            ("/admin", Route::AdminPage),
            ("/admin/app.js", Route::AdminAsset),
            ("/admin/app.css", Route::AdminAsset),
            ("/admin/app.css/", Route::Admin),
            ("/admin//", Route::Admin),
            ("/healthz", Route::Healthz),
            ("/readyz", Route::Readyz),
            ("/metrics", Route::Metrics),
            ("/", Route::Other),
        ];
        for (path, expected) in cases {
            assert_eq!(route(path), expected, "{path}");
        }
        assert_eq!(Route::Healthz.label(), Route::Readyz.label());
    }

    #[test]
    fn every_route_has_its_place_in_the_list_of_all() {
        for (index, route) in Route::ALL.iter().enumerate() {
            assert_eq!(route.index(), index, "{route:?}");
        }
        assert_eq!(Route::COUNT, Route::ALL.len());
    }

    #[test]
    fn the_methods_a_route_accepts_are_the_ones_it_allows() {
        assert!(Route::Healthz.accepts(&Method::GET));
        assert!(!Route::Healthz.accepts(&Method::POST));
        assert!(Route::CacheClear.accepts(&Method::POST));
        assert!(!Route::CacheClear.accepts(&Method::GET));
        assert!(Route::Passthrough.accepts(&Method::DELETE));
    }

    #[test]
    fn a_spelling_of_a_model_endpoint_is_still_one() {
        for path in [
            "/v1/chat/completions",
            "/v1/chat/completions/",
            "/v1//chat/completions",
            "/v1/chat/%63ompletions",
            "/v1/chat/%63%6F%6dpletions//",
        ] {
            let endpoint = classify(&Method::POST, path, BODY);
            assert_eq!(endpoint.route, Route::Chat, "{path}");
            assert_eq!(endpoint.model, Model::Body, "{path}");
            assert!(endpoint.reports_usage, "{path}");
            assert_eq!(endpoint.label(), "chat", "{path}");
            assert_eq!(endpoint.path(path), Some("/v1/chat/completions"), "{path}");
        }
    }

    fn model(method: Method, path: &str) -> Model {
        classify(&method, path, BODY).model
    }

    #[test]
    fn every_method_that_can_make_the_upstream_act_is_checked() {
        let extension = Method::from_bytes(b"PROPPATCH").unwrap();
        for method in [Method::POST, Method::PUT, Method::PATCH, extension] {
            assert_eq!(model(method.clone(), "/v1/chat/completions"), Model::Body);
            assert_eq!(model(method.clone(), "/v1/batches"), Model::Generates);
            assert_eq!(model(method, "/v1/files"), Model::None);
        }
        for method in [Method::GET, Method::HEAD, Method::OPTIONS, Method::DELETE] {
            for path in ["/v1/chat/completions", "/v1/batches", "/v1/evals/e/runs"] {
                assert_eq!(model(method.clone(), path), Model::None, "{method} {path}");
            }
        }
    }

    #[test]
    fn each_endpoint_is_checked_where_it_names_its_model() {
        let cases = [
            (
                "/v1/realtime/client_secrets",
                Model::Session { nested: true },
            ),
            ("/v1/realtime/sessions", Model::Session { nested: false }),
            ("/v1/videos", Model::Body),
            ("/v1/realtime/calls/rtc_1/accept", Model::Body),
            ("/v1/responses/compact", Model::Body),
            ("/v1/realtime/calls", Model::Generates),
            ("/v1/realtime/calls/rtc_1/other", Model::Generates),
            ("/v1/realtime/transcription_sessions", Model::Generates),
            ("/v1/evals/eval_1/runs", Model::Generates),
            ("/v1/fine_tuning/jobs", Model::Generates),
            ("/v1/fine_tuning/jobs/ft_1/resume", Model::Generates),
            ("/v1/threads/runs", Model::Generates),
            ("/v1/threads/thread_1/runs", Model::Generates),
            ("/v1/threads/t/runs/r/submit_tool_outputs", Model::Generates),
            ("/v1/vector_stores/vs_1/file_batches", Model::Generates),
            ("/v1/videos/video_1/remix", Model::Generates),
            ("/v1/realtime", Model::Generates),
            ("/v1/something/new", Model::Generates),
            ("/v1", Model::Generates),
            ("/v1/chat/completions/chatcmpl_1", Model::None),
            ("/v1/responses/resp_1/cancel", Model::None),
            ("/v1/batches/batch_1/cancel", Model::None),
            ("/v1/evals/eval_1/runs/run_1", Model::None),
            ("/v1/threads/thread_1/messages", Model::None),
            ("/v1/threads/t/runs/r/cancel", Model::None),
            ("/v1/uploads/upload_1/parts", Model::None),
            ("/v1/conversations/conv_1/items", Model::None),
            ("/admin/cache/clear", Model::None),
        ];
        for (path, expected) in cases {
            assert_eq!(model(Method::POST, path), expected, "{path}");
        }
        // A path with no safe canonical form cannot be placed: it may generate.
        let unplaced = classify(&Method::POST, "/v1/files%2Fx", Shape::default());
        assert_eq!(unplaced.model, Model::Generates);
    }

    #[test]
    fn a_tunnel_is_checked_by_its_query_only_where_the_upstream_reads_one() {
        let upgrade = Shape {
            has_body: false,
            upgrade: true,
        };
        let tunnel = |path| classify(&Method::GET, path, upgrade).model;
        assert_eq!(tunnel("/v1/realtime"), Model::Query);
        assert_eq!(tunnel("/v1//realtime/"), Model::Query);
        assert_eq!(tunnel("/v1/responses"), Model::Generates);
        assert_eq!(tunnel("/v1/files"), Model::Generates);
        let plain = classify(&Method::GET, "/v1/realtime", Shape::default());
        assert_eq!(plain.model, Model::None);
    }

    #[test]
    fn usage_endpoints_include_their_sub_paths_only() {
        let reports = |path| classify(&Method::GET, path, Shape::default()).reports_usage;
        assert!(reports("/v1/responses/resp_1"));
        assert!(reports("/v1/chat/completions"));
        assert!(reports("/v1/chat/completions/chatcmpl_1"));
        assert!(!reports("/v1/chat/completionsx"));
        assert!(!reports("/v1/models"));
        assert_eq!(route("/v1/chat/completions/chatcmpl_1"), Route::Passthrough);
    }

    #[test]
    fn a_canonical_path_is_borrowed_as_it_came() {
        for path in [
            "/v1/chat/completions",
            "/v1/models/gpt-3.5-turbo",
            "/v1/.well-known",
            "/v1/files/a%20b",
        ] {
            let endpoint = classify(&Method::POST, path, BODY);
            assert_eq!(endpoint.path, Spelling::AsReceived, "{path}");
        }
    }

    #[test]
    fn a_path_without_a_safe_canonical_form_is_refused_with_a_body_only() {
        for path in [
            "/v1/models/meta-llama%2FLlama-3.1-8B",
            "/v1/chat/%2e%2e/x",
            "/v1/./chat/completions",
            "/v1/chat/../x",
            "/v1/chat/completions%zz",
            "/v1/chat/completions%2",
            "/v1/chat/completions%",
        ] {
            let posted = classify(&Method::POST, path, BODY);
            assert_eq!(posted.path(path), None, "{path}");
            let got = classify(&Method::GET, path, Shape::default());
            assert_eq!(got.path(path), Some(path), "{path}");
            assert_eq!(got.route, Route::Passthrough, "{path}");
            assert!(!got.reports_usage, "{path}");
        }
    }

    #[test]
    fn only_unreserved_escapes_are_decoded() {
        let endpoint = classify(&Method::POST, "/v1/files/%41%20%3f%7E/", BODY);
        assert_eq!(endpoint.path("-"), Some("/v1/files/A%20%3f~"));
    }

    #[test]
    fn the_proxy_s_own_paths_are_matched_as_received() {
        for path in [
            "//admin/cache/clear",
            "/admin//cache/clear",
            "//v1/chat/completions",
            "/V1/chat/completions",
            "/healthz/",
        ] {
            let endpoint = classify(&Method::POST, path, BODY);
            assert!(!endpoint.route.is_forwarded(), "{path}");
            assert!(
                !matches!(endpoint.route, Route::CacheClear | Route::Healthz),
                "{path}"
            );
            assert_eq!(endpoint.path(path), Some(path), "{path}");
        }
    }

    #[test]
    fn fixed_paths_are_the_exact_rows_without_patterns() {
        let fixed: Vec<&str> = fixed_paths().map(|(_, path)| path).collect();
        assert!(fixed.contains(&"/v1/chat/completions"));
        assert!(!fixed.iter().any(|path| path.contains('*')));
        let endpoint = classify(&Method::POST, "/v1/chat/%63ompletions", BODY);
        let position = endpoint.fixed().unwrap();
        assert_eq!(TABLE[position].path, "/v1/chat/completions");
        assert_eq!(classify(&Method::POST, "/v1/files/x", BODY).fixed(), None);
    }
}
