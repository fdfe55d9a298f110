//! `cliper run`: the live pipeline without a window.

use super::*;

#[derive(clap::Args, Clone)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    scoring: ScoringArgs,
    /// Stop after N frames (a still image gives 1 frame unless told otherwise;
    /// cameras and the demo run until interrupted).
    #[arg(long, value_name = "N")]
    frames: Option<u64>,
    /// One JSON object per frame on stdout.
    #[arg(long)]
    json: bool,
    /// Include the K highest-scoring descriptors of each face.
    #[arg(value_parser = ranged::<1, 1000>, long, value_name = "K")]
    top: Option<usize>,
    /// Also score this free-text description against each face.
    #[arg(long, value_name = "TEXT")]
    probe: Option<String>,
    #[command(flatten)]
    dynamic: DynamicArgs,
    #[command(flatten)]
    record: RecordArgs,
}

fn run_headless(args: RunArgs) -> Result<()> {
    let Some(source) = args.source.spec()? else {
        anyhow::bail!("give --source VIDEO|IMAGE|FOLDER|demo or --camera N");
    };
    use cliper::vision::source::SourceSpec;
    let analyzer = match source {
        SourceSpec::Video(_) | SourceSpec::Still { .. } | SourceSpec::Folder { .. } => {
            args.scoring.faces.file_analyzer_config()?
        }
        SourceSpec::Camera { .. } | SourceSpec::Demo => args.scoring.faces.analyzer_config()?,
    };
    let opts = cliper::commands::run::RunOptions {
        source,
        model: args.scoring.spec(),
        analyzer,
        frames: args.frames,
        json: args.json,
        top: args.top,
        probe: args.probe.clone(),
        dynamic: args.dynamic.settings(),
        progress: true,
        record: None,
        stop: None,
    };
    let mut opts = opts;
    if let Some(dir) = &args.record.record {
        recover_sessions();
        let mut r = cliper::pipeline::recorder::RecordOptions::new(dir);
        r.raw_video = args.record.record_raw;
        r.top = args.top.unwrap_or(5);
        r.settings = cliper::pipeline::recorder::run_settings(
            "run",
            &opts.model,
            &opts.analyzer,
            opts.frames,
            opts.probe.as_deref(),
            0.0,
        );
        opts.record = Some(r);
    }
    // Ctrl-C, SIGTERM and SIGHUP end the run as the end of the source
    // would, so that a recording is finalised; a second one quits at once.
    opts.stop = Some(cliper::stop::listen(|sig| {
        eprintln!(
            "\n{}: finishing (press Ctrl-C again to quit at once)",
            cliper::stop::name(sig)
        )
    })?);
    let stdout = std::io::stdout();
    let summary = cliper::commands::run::run(&opts, &mut stdout.lock())?;
    if let Some(sig) = summary.stopped_by {
        eprintln!(
            "stopped by {} after {} frames",
            cliper::stop::name(sig),
            summary.frames
        );
    }
    eprintln!(
        "processed {} frames, {} faces in {:.1} s on {} (per frame: decode {:.1} ms, detect {:.0} ms, crop {:.1} ms, encode {:.0} ms, score {:.1} ms){}",
        summary.frames,
        summary.faces,
        summary.secs,
        if summary.kernel.is_empty() {
            "a model that did not load"
        } else {
            &summary.kernel
        },
        summary.decode_ms,
        summary.detect_ms,
        summary.crop_ms,
        summary.encode_ms,
        summary.score_ms,
        if summary.warnings > 0 {
            format!(
                "; the source was not read whole: {} warning(s) above",
                summary.warnings
            )
        } else {
            String::new()
        }
    );
    if let Some(outcome) = &summary.record {
        let rec = &outcome.left;
        for n in &rec.errors {
            eprintln!("warning: {n}");
        }
        if let Some(e) = &outcome.error {
            anyhow::bail!(
                "the recording in {} stopped: {e} (all {} frames were processed; {} were recorded)",
                rec.dir.display(),
                summary.frames,
                rec.frames
            );
        }
        eprintln!(
            "recorded {} frames ({} face rows, {} video frames{}) to {}",
            rec.frames,
            rec.face_rows,
            rec.video_frames,
            if rec.video_dropped > 0 {
                format!(", {} dropped", rec.video_dropped)
            } else {
                String::new()
            },
            rec.dir.display()
        );
    }
    if let Some(sig) = summary.stopped_by {
        // Everything is written and closed: exit as the signal asked.
        std::process::exit(128 + sig);
    }
    Ok(())
}

impl RunArgs {
    pub(crate) fn run(self) -> Result<()> {
        run_headless(self)
    }
}
