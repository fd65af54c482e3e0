//! `web-ui`: a local web page over the lorakit tools, the counterpart of the kohya_ss GUI.
//!
//! One axum server on 127.0.0.1 (other addresses only with `--allow_remote`) serves a plain
//! HTML page with a small script, both built into the binary. Every request needs the random
//! access token printed in the address ([`access`]); every path must lie inside the folders
//! named on the command line. The page shows a dataset ([`dataset`]: lint-dataset's report, the
//! bucket histogram, tag frequencies, captions to edit), writes a train-lora config and runs
//! train-lora as a child process ([`run`]), follows it live over server-sent events, and lists
//! the LoRA files of an output folder ([`history`]).

pub mod access;
pub mod dataset;
pub mod history;
pub mod run;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lorakit_pipeline::{Error, Result};
use serde::Deserialize;
use serde_json::json;

use access::Folders;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Folders the page may read and write in (datasets, models, output folders).
    pub folders: Vec<PathBuf>,
    /// Address to listen on.
    pub host: IpAddr,
    /// Port (0: any free port).
    pub port: u16,
    /// Allow an address other than loopback.
    pub allow_remote: bool,
    /// Folder of the lorakit tools (default: the folder of this executable).
    pub bin_dir: Option<PathBuf>,
}

/// The state every request handler shares.
pub type AppState = Arc<App>;

/// What the server knows.
pub struct App {
    /// The access token.
    pub token: String,
    /// The allowed folders.
    pub folders: Folders,
    /// The train-lora executable.
    pub train_lora: PathBuf,
    /// The run the page manages.
    pub runs: run::Runs,
}

/// Starts the server, prints the address with the token on stdout and serves until killed.
pub fn serve(options: &Options) -> Result<()> {
    if !options.host.is_loopback() && !options.allow_remote {
        return Err(Error::Usage(format!(
            "--host {}: the page runs training and writes files; serve other interfaces only \
             with --allow_remote (anyone who gets the printed address can use it)",
            options.host
        )));
    }
    if options.folders.is_empty() {
        return Err(Error::Usage(
            "give at least one --folder: the page reads and writes only inside them".into(),
        ));
    }
    let bin_dir = match &options.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()
            .map_err(|e| Error::Usage(format!("cannot find this executable: {e}")))?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    };
    let train_lora = bin_dir.join("train-lora");
    if !train_lora.is_file() {
        return Err(Error::bad_file(
            &train_lora,
            "train-lora not found: build the workspace, or give --bin_dir",
        ));
    }
    let app = Arc::new(App {
        token: access::new_token(),
        folders: Folders::new(&options.folders)?,
        train_lora,
        runs: run::Runs::default(),
    });
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| Error::Usage(format!("cannot start the server runtime: {e}")))?;
    runtime.block_on(async move {
        let address = SocketAddr::new(options.host, options.port);
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|e| Error::Usage(format!("cannot listen on {address}: {e}")))?;
        let bound = listener
            .local_addr()
            .map_err(|e| Error::Usage(format!("{address}: {e}")))?;
        println!("web-ui: open http://{bound}/?token={}", app.token);
        tokio::spawn(stop_run_on_ctrl_c(app.clone()));
        axum::serve(listener, router(app))
            .await
            .map_err(|e| Error::Usage(format!("server stopped: {e}")))
    })
}

/// Ctrl-C: interrupt the run (it saves a resumable state) and exit.
async fn stop_run_on_ctrl_c(app: AppState) {
    if tokio::signal::ctrl_c().await.is_ok() {
        if app.runs.stop().is_ok() {
            eprintln!("web-ui: sent SIGINT to the run; it saves a resumable state");
        }
        std::process::exit(130);
    }
}

/// Every route, behind the token guard.
pub fn router(app: AppState) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/app.js", get(script))
        .route("/style.css", get(style))
        .route("/api/browse", get(browse))
        .route("/api/file", get(file))
        .route("/api/dataset", get(dataset_view))
        .route("/api/caption", post(caption))
        .route("/api/config", post(config))
        .route("/api/run/start", post(start))
        .route("/api/run/stop", post(stop))
        .route("/api/run/resume", post(resume))
        .route("/api/events", get(events))
        .route("/api/history", get(history_view))
        .route("/api/lora/check", post(lora_check))
        .route("/api/lora/resize", post(lora_resize))
        .route("/api/lora/merge", post(lora_merge))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            access::guard,
        ))
        .with_state(app)
}

/// A handler's refusal: status and a message for the page.
type Reply = std::result::Result<Response, (StatusCode, String)>;

fn bad_request(message: impl Into<String>) -> (StatusCode, String) {
    (StatusCode::BAD_REQUEST, message.into())
}

