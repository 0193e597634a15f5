# syntax=docker/dockerfile:1
#
#   docker build -t llm-proxy .
#   docker run --rm -p 8080:8080 -e TARGET_HOST=https://api.openai.com -e AUTH_BEARER=sk-... llm-proxy

# ---- build: a static musl binary ------------------------------------------------------------
FROM rust:1-alpine AS builder
# ring (TLS crypto, C and assembly) needs a C compiler and the musl headers; nothing needs OpenSSL.
# Not pinned: the versions follow the rust:1-alpine base, which moves with each Rust release.
# hadolint ignore=DL3018
RUN apk add --no-cache gcc musl-dev
WORKDIR /src

# Dependencies first, against stub sources, so this layer is rebuilt only when a manifest or
# Cargo.lock changes. The stubs of the test suite, of mock-upstream (a workspace member, and
# only a dev-dependency: nothing of it is compiled here) and of tools/loadgen stay: cargo needs
# the files to exist, and leaving them out of the image keeps test edits from rebuilding it.
COPY Cargo.toml Cargo.lock ./
COPY mock-upstream/Cargo.toml mock-upstream/
COPY tools/loadgen/Cargo.toml tools/loadgen/
RUN mkdir -p src tests/api mock-upstream/src tools/loadgen/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs tests/api/main.rs mock-upstream/src/lib.rs \
    && echo 'fn main() {}' > mock-upstream/src/main.rs \
    && echo 'fn main() {}' > tools/loadgen/src/main.rs \
    && cargo build --release --locked --bin llm-proxy \
    && rm -rf src

COPY src src
# The copied files may be older than the stubs: touch them so cargo rebuilds the crate itself.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin llm-proxy \
    && cp target/release/llm-proxy /llm-proxy

# The runtime image has no user database of its own; 65532 is the usual "nonroot" id.
RUN echo 'nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin' > /etc/passwd.runtime \
    && echo 'nonroot:x:65532:' > /etc/group.runtime \
    && mkdir /empty /state

# ---- runtime: scratch -----------------------------------------------------------------------
# scratch rather than distroless/static: the binary is static and carries its own root
# certificates (webpki roots compiled in), logs in UTC and never runs a shell, so the image needs
# nothing but the binary and a user entry; no base image to track for CVEs.
FROM scratch
COPY --from=builder /etc/passwd.runtime /etc/passwd
COPY --from=builder /etc/group.runtime /etc/group
COPY --from=builder /llm-proxy /llm-proxy
# The proxy reads optional .env.local and .env files from its working directory: an empty,
# read-only directory, where a configuration file can be mounted (-v ./prod.env:/app/.env:ro).
COPY --from=builder /empty /app
# STATE_DIR (default `state` under /app): the daily token budgets survive restarts here, so it
# is the one writable place, owned by the runtime user, and a volume so it outlives the container.
COPY --from=builder --chown=65532:65532 /state /app/state
VOLUME ["/app/state"]
WORKDIR /app
USER 65532:65532
# PROXY_PORT defaults to 8080; change both if you change it.
EXPOSE 8080
# SIGTERM drains in-flight requests for up to 30 s: give `docker stop` that long (-t 35).
STOPSIGNAL SIGTERM
# The image has no shell or curl: the binary asks its own /healthz (on loopback for a wildcard
# PROXY_HOST, on PROXY_PORT from the same environment) and exits 0 or 1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/llm-proxy", "healthcheck"]
ENTRYPOINT ["/llm-proxy"]
