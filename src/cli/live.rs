//! `cliper live` (and plain `cliper`): the window.

use super::*;

#[derive(clap::Args, Clone)]
pub(crate) struct LiveArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    bank: BankArgs,
    #[command(flatten)]
    precision: PrecisionArgs,
    #[command(flatten)]
    source: SourceArgs,
    /// Close the window after SECONDS and print the session's speed figures.
    #[arg(long, value_name = "SECONDS")]
    exit_after: Option<f64>,
    /// Save a PNG of the window just before it closes (use with --exit-after).
    #[arg(long, value_name = "PATH")]
    screenshot: Option<PathBuf>,
    /// Start in dynamic mode (the temporal window) instead of the saved choice.
    #[arg(long)]
    dynamic: bool,
    /// Start with the map of a class name or descriptor index 0..34 drawn over the faces.
    #[arg(long, value_name = "TARGET")]
    explain: Option<String>,
    /// Which map to draw: fast (every frame), gradcam or occlusion (computed
    /// in the background for the paused frame).
    #[arg(long, value_name = "METHOD", value_enum, default_value_t = cliper::model::explain::Method::Fast)]
    map: cliper::model::explain::Method,
    /// Occlusion grid cells per side for --map occlusion.
    #[arg(value_parser = ranged::<1, 32>, long, default_value_t = 7)]
    grid: usize,
    /// Pause on the newest scored frame after SECONDS (demos and tests of
    /// the exact maps; Space pauses and resumes by hand).
    #[arg(long, value_name = "SECONDS")]
    pause_after: Option<f64>,
    /// The face detector (default: the saved choice, else CenterFace).
    #[arg(long, value_enum)]
    detector: Option<DetectorKind>,
    /// A CenterFace ONNX file to use instead of the built-in one (if it
    /// cannot be read, the window says so and uses SeetaFace).
    #[arg(long, value_name = "FILE")]
    detector_model: Option<PathBuf>,
    #[command(flatten)]
    record: RecordArgs,
}

fn live(args: LiveArgs) -> Result<()> {
    if args.screenshot.is_some() && args.exit_after.is_none() {
        anyhow::bail!(
            "--screenshot needs --exit-after SECONDS: the picture is taken just before the window closes"
        );
    }
    let map = args.map;
    if !(1..=32).contains(&args.grid) {
        anyhow::bail!(
            "--grid {} is out of range: give 1 to 32 cells per side",
            args.grid
        );
    }
    if let Some(t) = args.pause_after {
        if !(t.is_finite() && t >= 0.0) {
            anyhow::bail!("--pause-after {t} is out of range: give seconds, 0 or more");
        }
    }
    let opts = cliper::app::LiveOptions {
        source: args.source.spec()?,
        model: args.model.spec_in(&args.bank, args.precision.precision),
        bank_given: args.bank.descriptors.is_some() || args.bank.prompts.is_some(),
        exit_after: args.exit_after,
        screenshot: args.screenshot,
        record: args.record.record.clone(),
        record_raw: args.record.record_raw,
        dynamic: args.dynamic,
        explain: args
            .explain
            .as_deref()
            .map(|t| {
                // The live app's bank is not loaded yet: targets are read
                // under CLIPER's classes.
                cliper::commands::explain::parse_target(
                    t,
                    &cliper::model::cliper::expressions::BankLayout::cliper(),
                )
            })
            .transpose()?,
        map,
        grid: args.grid,
        pause_after: args.pause_after,
        detector: args.detector,
        detector_model: args.detector_model.clone(),
    };
    let timed = opts.exit_after.is_some();
    let report = cliper::app::run_live(opts)?;
    if timed {
        eprintln!("live session: {report}");
    }
    Ok(())
}

impl LiveArgs {
    pub(crate) fn run(self) -> Result<()> {
        live(self)
    }
}
