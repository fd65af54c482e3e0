//! Helpers shared by the end-to-end tests: locating the built tools and the bundled fixtures.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The folder of bundled fixtures (`tests/fixtures`); a missing fixture is a test failure.
pub fn fixtures() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    assert!(
        dir.join("MANIFEST.json").is_file(),
        "fixtures missing at {}",
        dir.display()
    );
    dir
}

/// Path of a built lorakit executable (built by `cargo build --workspace`, which `make test` runs).
pub fn tool(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps layout");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built: run `cargo build --workspace` (make test does)",
        path.display()
    );
    path
}

/// Runs a tool with arguments and returns its output.
pub fn run(name: &str, args: &[&std::ffi::OsStr]) -> Output {
    Command::new(tool(name))
        .args(args)
        .output()
        .expect("tool starts")
}

/// Runs a tool and asserts its exit code, returning stderr as text.
pub fn run_expect(name: &str, args: &[&std::ffi::OsStr], code: i32) -> String {
    let output = run(name, args);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(
        output.status.code(),
        Some(code),
        "{name} {args:?}\nstderr:\n{stderr}"
    );
    stderr
}

/// Copies the files of `from` (not subfolders) into a new folder `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// Shorthand for building an argument list of mixed strings and paths.
#[macro_export]
macro_rules! args {
    ($($a:expr),* $(,)?) => { &[$(std::ffi::OsStr::new(&$a)),*] };
}
