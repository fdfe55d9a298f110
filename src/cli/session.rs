//! `cliper replay` and `cliper report`: recorded sessions, and their recovery.

use super::*;

#[derive(clap::Args)]
pub(crate) struct ReplayArgs {
    /// The session folder (what --record wrote).
    dir: PathBuf,
    /// Close the window after SECONDS.
    #[arg(long, value_name = "SECONDS")]
    exit_after: Option<f64>,
    /// Save a PNG of the window just before it closes (use with --exit-after).
    #[arg(long, value_name = "PATH")]
    screenshot: Option<PathBuf>,
}

impl ReplayArgs {
    pub(crate) fn run(self) -> Result<()> {
        let Self {
            dir,
            exit_after,
            screenshot,
        } = self;
        if screenshot.is_some() && exit_after.is_none() {
            anyhow::bail!("--screenshot needs --exit-after SECONDS");
        }
        recover_session(&dir)?;
        cliper::app::replay::run_replay(cliper::app::replay::ReplayOptions {
            dir,
            exit_after,
            screenshot,
        })?;
        Ok(())
    }
}

#[derive(clap::Args)]
pub(crate) struct ReportArgs {
    /// The session folder (what --record wrote).
    dir: PathBuf,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Where to write timeline_<id>.png (default: the session folder).
    #[arg(long, value_name = "DIR")]
    png_dir: Option<PathBuf>,
    /// Do not draw the timeline PNGs.
    #[arg(long, conflicts_with = "png_dir")]
    no_png: bool,
}

impl ReportArgs {
    pub(crate) fn run(self) -> Result<()> {
        let Self {
            dir,
            json,
            png_dir,
            no_png,
        } = self;
        report(dir, json, png_dir, no_png)
    }
}

/// Finalises sessions in the default recordings folder that a crash left
/// unfinished, saying so on stderr.
pub(crate) fn recover_sessions() {
    let base = cliper::session::default_recordings_dir();
    for (dir, r) in cliper::session::finalize::finalize_all(&base) {
        match r {
            Ok(cliper::session::finalize::Finalized::Recovered(r)) => eprintln!("note: {r}"),
            Ok(_) => {}
            Err(e) => eprintln!("warning: cannot finalise {}: {e}", dir.display()),
        }
    }
}

/// Finalises `dir` if a crash left it unfinished (replay and report).
pub(crate) fn recover_session(dir: &std::path::Path) -> Result<()> {
    use cliper::session::finalize::{finalize, Finalized};
    use cliper::session::SessionError;
    match finalize(dir) {
        Ok(Finalized::Recovered(r)) => eprintln!("note: {r}"),
        Ok(Finalized::AlreadyFinished(_)) => {}
        Err(SessionError::Busy(_)) => eprintln!(
            "note: {} is still being recorded; showing what is written so far",
            dir.display()
        ),
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

fn report(dir: PathBuf, json: bool, png_dir: Option<PathBuf>, no_png: bool) -> Result<()> {
    use cliper::session::report::{summarize, write_timelines};
    recover_session(&dir)?;
    let session = cliper::session::Session::open(&dir)?;
    let summary = summarize(&session);
    let pngs = if no_png {
        Vec::new()
    } else {
        write_timelines(&session, png_dir.as_deref().unwrap_or(&dir))?
    };
    if json {
        let mut v = summary.to_json();
        v.timelines = Some(pngs);
        println!("{}", serde_json::to_string(&v)?);
    } else {
        print!("{}", summary.to_text());
        if !pngs.is_empty() {
            println!();
            for p in &pngs {
                println!("timeline: {}", p.display());
            }
        }
    }
    if session.bad_lines > 0 {
        eprintln!(
            "warning: {} unreadable line(s) of session.jsonl were skipped",
            session.bad_lines
        );
    }
    Ok(())
}
