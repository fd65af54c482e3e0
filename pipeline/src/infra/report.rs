//! Run outcomes, exit codes and progress display shared by every tool.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | every item done or already up to date |
//! | 1 | fatal error: nothing (more) could be done (unreadable model, bad input JSON, ...) |
//! | 2 | bad command line (unknown flag, contradictory options) |
//! | 3 | finished, but some items were skipped with errors (listed at the end and in the manifest) |

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::Error;

/// Exit code: all items done or up to date.
pub const EXIT_OK: u8 = 0;
/// Exit code: fatal error.
pub const EXIT_FATAL: u8 = 1;
/// Exit code: bad command line.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: finished with some items skipped because of errors.
pub const EXIT_PARTIAL: u8 = 3;

/// One item that could not be processed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemFailure {
    /// The file (or metadata key) concerned.
    pub path: String,
    /// What went wrong.
    pub message: String,
}

/// Counts and failures of one stage run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Items processed in this run.
    pub done: usize,
    /// Items skipped because their output was already up to date.
    pub up_to_date: usize,
    /// Items whose caption or tag file is the user's and was kept as it is.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub kept: usize,
    /// Items skipped because of an error.
    pub failures: Vec<ItemFailure>,
    /// What the end-of-run rate counts, when it is not the items done (train-lora: steps).
    #[serde(skip)]
    pub throughput: Option<Throughput>,
}

/// A count of work units of a run, for its end-of-run rate (`12.5 steps/s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throughput {
    /// Units done in this run.
    pub count: usize,
    /// Their name, plural (`steps`).
    pub unit: &'static str,
}

impl Summary {
    /// Records a per-item error; the message names the file when the error has one.
    pub fn fail(&mut self, item: &Path, error: &Error) {
        let path = error.path().unwrap_or(item).display().to_string();
        let message = error.detail();
        self.failures.push(ItemFailure { path, message });
    }

    /// The exit code this outcome maps to (0 or 3).
    pub fn exit_code(&self) -> u8 {
        if self.failures.is_empty() {
            EXIT_OK
        } else {
            EXIT_PARTIAL
        }
    }
}

/// A path or key as printed in messages: as is, or quoted with escapes when it is empty or
/// holds spaces at its ends or control characters, which would otherwise not show.
pub fn shown(name: &str) -> String {
    let plain = !name.is_empty() && name.trim() == name && !name.chars().any(char::is_control);
    if plain {
        name.to_string()
    } else {
        format!("{name:?}")
    }
}

fn is_zero(count: &usize) -> bool {
    *count == 0
}

static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `-q/--quiet`: a run that ends with every item done or up to date prints nothing at all;
/// skipped items and errors are still printed.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, std::sync::atomic::Ordering::Relaxed);
}

/// Runs a stage body and prints its report: the `main` of every tool.
pub fn run(tool: &str, body: impl FnOnce() -> crate::Result<Summary>) -> std::process::ExitCode {
    let started = Instant::now();
    finish(tool, started, body())
}

/// Prints the end-of-run report of `tool` to stderr and turns the result into an exit code.
pub fn finish(
    tool: &str,
    started: Instant,
    result: crate::Result<Summary>,
) -> std::process::ExitCode {
    let code = match result {
        Ok(summary) => {
            let seconds = started.elapsed().as_secs_f64();
            let Throughput { count, unit } = summary.throughput.unwrap_or(Throughput {
                count: summary.done,
                unit: "items",
            });
            let rate = count as f64 / seconds.max(1e-9);
            for failure in &summary.failures {
                eprintln!(
                    "{tool}: skipped {}: {}",
                    shown(&failure.path),
                    failure.message
                );
            }
            let kept = if summary.kept > 0 {
                format!(
                    ", {} kept (user-written; --overwrite replaces them, keeping a .bak copy)",
                    summary.kept
                )
            } else {
                String::new()
            };
            let quiet = QUIET.load(std::sync::atomic::Ordering::Relaxed);
            if quiet && summary.failures.is_empty() {
                return std::process::ExitCode::from(summary.exit_code());
            }
            eprintln!(
                "{tool}: {} done, {} up to date{kept}, {} failed in {seconds:.2} s ({rate:.1} {unit}/s)",
                summary.done,
                summary.up_to_date,
                summary.failures.len()
            );
            summary.exit_code()
        }
        Err(error) => {
            eprintln!("{tool}: error: {error}");
            match error {
                Error::Usage(_) => EXIT_USAGE,
                Error::Interrupted(_) => super::interrupt::EXIT_INTERRUPTED,
                _ => EXIT_FATAL,
            }
        }
    };
    std::process::ExitCode::from(code)
}

/// Progress display: a bar with items/s and ETA on a terminal, a plain line every few seconds
/// otherwise (CI logs, `make -j`).
pub struct Progress {
    bar: indicatif::ProgressBar,
    label: String,
    total: u64,
    plain: Option<std::sync::Mutex<PlainState>>,
}

struct PlainState {
    started: Instant,
    last_line: Instant,
}

/// Interval between plain progress lines when stderr is not a terminal.
const PLAIN_INTERVAL: Duration = Duration::from_secs(5);