fn failed(error: Error) -> (StatusCode, String) {
    (StatusCode::UNPROCESSABLE_ENTITY, error.detail())
}

/// `path` inside the allowed folders, or a 403 naming it.
fn allowed(app: &App, path: &Path) -> std::result::Result<PathBuf, (StatusCode, String)> {
    app.folders
        .resolve(path)
        .map_err(|message| (StatusCode::FORBIDDEN, message))
}

/// Runs blocking library work off the server's threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::result::Result<T, (StatusCode, String)> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(failed)
}

async fn page(State(app): State<AppState>) -> Response {
    let html = include_str!("page/index.html").replace("{{TOKEN}}", &app.token);
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        html,
    )
        .into_response()
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("page/app.js"),
    )
        .into_response()
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("page/style.css"),
    )
        .into_response()
}

#[derive(Deserialize)]
struct PathQuery {
    path: Option<PathBuf>,
}

/// A folder's subfolders and JSON/TOML/text files; without a path, the allowed folders.
async fn browse(State(app): State<AppState>, Query(query): Query<PathQuery>) -> Reply {
    let Some(path) = query.path else {
        return Ok(Json(json!({ "folders": app.folders.roots(), "files": [] })).into_response());
    };
    let dir = allowed(&app, &path)?;
    let entries = std::fs::read_dir(&dir).map_err(|e| failed(Error::io(&dir, e)))?;
    let (mut folders, mut files) = (Vec::new(), Vec::new());
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            folders.push(path);
        } else if path.extension().is_some_and(|x| {
            ["json", "toml", "txt", "safetensors"]
                .iter()
                .any(|e| x == *e)
        }) {
            files.push(path);
        }
    }
    folders.sort();
    files.sort();
    let parent = dir
        .parent()
        .filter(|p| app.folders.resolve(p).is_ok())
        .map(Path::to_path_buf);
    Ok(
        Json(json!({ "dir": dir, "parent": parent, "folders": folders, "files": files }))
            .into_response(),
    )
}

/// A file inside the folders (images, plots, logs).
async fn file(State(app): State<AppState>, Query(query): Query<PathQuery>) -> Reply {
    let path = allowed(&app, &query.path.ok_or_else(|| bad_request("give ?path="))?)?;
    if !path.is_file() {
        return Err((
            StatusCode::NOT_FOUND,
            format!("{}: no such file", path.display()),
        ));
    }
    let kind = match path
        .extension()
        .and_then(|x| x.to_str())
        .unwrap_or_default()
    {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "bmp" => "image/bmp",
        "json" | "jsonl" => "application/json",
        _ => "text/plain; charset=utf-8",
    };
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|e| failed(Error::io(&path, e)))?;
    Ok(([(header::CONTENT_TYPE, kind)], bytes).into_response())
}

async fn dataset_view(
    State(app): State<AppState>,
    Query(mut query): Query<dataset::DatasetQuery>,
) -> Reply {
    query.dir = allowed(&app, &query.dir)?;
    if let Some(json) = &query.json {
        query.json = Some(allowed(&app, json)?);
    }
    let view = blocking(move || dataset::view(&query)).await?;
    Ok(Json(view).into_response())
}

#[derive(Deserialize)]
struct CaptionEdit {
    path: PathBuf,
    text: String,
    #[serde(default = "caption_extension")]
    caption_extension: String,
}

fn caption_extension() -> String {
    ".caption".into()
}

async fn caption(State(app): State<AppState>, Json(edit): Json<CaptionEdit>) -> Reply {
    let path = allowed(&app, &edit.path)?;
    let written = path.clone();
    blocking(move || dataset::write_caption(&path, &edit.text, &edit.caption_extension)).await?;
    Ok(Json(json!({ "written": written })).into_response())
}

#[derive(Deserialize)]
struct RunForm {
    options: BTreeMap<String, String>,
    /// Where "save config" writes the TOML.
    #[serde(default)]
    config: Option<PathBuf>,
}

/// Writes the form as a `--config_file` TOML (by train-lora itself).
async fn config(State(app): State<AppState>, Json(form): Json<RunForm>) -> Reply {
    let target = form
        .config
        .clone()
        .ok_or_else(|| bad_request("give the config file to write"))?;
    if target.extension().is_none_or(|x| x != "toml") {
        return Err(bad_request("the config file name must end in .toml"));
    }
    let path = allowed(&app, &target)?;
    let argv = run::command_line(&form.options, &app.folders).map_err(bad_request)?;
    let train_lora = app.train_lora.clone();
    let written = path.clone();
    tokio::task::spawn_blocking(move || run::save_config(&train_lora, &argv, &path))
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(bad_request)?;
    let toml = std::fs::read_to_string(&written).unwrap_or_default();
    Ok(Json(json!({ "config": written, "toml": toml })).into_response())
}

