//! The node's web dashboard, its JSON API (`/api/v1/...`, see [`api`]) and the Prometheus
//! metrics (`/metrics`), on one HTTP/1.1 listener served by hyper.
//!
//! Safe by default:
//! * it binds to loopback unless `dashboard.listen` says otherwise, and then a bearer token
//!   (`dashboard.token_file`) is required for every data route;
//! * without a token, only loopback `Host` headers are answered, so that a web page cannot
//!   read a loopback dashboard through DNS rebinding;
//! * it is read-only: GET and HEAD, nothing that changes the node or the consortium;
//! * every response carries a strict Content-Security-Policy and the usual headers;
//! * the page and its script are compiled into the binary: nothing is fetched from the
//!   internet, so it works air-gapped;
//! * bad clients are bounded: at most [`MAX_CONNECTIONS`] at once, [`HEADER_TIMEOUT`] to
//!   send a request head of at most [`MAX_HEAD_BYTES`], [`CONNECTION_LIFETIME`] per
//!   connection. The node's training runs on threads of its own meanwhile.

pub mod api;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::DashboardSection;
use crate::service::Node;

/// Connections served at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 64;

/// Time a client has to send a request head (the first, and each kept-alive one).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest request head (request line and headers) read; larger ones get 431.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// A connection is closed after this long, whatever it is doing (browsers reconnect).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Shortest token accepted from `dashboard.token_file`.
pub const MIN_TOKEN_LEN: usize = 32;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// Headers on every response.
const SECURITY_HEADERS: [(&str, &str); 7] = [
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
];

/// The bearer token the data routes ask for, kept as its hash so that comparing a guess
/// takes the same time wherever it differs.
#[derive(Clone)]
pub struct Token(blake3::Hash);

impl Token {
    /// Reads the token from `path` (surrounding whitespace trimmed).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("dashboard.token_file {}", path.display()))?;
        let token = text.trim();
        anyhow::ensure!(
            token.len() >= MIN_TOKEN_LEN,
            "dashboard.token_file {}: the token has {} characters; use at least {MIN_TOKEN_LEN} \
             (e.g. `head -c 32 /dev/urandom | xxd -p -c 64 > {}`)",
            path.display(),
            token.len(),
            path.display()
        );
        Ok(Self(blake3::hash(token.as_bytes())))
    }

    fn admits(&self, given: &str) -> bool {
        blake3::hash(given.as_bytes()) == self.0
    }
}

/// What every request handler shares.
struct Ctx {
    node: Arc<Node>,
    token: Option<Token>,
    started: Instant,
}

/// A bound dashboard, not serving yet.
pub struct Bound {
    listener: TcpListener,
    token: Option<Token>,
}

impl Bound {
    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Binds the dashboard's listener and reads its token per `[dashboard]`; `None` when it is
/// disabled.
pub async fn bind(section: &DashboardSection) -> Result<Option<Bound>> {
    if section.listen.is_empty() {
        return Ok(None);
    }
    let token = section.token_file.as_deref().map(Token::load).transpose()?;
    let listener = TcpListener::bind(&section.listen)
        .await
        .with_context(|| format!("dashboard.listen {}", section.listen))?;
    Ok(Some(Bound { listener, token }))
}

/// Serves the dashboard of `node` until the future is dropped.
pub fn serve(bound: Bound, node: Arc<Node>) -> impl Future<Output = ()> + Send + 'static {
    let Bound { listener, token } = bound;
    let ctx = Arc::new(Ctx {
        node,
        token,
        started: Instant::now(),
    });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of file descriptors, most likely: let some close.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                ctx.node.metrics.rejected("http_connection_limit");
                continue;
            };
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let ctx = ctx.clone();
                    async move { Ok::<_, Infallible>(handle(&ctx, req).await) }
                });
                let mut http = hyper::server::conn::http1::Builder::new();
                http.timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(MAX_HEAD_BYTES);
                let connection = http.serve_connection(TokioIo::new(stream), service);
                let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
                drop(slot);
            });
        }
    }
}

/// Answers one request.
async fn handle(ctx: &Ctx, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let mut response = route(ctx, &req).await;
    if response.status().is_client_error() {
        ctx.node.metrics.http_refused.inc();
    }
    let headers = response.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        headers.insert(name, HeaderValue::from_static(value));
    }
    if req.method() == Method::HEAD {
        *response.body_mut() = Full::new(Bytes::new());
    }
    response
}

async fn route(ctx: &Ctx, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "the dashboard is read-only: GET and HEAD only\n",
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    if ctx.token.is_none() && !loopback_host(host) {
        return text(
            StatusCode::FORBIDDEN,
            "this dashboard answers loopback host names only (set dashboard.token_file to serve others)\n",
        );
    }
    let path = req.uri().path();
    match path {
        "/" | "/index.html" => return asset(INDEX_HTML, "text/html; charset=utf-8"),
        "/app.js" => return asset(APP_JS, "text/javascript; charset=utf-8"),
        "/style.css" => return asset(STYLE_CSS, "text/css; charset=utf-8"),
        _ => {}
    }
    if !path.starts_with("/api/") && path != "/metrics" {
        return text(StatusCode::NOT_FOUND, "not found; see /api/v1\n");
    }
    if let Some(token) = &ctx.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| token.admits(g.trim())) {
            let mut r = text(
                StatusCode::UNAUTHORIZED,
                "a bearer token is required (Authorization: Bearer <dashboard.token_file>)\n",
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    if path == "/metrics" {
        let mut r = Response::new(Full::new(Bytes::from(ctx.node.metrics.render())));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        return r;
    }
    match api::answer(&ctx.node, ctx.started, path).await {
        Some(value) => json(&value),
        None => text(StatusCode::NOT_FOUND, "no such API route; see /api/v1\n"),
    }
}

/// Whether `host` (a `Host` header) names this machine by a loopback name (`localhost`,
/// 127.0.0.0/8, `[::1]`), with or without a port.
fn loopback_host(host: Option<&str>) -> bool {
    let Some(host) = host else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn asset(body: &'static str, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = asset(body, "text/plain; charset=utf-8");
    *r.status_mut() = status;
    r
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value)
        .unwrap_or_else(|e| unreachable!("a JSON value always serializes: {e}"));
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Where a started dashboard is, for logs and the demo.
pub fn url(addr: SocketAddr) -> String {
    format!("http://{addr}/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_names_pass_without_a_token() {
        for host in [
            "127.0.0.1:9464",
            "localhost",
            "LOCALHOST:1",
            "[::1]:9464",
            "127.8.9.1",
        ] {
            assert!(loopback_host(Some(host)), "{host}");
        }
        for host in [
            "attacker.example",
            "10.0.0.1:9464",
            "localhost.attacker.example",
            "[::2]:1",
        ] {
            assert!(!loopback_host(Some(host)), "{host}");
        }
        assert!(!loopback_host(None));
    }

    #[test]
    fn tokens_are_long_and_compared_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "short\n").unwrap();
        let err = Token::load(&path).err().unwrap().to_string();
        assert!(
            err.contains("dashboard.token_file") && err.contains("at least 32"),
            "{err}"
        );
        let secret = "0123456789abcdef0123456789abcdef";
        std::fs::write(&path, format!("  {secret}\n")).unwrap();
        let token = Token::load(&path).unwrap();
        assert!(token.admits(secret));
        assert!(!token.admits(&secret[..31]));
        assert!(!token.admits(""));
    }
}
