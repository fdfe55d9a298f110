//! Stop requests from the operating system: SIGINT (Ctrl-C), SIGTERM (a
//! scheduler, `kill`, a logout) and SIGHUP (a closed terminal).
//!
//! The first one is handed to the caller, which stops as its Stop button
//! would: a recording is finalised (`status: complete`, a playable video,
//! every line flushed). A second one ends the process at once, and the
//! recording is then recovered as after a crash. Only `main`-level code
//! (the `run` command, the live window) listens; the library's threads
//! never see signals.

use crossbeam_channel::{bounded, Receiver};

/// Listens for SIGINT, SIGTERM and SIGHUP on a thread of its own. The first
/// signal number goes to the returned channel, and `on_first` is called
/// with it; a second signal exits with status 128 + its number.
pub fn listen(on_first: impl Fn(i32) + Send + 'static) -> std::io::Result<Receiver<i32>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    let (tx, rx) = bounded(1);
    std::thread::Builder::new()
        .name("cliper-signals".into())
        .spawn(move || {
            let mut seen = false;
            for sig in signals.forever() {
                if seen {
                    eprintln!("\n{}: stopping at once", name(sig));
                    std::process::exit(128 + sig);
                }
                seen = true;
                let _ = tx.try_send(sig);
                on_first(sig);
            }
        })?;
    Ok(rx)
}

/// `SIGINT`, `SIGTERM`, ...
pub fn name(sig: i32) -> &'static str {
    match sig {
        signal_hook::consts::SIGINT => "SIGINT",
        signal_hook::consts::SIGTERM => "SIGTERM",
        signal_hook::consts::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}