/// Saves the form as `<output_dir>/<output_name>.toml` and starts train-lora with it.
async fn start(State(app): State<AppState>, Json(form): Json<RunForm>) -> Reply {
    let output_dir = form
        .options
        .get("output_dir")
        .filter(|v| !v.trim().is_empty())
        .ok_or_else(|| bad_request("give the output folder (output_dir)"))?;
    let output_dir = allowed(&app, Path::new(output_dir.trim()))?;
    std::fs::create_dir_all(&output_dir).map_err(|e| failed(Error::io(&output_dir, e)))?;
    let name = form
        .options
        .get("output_name")
        .map(|n| n.trim())
        .filter(|n| !n.is_empty())
        .unwrap_or("last")
        .to_string();
    if name.contains('/') {
        return Err(bad_request("output_name is a file name, not a path"));
    }
    let config = output_dir.join(format!("{name}.toml"));
    let argv = run::command_line(&form.options, &app.folders).map_err(bad_request)?;
    let train_lora = app.train_lora.clone();
    let target = config.clone();
    tokio::task::spawn_blocking(move || run::save_config(&train_lora, &argv, &target))
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(bad_request)?;
    app.runs
        .start(&app.train_lora, &config, &output_dir, &name, &[])
        .map_err(|e| (StatusCode::CONFLICT, e))?;
    Ok(Json(json!({ "config": config })).into_response())
}

async fn stop(State(app): State<AppState>) -> Reply {
    app.runs.stop().map_err(|e| (StatusCode::CONFLICT, e))?;
    Ok(Json(json!({ "stopping": true })).into_response())
}

/// Runs the last run's config again with `--resume latest`.
async fn resume(State(app): State<AppState>) -> Reply {
    let last = app.runs.snapshot();
    let (Some(config), Some(output_dir)) = (last.config, last.output_dir) else {
        return Err((StatusCode::CONFLICT, "no run to resume yet".into()));
    };
    app.runs
        .start(
            &app.train_lora,
            &config,
            &output_dir,
            &last.output_name,
            &["--resume", "latest"],
        )
        .map_err(|e| (StatusCode::CONFLICT, e))?;
    Ok(Json(json!({ "config": config })).into_response())
}

