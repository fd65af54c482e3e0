//! Who may use the page and which files it may touch: the access token (query once, then a
//! `SameSite=Strict` cookie), the CSRF rule for requests that change something, and the folders
//! named on the command line (every path is canonicalized and must lie inside one of them).

use std::path::{Component, Path, PathBuf};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::AppState;

/// Name of the cookie that carries the token after the first visit.
pub const COOKIE: &str = "lorakit_token";
/// Header the page sends the token in with every request that changes something.
pub const TOKEN_HEADER: &str = "x-lorakit-token";

/// A random access token: 32 hex digits (128 bits).
pub fn new_token() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares two tokens in time independent of where they differ.
fn same_token(given: &str, token: &str) -> bool {
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The token of a `token=` query parameter, if any.
fn query_token(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
}

/// The token of the page's cookie, if any.
fn cookie_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// Whether a request that changes something comes from the page itself: it carries the token in
/// [`TOKEN_HEADER`] (a cross-origin page cannot set that header without a CORS preflight, which
/// this server never allows) and its `Origin`, when the browser sends one, is this server's.
fn same_origin_write(headers: &HeaderMap, token: &str) -> bool {
    let header_ok = headers
        .get(TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| same_token(v, token));
    let origin_ok = match headers.get(header::ORIGIN) {
        None => true,
        Some(origin) => {
            let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
            match (origin.to_str().ok(), host) {
                (Some(origin), Some(host)) => origin == format!("http://{host}"),
                _ => false,
            }
        }
    };
    header_ok && origin_ok
}

/// The middleware in front of every route: a correct `?token=` sets the cookie and redirects to
/// the same path without it; otherwise the cookie (or the token header) must hold the token, and
/// requests other than GET/HEAD must also pass [`same_origin_write`].
pub async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let token = state.token.as_str();
    if let Some(given) = query_token(request.uri().query()) {
        if !same_token(given, token) {
            return refuse(StatusCode::FORBIDDEN, "wrong access token");
        }
        let cookie = format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict");
        let location = request.uri().path().to_string();
        return (
            StatusCode::SEE_OTHER,
            [(header::SET_COOKIE, cookie), (header::LOCATION, location)],
        )
            .into_response();
    }
    let headers = request.headers();
    let known = cookie_token(headers)
        .or_else(|| headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok()))
        .is_some_and(|given| same_token(given, token));
    if !known {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "no access token: open the address web-ui printed (it ends in ?token=...)",
        );
    }
    let reads = matches!(*request.method(), Method::GET | Method::HEAD);
    if !reads && !same_origin_write(headers, token) {
        return refuse(
            StatusCode::FORBIDDEN,
            "refused: a request that changes something must come from the page itself \
             (token header and same origin)",
        );
    }
    next.run(request).await
}

/// A plain-text refusal.
pub fn refuse(status: StatusCode, message: &str) -> Response {
    (status, message.to_string()).into_response()
}

/// The folders the page may read and write in, canonicalized.
#[derive(Debug, Clone)]
pub struct Folders {
    roots: Vec<PathBuf>,
}

impl Folders {
    /// The named folders; each must exist.
    pub fn new(roots: &[PathBuf]) -> lorakit_pipeline::Result<Self> {
        let mut canonical = Vec::new();
        for root in roots {
            let path = root
                .canonicalize()
                .map_err(|e| lorakit_pipeline::Error::io(root, e))?;
            if !path.is_dir() {
                return Err(lorakit_pipeline::Error::bad_file(
                    root,
                    "is not a folder: --folder names folders the page may use",
                ));
            }
            canonical.push(path);
        }
        Ok(Folders { roots: canonical })
    }

    /// The folders, canonicalized.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// `path` (absolute) as a canonical path inside one of the folders. A path that does not
    /// exist yet (a file about to be written) is resolved through its parent folder, which must
    /// exist. Anything else, `..` tricks and symbolic links leading out included, is refused.
    pub fn resolve(&self, path: &Path) -> Result<PathBuf, String> {
        if !path.is_absolute() {
            return Err(format!(
                "{}: give an absolute path inside the allowed folders",
                path.display()
            ));
        }
        let canonical = match path.canonicalize() {
            Ok(found) => found,
            Err(_) => {
                let name = path.file_name().filter(|_| {
                    matches!(path.components().next_back(), Some(Component::Normal(_)))
                });
                let (Some(parent), Some(name)) = (path.parent(), name) else {
                    return Err(format!("{}: not a file name", path.display()));
                };
                let parent = parent
                    .canonicalize()
                    .map_err(|e| format!("{}: {e}", parent.display()))?;
                parent.join(name)
            }
        };
        if self.roots.iter().any(|root| canonical.starts_with(root)) {
            Ok(canonical)
        } else {
            Err(format!(
                "{}: outside the folders web-ui was started with (--folder)",
                path.display()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_the_folders_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("data")).unwrap();
        std::fs::write(root.path().join("data/a.caption"), "x").unwrap();
        std::fs::write(outside.path().join("secret.txt"), "s").unwrap();
        let folders = Folders::new(&[root.path().join("data")]).unwrap();
        let inside = folders
            .resolve(&root.path().join("data/a.caption"))
            .unwrap();
        assert!(inside.ends_with("data/a.caption"));
        // A new file inside is fine; its parent must exist.
        assert!(folders
            .resolve(&root.path().join("data/new.caption"))
            .is_ok());
        let tricks = [
            root.path().join("data/../data/../../etc/passwd"),
            root.path().join("data/.."),
            root.path().join("data/../secret.txt"),
            outside.path().join("secret.txt"),
            PathBuf::from("data/a.caption"),
            PathBuf::from("/"),
        ];
        for path in tricks {
            assert!(
                folders.resolve(&path).is_err(),
                "{} allowed",
                path.display()
            );
        }
        std::os::unix::fs::symlink(outside.path(), root.path().join("data/link")).unwrap();
        let through_link = root.path().join("data/link/secret.txt");
        assert!(folders.resolve(&through_link).is_err());
        let new_through_link = root.path().join("data/link/new.txt");
        assert!(folders.resolve(&new_through_link).is_err());
    }

    #[test]
    fn tokens_are_random_and_compared_whole() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(same_token(&a, &a));
        assert!(!same_token(&a[..31], &a));
        assert!(!same_token(&b, &a));
    }

    #[test]
    fn writes_need_the_header_and_the_same_origin() {
        let token = "0123";
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "127.0.0.1:8000".parse().unwrap());
        assert!(!same_origin_write(&headers, token));
        headers.insert(TOKEN_HEADER, "0123".parse().unwrap());
        assert!(same_origin_write(&headers, token));
        headers.insert(header::ORIGIN, "http://evil.example".parse().unwrap());
        assert!(!same_origin_write(&headers, token));
        headers.insert(header::ORIGIN, "http://127.0.0.1:8000".parse().unwrap());
        assert!(same_origin_write(&headers, token));
    }
}
