//! The web dashboard: static ES modules and CSS from `controller/ui/`, embedded in the
//! binary (no Node toolchain, no network at runtime). `/` is the page (hash routing:
//! `/#/tasks/<id>`), `/ui/<file>` its assets. Every answer carries a strict
//! Content-Security-Policy (no inline script or style, only this origin), `nosniff`, no
//! referrer and no framing. Assets are revalidated (`no-cache` + ETag, 304 when unchanged),
//! so a new binary's files are picked up at once. The page talks only to `/api/v1/...` with
//! the bearer token the user typed (session storage; no cookies).

use std::sync::LazyLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// The Content-Security-Policy of every UI answer.
pub(crate) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
img-src 'self' data:; connect-src 'self'; font-src 'self'; manifest-src 'self'; \
frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

macro_rules! assets {
    ($($name:literal),* $(,)?) => {
        /// Every embedded file: (path under `/ui/`, content).
        const FILES: &[(&str, &str)] = &[$(($name, include_str!(concat!("../../ui/", $name)))),*];
    };
}

assets![
    "index.html",
    "app.css",
    "favicon.svg",
    "js/main.js",
    "js/api.js",
    "js/dom.js",
    "js/router.js",
    "js/ansi.js",
    "js/chart.js",
    "js/dag.js",
    "js/sse.js",
    "js/pages/login.js",
    "js/pages/overview.js",
    "js/pages/tasks.js",
    "js/pages/task.js",
    "js/pages/workflows.js",
    "js/pages/workflow.js",
    "js/pages/agents.js",
    "js/pages/templates.js",
    "js/pages/schedules.js",
    "js/pages/config.js",
];

/// ETags of the embedded files (FNV-1a of the content), computed once.
static ETAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    FILES
        .iter()
        .map(|(_, body)| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in body.as_bytes() {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
            format!("\"{h:016x}\"")
        })
        .collect()
});

/// The UI's routes (no state needed).
pub(crate) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|h: HeaderMap| async move { asset("index.html", &h) }),
        )
        .route(
            "/ui/{*path}",
            get(|Path(p): Path<String>, h: HeaderMap| async move { asset(&p, &h) }),
        )
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, e)| e) {
        Some("html") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("svg") => "image/svg+xml",
        _ => "application/octet-stream",
    }
}

/// The security headers every UI answer carries.
pub(crate) fn secure(headers: &mut HeaderMap) {
    let set = |h: &mut HeaderMap, k: header::HeaderName, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(headers, header::CONTENT_SECURITY_POLICY, CSP);
    set(headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(headers, header::REFERRER_POLICY, "no-referrer");
    set(headers, header::X_FRAME_OPTIONS, "DENY");
    set(
        headers,
        header::HeaderName::from_static("cross-origin-opener-policy"),
        "same-origin",
    );
}

fn asset(path: &str, req: &HeaderMap) -> Response {
    let Some(i) = FILES.iter().position(|(n, _)| *n == path) else {
        let mut r = super::error::error(
            tonic::Code::NotFound,
            format!("no such file in the web UI: /ui/{path}"),
        );
        secure(r.headers_mut());
        return r;
    };
    let etag = &ETAGS[i];
    let fresh = req
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut r = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, content_type(path))], FILES[i].1).into_response()
    };
    let h = r.headers_mut();
    secure(h);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ` on<name>=` attribute.
    fn has_handler(html: &str) -> bool {
        html.match_indices(" on").any(|(i, _)| {
            let rest = &html[i + 3..];
            let name: String = rest.chars().take_while(char::is_ascii_alphabetic).collect();
            !name.is_empty() && rest[name.len()..].trim_start().starts_with('=')
        })
    }

    #[test]
    fn assets_carry_the_security_headers_and_revalidate() {
        let r = asset("js/main.js", &HeaderMap::new());
        assert_eq!(r.status(), StatusCode::OK);
        let h = r.headers();
        assert_eq!(h[header::CONTENT_TYPE], "text/javascript; charset=utf-8");
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], CSP);
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(h[header::REFERRER_POLICY], "no-referrer");
        assert_eq!(h[header::CACHE_CONTROL], "no-cache");
        let mut req = HeaderMap::new();
        req.insert(header::IF_NONE_MATCH, h[header::ETAG].clone());
        assert_eq!(asset("js/main.js", &req).status(), StatusCode::NOT_MODIFIED);
        let r = asset("js/nope.js", &HeaderMap::new());
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(r.headers()[header::CONTENT_SECURITY_POLICY], CSP);
        for d in [
            "script-src 'self'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
        ] {
            assert!(CSP.contains(d) && !CSP.contains("unsafe"), "{d}");
        }
    }

    #[test]
    fn every_file_has_a_type_and_the_page_loads_only_modules() {
        for (name, _) in FILES {
            assert_ne!(content_type(name), "application/octet-stream", "{name}");
        }
        let index = FILES[0].1;
        assert!(index.contains("type=\"module\""));
        // No inline script or handlers anywhere in the page.
        assert!(!index.contains("<script>") && !has_handler(index));
        for (name, body) in FILES.iter().filter(|(n, _)| n.ends_with(".js")) {
            assert!(!body.contains("innerHTML"), "{name} uses innerHTML");
            assert!(!body.contains("eval("), "{name} uses eval");
        }
    }
}
