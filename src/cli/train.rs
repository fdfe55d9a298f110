//! `cliper train` and `cliper eval`.

use super::*;

#[derive(clap::Args)]
pub(crate) struct TrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Data set root (or the CSV manifest for --layout csv).
    #[arg(long)]
    data: PathBuf,
    /// Data set layout.
    #[arg(long, value_enum)]
    layout: cliper::train::dataset::Layout,
    /// Epochs of stage 1 (descriptors only, on cached image features).
    #[arg(value_parser = ranged::<0, 100000>, long, default_value_t = 2)]
    stage1_epochs: usize,
    /// Total epochs (stage 2 = the rest).
    #[arg(value_parser = ranged::<1, 100000>, long, default_value_t = 59)]
    epochs: usize,
    /// Stop after stage 1.
    #[arg(long)]
    stage1_only: bool,
    #[arg(value_parser = ranged::<1, 65536>, long, default_value_t = 128)]
    batch_size: usize,
    /// Where to write the best CLIPER checkpoint (.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Continue from the training state saved next to --out.
    #[arg(long)]
    resume: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Feature cache folder (default: .cliper-cache next to --out).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Skip unreadable images (counted) instead of failing.
    #[arg(long)]
    skip_unreadable: bool,
    /// Replace an existing --out file that is not this run's checkpoint.
    #[arg(long)]
    force: bool,
}

impl TrainArgs {
    pub(crate) fn run(self) -> Result<()> {
        let opts = cliper::train::trainer::TrainOptions {
            device: self.model.device.as_str().into(),
            weights: self.model.weights,
            data: self.data,
            layout: self.layout,
            stage1_epochs: self.stage1_epochs,
            epochs: self.epochs,
            stage1_only: self.stage1_only,
            batch_size: self.batch_size,
            out: self.out,
            resume: self.resume,
            seed: self.seed,
            cache_dir: self.cache,
            skip_unreadable: self.skip_unreadable,
            force: self.force,
        };
        let summary = cliper::train::trainer::train(&opts, &mut |line| eprintln!("{line}"))?;
        eprintln!(
            "best test WAR {:.2}% / UAR {:.2}% at epoch {}; checkpoint: {}",
            100.0 * summary.best_war,
            100.0 * summary.best_uar,
            summary.best_epoch,
            opts.out.display()
        );
        Ok(())
    }
}

#[derive(clap::Args)]
pub(crate) struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    bank: BankArgs,
    #[arg(long)]
    data: PathBuf,
    #[arg(long, value_enum)]
    layout: cliper::train::dataset::Layout,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Also draw the confusion matrix into this PNG.
    #[arg(long)]
    png: Option<PathBuf>,
    #[arg(long)]
    skip_unreadable: bool,
}

impl EvalArgs {
    pub(crate) fn run(self) -> Result<()> {
        let Self {
            model,
            bank,
            data,
            layout,
            json,
            png,
            skip_unreadable,
        } = self;
        let spec = model.spec(&bank);
        let m = cliper::train::trainer::evaluate(&spec, &data, layout, skip_unreadable)?;
        if let Some(p) = &png {
            m.save_png(p, &format!("confusion: {}", data.display()))?;
        }
        if json {
            println!("{}", m.to_json());
        } else {
            print!("{}", m.to_text());
        }
        Ok(())
    }
}
