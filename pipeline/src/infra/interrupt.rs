//! Ctrl-C (SIGINT) and SIGTERM as a request to stop at the next safe point: long loops poll
//! [`requested`] and save before exiting; a second signal exits at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use signal_hook::consts::{SIGINT, SIGTERM};

/// Exit code of a run stopped by a signal (128 + SIGINT, as shells report it).
pub const EXIT_INTERRUPTED: u8 = 130;

static REQUESTED: AtomicBool = AtomicBool::new(false);
static INSTALLED: OnceLock<()> = OnceLock::new();

/// From now on, the first SIGINT or SIGTERM sets [`requested`] and says what will happen (the
/// current step finishes, then the run saves); a second one exits with [`EXIT_INTERRUPTED`].
/// `tool` names the program in those messages. Calling it again changes nothing.
pub fn catch(tool: &'static str) -> std::io::Result<()> {
    // Ranks of a data-parallel run in one process (threads) install one handler between them.
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _installing = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    if INSTALLED.get().is_some() {
        return Ok(());
    }
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for _ in signals.forever() {
                if REQUESTED.swap(true, Ordering::SeqCst) {
                    eprintln!("{tool}: stopped at once (second interrupt); nothing more saved");
                    std::process::exit(i32::from(EXIT_INTERRUPTED));
                }
                eprintln!(
                    "{tool}: interrupt: finishing the current step, then saving a resumable \
                     state (interrupt again to stop at once)"
                );
            }
        })?;
    let _ = INSTALLED.set(());
    Ok(())
}

/// Whether a stop was requested since [`catch`].
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