/// Server-sent events: the live state of the run whenever it changes (checked twice a second).
async fn events(
    State(app): State<AppState>,
) -> Sse<impl futures_util::Stream<Item = std::result::Result<Event, Infallible>>> {
    let stream = futures_util::stream::unfold((app, String::new()), |(app, last)| async move {
        loop {
            let now = serde_json::to_string(&app.runs.snapshot()).unwrap_or_default();
            if now != last {
                return Some((Ok(Event::default().data(now.clone())), (app, now)));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn history_view(State(app): State<AppState>, Query(query): Query<PathQuery>) -> Reply {
    let dir = allowed(&app, &query.path.ok_or_else(|| bad_request("give ?path="))?)?;
    let found = blocking(move || history::history(&dir)).await?;
    Ok(Json(found).into_response())
}

#[derive(Deserialize)]
struct LoraAction {
    path: PathBuf,
    #[serde(default)]
    new_rank: Option<usize>,
}

async fn lora_check(State(app): State<AppState>, Json(action): Json<LoraAction>) -> Reply {
    let path = allowed(&app, &action.path)?;
    let report = blocking(move || history::inspect(&path)).await?;
    Ok(Json(report).into_response())
}

async fn lora_resize(State(app): State<AppState>, Json(action): Json<LoraAction>) -> Reply {
    let path = allowed(&app, &action.path)?;
    let rank = action
        .new_rank
        .filter(|r| *r > 0)
        .ok_or_else(|| bad_request("give the new rank"))?;
    let written = blocking(move || history::resize_to(&path, rank)).await?;
    Ok(Json(json!({ "written": written })).into_response())
}

#[derive(Deserialize)]
struct MergeAction {
    paths: Vec<PathBuf>,
    ratios: Vec<f32>,
    save_to: PathBuf,
}

async fn lora_merge(State(app): State<AppState>, Json(action): Json<MergeAction>) -> Reply {
    let mut models = Vec::new();
    for path in &action.paths {
        models.push(allowed(&app, path)?);
    }
    if models.len() < 2 || action.ratios.len() != models.len() {
        return Err(bad_request("choose two LoRA files or more, one ratio each"));
    }
    let save_to = allowed(&app, &action.save_to)?;
    if save_to.exists() {
        return Err(bad_request(format!(
            "{} exists; choose another name",
            save_to.display()
        )));
    }
    let written = save_to.clone();
    blocking(move || history::merge_into(&models, &action.ratios, &save_to)).await?;
    Ok(Json(json!({ "written": written })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    const TOKEN: &str = "00112233445566778899aabbccddeeff";

    fn app(folder: &Path) -> Router {
        router(Arc::new(App {
            token: TOKEN.into(),
            folders: Folders::new(&[folder.to_path_buf()]).unwrap(),
            train_lora: PathBuf::from("/nonexistent/train-lora"),
            runs: run::Runs::default(),
        }))
    }

    async fn send(router: &Router, request: Request<Body>) -> (StatusCode, String) {
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    fn get(uri: &str, cookie: Option<&str>) -> Request<Body> {
        let mut request = Request::get(uri).header(header::HOST, "127.0.0.1:9");
        if let Some(token) = cookie {
            request = request.header(header::COOKIE, format!("{}={token}", access::COOKIE));
        }
        request.body(Body::empty()).unwrap()
    }

    fn post(
        uri: &str,
        body: serde_json::Value,
        token: Option<&str>,
        origin: &str,
    ) -> Request<Body> {
        let mut request = Request::post(uri)
            .header(header::HOST, "127.0.0.1:9")
            .header(header::ORIGIN, origin)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::COOKIE, format!("{}={TOKEN}", access::COOKIE));
        if let Some(token) = token {
            request = request.header(access::TOKEN_HEADER, token);
        }
        request.body(Body::from(body.to_string())).unwrap()
    }

    #[tokio::test]
    async fn the_token_opens_the_page_once_and_nothing_opens_without_it() {
        let dir = tempfile::tempdir().unwrap();
        let router = app(dir.path());
        for uri in ["/", "/api/browse", "/app.js", "/api/events"] {
            let (status, body) = send(&router, get(uri, None)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{uri}");
            assert!(body.contains("token"), "{body}");
            let (status, _) = send(&router, get(uri, Some("wrong"))).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{uri}");
        }
        let (status, _) = send(&router, get("/?token=bad", None)).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let response = router
            .clone()
            .oneshot(get(&format!("/?token={TOKEN}"), None))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SEE_OTHER);
        let cookie = response.headers()[header::SET_COOKIE].to_str().unwrap();
        assert!(
            cookie.contains(TOKEN)
                && cookie.contains("SameSite=Strict")
                && cookie.contains("HttpOnly")
        );
        assert_eq!(response.headers()[header::LOCATION], "/");
        let (status, body) = send(&router, get("/", Some(TOKEN))).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.contains(TOKEN),
            "the page carries the token for its own requests"
        );
    }

    #[tokio::test]
    async fn a_cross_origin_or_headerless_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.png"), b"not read").unwrap();
        let caption = dir.path().join("a.caption");
        std::fs::write(&caption, "old").unwrap();
        let router = app(dir.path());
        let body = json!({ "path": caption, "text": "new" });
        let local = "http://127.0.0.1:9";
        let refused = [
            post("/api/caption", body.clone(), None, local),
            post(
                "/api/caption",
                body.clone(),
                Some(TOKEN),
                "http://evil.example",
            ),
            post("/api/caption", body.clone(), Some("bad"), local),
        ];
        for request in refused {
            let (status, _) = send(&router, request).await;
            assert_eq!(status, StatusCode::FORBIDDEN);
        }
        assert_eq!(std::fs::read_to_string(&caption).unwrap(), "old");
        let (status, body) = send(&router, post("/api/caption", body, Some(TOKEN), local)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(std::fs::read_to_string(&caption).unwrap(), "new");
    }

    #[tokio::test]
    async fn paths_outside_the_folders_are_refused_over_http() {
        let root = tempfile::tempdir().unwrap();
        let inside = root.path().join("data");
        std::fs::create_dir(&inside).unwrap();
        std::fs::write(root.path().join("secret.txt"), "s").unwrap();
        let router = app(&inside);
        let escape = format!("{}/../secret.txt", inside.display());
        for uri in [
            format!("/api/file?path={escape}"),
            "/api/file?path=/etc/passwd".to_string(),
            format!("/api/browse?path={}/..", inside.display()),
            format!("/api/history?path={}", root.path().display()),
            format!("/api/dataset?dir={}", root.path().display()),
        ] {
            let (status, body) = send(&router, get(&uri, Some(TOKEN))).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{uri}: {body}");
            assert!(body.contains("outside the folders"), "{body}");
        }
        let write = json!({ "path": root.path().join("secret.caption"), "text": "x" });
        let (status, _) = send(
            &router,
            post("/api/caption", write, Some(TOKEN), "http://127.0.0.1:9"),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(!root.path().join("secret.caption").exists());
    }
}