impl Progress {
    /// A progress display for `total` items, hidden entirely when `quiet`.
    pub fn new(label: &str, total: usize, quiet: bool) -> Self {
        let total = total as u64;
        let terminal = std::io::stderr().is_terminal();
        let bar = if quiet || !terminal {
            indicatif::ProgressBar::hidden()
        } else {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} {rate} ETA {eta} {msg}",
                )
                .expect("valid template")
                .with_key(
                    "rate",
                    |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(w, "{}", rate_text(state.per_sec()));
                    },
                )
                .progress_chars("=> "),
            );
            bar.set_prefix(label.to_string());
            bar
        };
        let plain = (!quiet && !terminal).then(|| {
            std::sync::Mutex::new(PlainState {
                started: Instant::now(),
                last_line: Instant::now(),
            })
        });
        Progress {
            bar,
            label: label.to_string(),
            total,
            plain,
        }
    }

    /// Marks `n` more items finished.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
        if let Some(state) = &self.plain {
            let mut state = state.lock().expect("progress lock");
            if state.last_line.elapsed() >= PLAIN_INTERVAL {
                state.last_line = Instant::now();
                let done = self.bar.position();
                let seconds = state.started.elapsed().as_secs_f64();
                let rate = done as f64 / seconds.max(1e-9);
                let status = self.bar.message();
                eprintln!(
                    "{}",
                    plain_line(&self.label, done, self.total, rate, &status)
                );
            }
        }
    }

    /// Sets the text shown after the bar (and in plain lines), e.g. the running loss.
    pub fn set_status(&self, status: String) {
        self.bar.set_message(status);
    }

    /// Runs `f` with the bar hidden (a child process writing to the same terminal).
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.bar.suspend(f)
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// A progress line for logs: `label: done/total (rate, ETA s[, status])`.
fn plain_line(label: &str, done: u64, total: u64, rate: f64, status: &str) -> String {
    let eta = total.saturating_sub(done) as f64 / rate.max(1e-9);
    let status = if status.is_empty() {
        String::new()
    } else {
        format!(", {status}")
    };
    format!(
        "{label}: {done}/{total} ({}, ETA {eta:.0} s{status})",
        rate_text(rate)
    )
}

/// A progress line read back ([`plain_line`]'s format), for programs that watch a tool's stderr.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlainProgress {
    /// What is counted, e.g. `train-lora steps`.
    pub label: String,
    /// Items finished.
    pub done: u64,
    /// Items planned.
    pub total: u64,
    /// The rate as printed (`2.0/s`, `20.0 s each`).
    pub rate: String,
    /// Seconds left, as estimated by the tool.
    pub eta_seconds: u64,
    /// The status after the estimate (e.g. `loss 0.1234 avg 0.1300 lr 1.00e-4`), or empty.
    pub status: String,
}

impl PlainProgress {
    /// Reads a line printed by a tool's progress when stderr is not a terminal; `None` for any
    /// other line.
    pub fn parse(line: &str) -> Option<Self> {
        let (label, rest) = line.split_once(": ")?;
        let (counts, rest) = rest.split_once(" (")?;
        let (done, total) = counts.split_once('/')?;
        let inner = rest.strip_suffix(')')?;
        let (rate, rest) = inner.split_once(", ETA ")?;
        let (eta, status) = match rest.split_once(" s, ") {
            Some((eta, status)) => (eta, status),
            None => (rest.strip_suffix(" s")?, ""),
        };
        Some(PlainProgress {
            label: label.to_string(),
            done: done.parse().ok()?,
            total: total.parse().ok()?,
            rate: rate.to_string(),
            eta_seconds: eta.parse().ok()?,
            status: status.to_string(),
        })
    }
}

/// A rate rounded for reading: `12/s`, `3.4/s`, `0.27/s`, or seconds per item when slower.
fn rate_text(per_second: f64) -> String {
    match per_second {
        r if !r.is_finite() || r <= 0.0 => "-/s".into(),
        r if r >= 10.0 => format!("{r:.0}/s"),
        r if r >= 1.0 => format!("{r:.1}/s"),
        r if r >= 0.1 => format!("{r:.2}/s"),
        r => format!("{:.1} s each", 1.0 / r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_carry_the_status() {
        assert_eq!(
            plain_line(
                "train-lora steps",
                10,
                40,
                2.0,
                "loss 0.1234 avg 0.1300 lr 1.00e-4"
            ),
            "train-lora steps: 10/40 (2.0/s, ETA 15 s, loss 0.1234 avg 0.1300 lr 1.00e-4)"
        );
        assert_eq!(
            plain_line("images", 1, 2, 0.5, ""),
            "images: 1/2 (0.50/s, ETA 2 s)"
        );
    }

    #[test]
    fn plain_lines_read_back() {
        let line = plain_line("train-lora steps", 10, 40, 2.0, "loss 0.1234 avg 0.1300");
        let parsed = PlainProgress::parse(&line).unwrap();
        assert_eq!(
            parsed,
            PlainProgress {
                label: "train-lora steps".into(),
                done: 10,
                total: 40,
                rate: "2.0/s".into(),
                eta_seconds: 15,
                status: "loss 0.1234 avg 0.1300".into(),
            }
        );
        let bare = PlainProgress::parse(&plain_line("images", 1, 2, 0.05, "")).unwrap();
        assert_eq!((bare.rate.as_str(), bare.eta_seconds), ("20.0 s each", 20));
        assert_eq!(bare.status, "");
        assert_eq!(PlainProgress::parse("wrote 3 files: ok"), None);
    }

    #[test]
    fn rates_are_rounded_for_reading() {
        assert_eq!(rate_text(1.2279), "1.2/s");
        assert_eq!(rate_text(123.456), "123/s");
        assert_eq!(rate_text(0.27), "0.27/s");
        assert_eq!(rate_text(0.05), "20.0 s each");
        assert_eq!(rate_text(0.0), "-/s");
    }

    #[test]
    fn names_that_would_not_show_are_quoted() {
        assert_eq!(shown("a/b c.png"), "a/b c.png");
        assert_eq!(shown(""), "\"\"");
        assert_eq!(shown(" x.png"), "\" x.png\"");
        assert_eq!(shown("new\nline.png"), "\"new\\nline.png\"");
    }
}
