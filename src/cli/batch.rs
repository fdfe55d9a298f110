//! `cliper batch`: one task of an array job, and `batch merge`.

use super::*;

#[derive(clap::Args, Clone)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub(crate) struct BatchArgs {
    #[command(subcommand)]
    action: Option<BatchAction>,
    /// A folder searched recursively for videos and images (hidden entries skipped).
    #[arg(
        long,
        conflicts_with = "manifest",
        required_unless_present = "manifest"
    )]
    input: Option<PathBuf>,
    /// A file listing one video or image per line (relative paths from its folder).
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// The output folder, shared by all tasks of the array.
    #[arg(long, required = true)]
    out: Option<PathBuf>,
    /// This task's share: TASK/TASKS, e.g. 3/8. Default: from
    /// SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, or JOB_COMPLETION_INDEX
    /// with --shards, or the whole list.
    #[arg(long, value_name = "I/N")]
    shard: Option<String>,
    /// The number of tasks, with Kubernetes' JOB_COMPLETION_INDEX.
    #[arg(value_parser = ranged::<1, 1000000>, long, value_name = "N")]
    shards: Option<usize>,
    /// Redo inputs that are already finished.
    #[arg(long)]
    force: bool,
    /// Also write each input's annotated video (video.mp4).
    #[arg(long)]
    record_video: bool,
    #[command(flatten)]
    scoring: ScoringArgs,
    /// Descriptors kept per face in session.jsonl.
    #[arg(value_parser = ranged::<1, 1000>, long, value_name = "K", default_value_t = 5)]
    top: usize,
    /// Also score this free-text description against each face.
    #[arg(long, value_name = "TEXT")]
    probe: Option<String>,
    #[command(flatten)]
    dynamic: DynamicArgs,
}

#[derive(Subcommand, Clone)]
pub(crate) enum BatchAction {
    /// Merge a batch's results into OUT/faces.parquet (one row per frame x
    /// face) and OUT/inputs.parquet (one row per input).
    Merge {
        /// The --out folder of the batch.
        dir: PathBuf,
        /// Write the tables here instead of into DIR.
        #[arg(long, value_name = "DIR")]
        to: Option<PathBuf>,
    },
}

fn batch(args: BatchArgs) -> Result<()> {
    use cliper::batch::{self, Outcome, Shard};
    if let Some(BatchAction::Merge { dir, to }) = args.action {
        let m = batch::merge::merge(&dir, to.as_deref())?;
        eprintln!(
            "merged {} inputs: {} complete, {} partial, {} failed, {} pending; {} face rows in {}, inputs in {}",
            m.inputs,
            m.complete,
            m.partial,
            m.failed,
            m.pending,
            m.rows,
            m.faces_table.display(),
            m.inputs_table.display()
        );
        if !m.whole() {
            anyhow::bail!(
                "{} of {} inputs have no result yet (not processed, or a task is still running): the tables hold only the finished ones",
                m.pending,
                m.inputs
            );
        }
        return Ok(());
    }
    let Some(out) = args.out.clone() else {
        anyhow::bail!("give --out DIR");
    };
    let explicit = args.shard.as_deref().map(Shard::parse).transpose()?;
    let shard = Shard::resolve(explicit, args.shards, |k| std::env::var(k).ok())?;
    let items = match (&args.input, &args.manifest) {
        (Some(dir), _) => batch::folder_work_list(dir, Some(&out))?,
        (None, Some(m)) => batch::manifest_work_list(m)?,
        (None, None) => anyhow::bail!("give --input DIR or --manifest FILE"),
    };
    let analyzer = args.scoring.faces.file_analyzer_config()?;
    let model = args.scoring.spec();
    let settings = cliper::pipeline::recorder::run_settings(
        "batch",
        &model,
        &analyzer,
        None,
        args.probe.as_deref(),
        0.0,
    );
    let opts = batch::task::TaskOptions {
        out: out.clone(),
        items,
        shard,
        force: args.force,
        record_video: args.record_video,
        model,
        analyzer,
        dynamic: args.dynamic.settings(),
        probe: args.probe.clone(),
        top: args.top,
        settings,
    };
    let mine = opts
        .items
        .iter()
        .enumerate()
        .filter(|(i, _)| shard.owns(*i))
        .count();
    eprintln!(
        "task {shard}: {mine} of {} inputs, into {}",
        opts.items.len(),
        out.display()
    );
    let summary = batch::task::run_task(&opts, &mut |r| {
        let s = &r.status;
        let what = match s.of.outcome {
            Outcome::Skipped => "skipped (finished by an earlier run)".to_string(),
            Outcome::Failed | Outcome::Busy => format!(
                "{}: {}",
                s.of.outcome.as_str(),
                s.error.as_deref().unwrap_or("unknown error")
            ),
            Outcome::Complete | Outcome::Partial => {
                let mut t = format!(
                    "{}, {} frames, {} faces in {:.1} s ({:.1} frames/s)",
                    s.of.outcome.as_str(),
                    s.of.frames,
                    s.of.faces,
                    s.seconds,
                    s.of.frames as f64 / s.seconds.max(1e-9)
                );
                if let Some(w) = s.warnings.first() {
                    t.push_str(&format!(
                        "; not read whole ({} warning(s)): {w}",
                        s.warnings.len()
                    ));
                }
                t
            }
        };
        eprintln!("[{}/{}] {}: {what}", r.position, r.of, s.of.input);
    })?;
    eprintln!(
        "task {shard} done in {:.1} s: {} inputs, {} complete, {} partial, {} failed, {} skipped, {} busy; {} frames, {} faces",
        summary.secs,
        summary.inputs,
        summary.complete,
        summary.partial,
        summary.failed,
        summary.skipped,
        summary.busy,
        summary.frames,
        summary.faces
    );
    if !summary.all_whole() {
        anyhow::bail!(
            "{} of this task's {} inputs failed or were not read whole (see {}); rerun the task to retry the failed ones",
            summary.failed + summary.partial + summary.busy,
            summary.inputs,
            out.join(batch::STATUS_DIR).join(shard.status_file()).display()
        );
    }
    Ok(())
}

impl BatchArgs {
    pub(crate) fn run(self) -> Result<()> {
        batch(self)
    }
}
