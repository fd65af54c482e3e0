//! web-ui end to end: the page in headless Chromium (Playwright) against the bundled example and
//! the tiny model, and the token refusal over plain HTTP. The browser and playwright-core come
//! from `make setup` (scripts/setup-browser.sh); when they are missing the test fails and says so.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::common::{copy_dir, fixtures, tool};

/// The repository root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A running web-ui, killed when dropped.
struct Server {
    child: Child,
    address: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(folders: &[&Path]) -> Server {
    let mut command = Command::new(tool("web-ui"));
    for folder in folders {
        command.arg("--folder").arg(folder);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("web-ui starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let address = line
        .trim()
        .strip_prefix("web-ui: open ")
        .unwrap_or_else(|| panic!("web-ui printed {line:?}"))
        .to_string();
    Server { child, address }
}

/// The `host:port` of a printed `http://host:port/...` address.
fn host_of(address: &str) -> &str {
    let rest = address.strip_prefix("http://").unwrap();
    rest.split('/').next().unwrap()
}

/// One HTTP/1.1 request to `address`'s host; returns the status line and body.
fn http(address: &str, request: &str) -> String {
    let host = host_of(address);
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    let text = request.replace("{host}", host);
    stream.write_all(text.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

/// The example images as a DreamBooth subset `img/1_tiny` under `root`.
fn dreambooth_example(root: &Path) -> PathBuf {
    let img = root.join("img");
    copy_dir(&repo().join("examples/tiny-dataset"), &img.join("1_tiny"));
    img
}

#[test]
fn requests_without_the_token_or_from_another_origin_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let img = dreambooth_example(root.path());
    let server = start_server(&[root.path()]);
    let token = server.address.split("token=").nth(1).unwrap().to_string();
    let closed = "Host: {host}\r\nConnection: close\r\n";
    let bare = http(&server.address, &format!("GET / HTTP/1.1\r\n{closed}\r\n"));
    assert!(bare.starts_with("HTTP/1.1 401"), "{bare}");
    let with_token = http(
        &server.address,
        &format!("GET /?token={token} HTTP/1.1\r\n{closed}\r\n"),
    );
    assert!(with_token.starts_with("HTTP/1.1 303"), "{with_token}");
    assert!(with_token.contains("SameSite=Strict"), "{with_token}");
    let caption = img.join("1_tiny/moon.caption");
    let before = std::fs::read_to_string(&caption).unwrap();
    let body = serde_json::json!({ "path": caption, "text": "changed" }).to_string();
    let cookie = format!("Cookie: lorakit_token={token}\r\n");
    let cross_origin = http(
        &server.address,
        &format!(
            "POST /api/caption HTTP/1.1\r\n{closed}{cookie}Origin: http://evil.example\r\n\
             X-Lorakit-Token: {token}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(cross_origin.starts_with("HTTP/1.1 403"), "{cross_origin}");
    let traversal = http(
        &server.address,
        &format!(
            "GET /api/file?path={}/../../../etc/passwd HTTP/1.1\r\n{closed}{cookie}\r\n",
            img.display()
        ),
    );
    assert!(traversal.starts_with("HTTP/1.1 403"), "{traversal}");
    assert_eq!(std::fs::read_to_string(&caption).unwrap(), before);
}

/// Where playwright-core and Chromium are; a clear failure when `make setup` has not run.
fn browser_tools() -> (PathBuf, PathBuf) {
    let playwright = repo().join(".local/playwright/node_modules/playwright-core");
    let chromium = PathBuf::from(
        std::env::var_os("LORAKIT_CHROMIUM").unwrap_or_else(|| "/usr/bin/chromium".into()),
    );
    assert!(
        playwright.is_dir() && chromium.is_file(),
        "the browser test needs Chromium ({}) and playwright-core ({}): run `make setup` \
         (scripts/setup-browser.sh installs both)",
        chromium.display(),
        playwright.display()
    );
    (playwright, chromium)
}

#[test]
fn the_page_lints_a_dataset_runs_a_training_and_lists_the_lora_in_a_real_browser() {
    let (playwright, chromium) = browser_tools();
    let root = tempfile::tempdir().unwrap();
    let img = dreambooth_example(root.path());
    let out = root.path().join("out");
    let prompts = root.path().join("prompts.txt");
    std::fs::write(&prompts, "an astronaut --w 128 --h 128 --s 4 --d 1\n").unwrap();
    let model_dir = fixtures().join("sd15-tiny");
    let server = start_server(&[root.path(), &model_dir]);
    let shots = std::env::var_os("LORAKIT_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.path().join("shots"));
    std::fs::create_dir_all(&shots).unwrap();
    let status = Command::new("node")
        .arg(repo().join("tests/e2e/web_ui/browser.mjs"))
        .args([&server.address])
        .args([
            &img,
            &model_dir.join("model.safetensors"),
            &out,
            &prompts,
            &shots,
        ])
        .env("PLAYWRIGHT_CORE", &playwright)
        .env("CHROMIUM", &chromium)
        .status()
        .expect(
            "node runs (make setup installs Node.js' playwright-core; Node.js itself is needed)",
        );
    assert!(
        status.success(),
        "the browser test failed (see its output above)"
    );
    // The caption edited in the page was written.
    let edited = std::fs::read_to_string(img.join("1_tiny/astronaut.caption")).unwrap();
    assert_eq!(edited, "an astronaut, edited in the page");
    // The run came from the TOML the page saved, which train-lora's own loader reads back.
    let config = out.join("webui.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let table: toml::Table = text.parse().unwrap();
    assert_eq!(table["max_train_steps"].as_integer(), Some(4), "{text}");
    assert_eq!(table["network_dim"].as_integer(), Some(4), "{text}");
    assert_eq!(
        table["network_train_unet_only"].as_bool(),
        Some(true),
        "{text}"
    );
    assert!(out.join("webui.safetensors").is_file());
    assert!(out.join("webui_loss.jsonl").is_file());
    assert!(out.join("sample/contact_sheet.png").is_file());
}

/// A POST from the page (cookie and token header); returns the whole answer.
fn post(server: &Server, path: &str, body: &serde_json::Value) -> String {
    let token = server.address.split("token=").nth(1).unwrap();
    let body = body.to_string();
    http(
        &server.address,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: {{host}}\r\nConnection: close\r\n\
             Cookie: lorakit_token={token}\r\nX-Lorakit-Token: {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// Reads the live events until one satisfies `done`; returns it.
fn wait_for_event(server: &Server, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let token = server.address.split("token=").nth(1).unwrap();
    let host = host_of(&server.address);
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(180)))
        .unwrap();
    write!(
        stream,
        "GET /api/events HTTP/1.1\r\nHost: {host}\r\nCookie: lorakit_token={token}\r\n\r\n"
    )
    .unwrap();
    for line in BufReader::new(stream).lines() {
        let line = line.expect("an event within 180 s");
        if let Some(data) = line.strip_prefix("data: ") {
            let event: serde_json::Value = serde_json::from_str(data).unwrap();
            if done(&event) {
                return event;
            }
        }
    }
    panic!("the event stream ended");
}

#[test]
fn stop_saves_a_resumable_state_and_resume_finishes_the_run() {
    let root = tempfile::tempdir().unwrap();
    let img = dreambooth_example(root.path());
    let out = root.path().join("out");
    let model_dir = fixtures().join("sd15-tiny");
    let server = start_server(&[root.path(), &model_dir]);
    let prompts = root.path().join("prompts.txt");
    std::fs::write(&prompts, "an astronaut --w 128 --h 128 --s 4 --d 1\n").unwrap();
    let options = serde_json::json!({ "options": {
        "pretrained_model_name_or_path": model_dir.join("model.safetensors"),
        "train_data_dir": img,
        "output_dir": out,
        "output_name": "long",
        "resolution": "256,256",
        "caption_extension": ".caption",
        "network_dim": "4",
        "network_train_unet_only": "true",
        "train_batch_size": "1",
        "max_train_steps": STOP_RUN_STEPS.to_string(),
        "sample_prompts": prompts,
        "sample_at_first": "true",
    }});
    let started = post(&server, "/api/run/start", &options);
    assert!(started.starts_with("HTTP/1.1 200"), "{started}");
    // The step-0 samples are made inside the training loop, where SIGINT is caught: Stop then
    // ends the run after its first step, whatever the machine's speed.
    let sampling = |e: &serde_json::Value| {
        e["log"].as_array().is_some_and(|lines| {
            lines.iter().any(|l| {
                l.as_str()
                    .unwrap_or_default()
                    .contains("sample images at step 0")
            })
        })
    };
    wait_for_event(&server, sampling);
    let stopped = post(&server, "/api/run/stop", &serde_json::json!({}));
    assert!(stopped.starts_with("HTTP/1.1 200"), "{stopped}");
    let end = wait_for_event(&server, |e| {
        e["running"] == false && !e["exit_code"].is_null()
    });
    assert_eq!(end["exit_code"], 130, "{end}");
    let states: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("-state"))
        .collect();
    assert_eq!(states, ["long-step00000001-state"]);
    assert!(!out.join("long.safetensors").exists());
    let resumed = post(&server, "/api/run/resume", &serde_json::json!({}));
    assert!(resumed.starts_with("HTTP/1.1 200"), "{resumed}");
    let end = wait_for_event(&server, |e| {
        e["running"] == false && !e["exit_code"].is_null()
    });
    assert_eq!(end["exit_code"], 0, "{end}");
    let log = std::fs::read_to_string(out.join("long_loss.jsonl")).unwrap();
    assert_eq!(
        log.lines().count(),
        STOP_RUN_STEPS,
        "one loss line per step across the stop"
    );
}

/// Steps of the stopped and resumed run.
const STOP_RUN_STEPS: usize = 6;
