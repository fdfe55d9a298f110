//! `cliper bench`: every stage timed, peak memory, agreement of reduced precisions.

use super::*;

#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    /// CLIP weights (file or folder); default: the usual search.
    #[arg(long, conflicts_with = "random")]
    weights: Option<PathBuf>,
    /// Random ViT-B/16 weights of the real shape (no download needed).
    #[arg(long)]
    random: bool,
    /// Batch sizes of the image encoder, comma-separated.
    #[arg(value_parser = ranged::<1, 256>, long, value_delimiter = ',', default_value = "1,8")]
    batch: Vec<usize>,
    /// Image-encoder precision: auto (q8 on a CPU with an 8-bit kernel, else
    /// f32; f16 on GPUs), f32, q8 (8-bit, CPU), bf16/f16 (GPUs).
    #[arg(long, value_enum, default_value_t = Precision::Auto)]
    precision: Precision,
    /// The 8-bit kernel to run instead of the best this CPU has (as
    /// $CLIPER_ISA does everywhere): to measure the AVX2 path of CPUs
    /// without AVX-512 on one that has it.
    #[arg(long, value_enum)]
    isa: Option<cliper::model::gemm_i8::Isa>,
    /// Timed runs per stage, after 2 warm-up runs.
    #[arg(value_parser = ranged::<1, 100000>, long, default_value_t = 10)]
    runs: usize,
    /// Worker threads (default: one per core, or $RAYON_NUM_THREADS).
    #[arg(value_parser = ranged::<1, 1024>, long)]
    threads: Option<usize>,
    /// Compute device.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// Images for the reduced-precision agreement report (default: 64
    /// crops of the built-in demo portrait).
    #[arg(long, num_args = 1..)]
    images: Vec<PathBuf>,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

impl BenchArgs {
    pub(crate) fn run(self) -> Result<()> {
        let Self {
            weights,
            random,
            batch,
            precision,
            isa,
            runs,
            threads,
            device,
            images,
            json,
        } = self;
        let opts = cliper::commands::bench::BenchOptions {
            weights,
            random,
            batches: batch,
            precision,
            isa,
            runs,
            threads,
            device: device.as_str().into(),
            images,
            ..Default::default()
        };
        let report = cliper::commands::bench::run(&opts, &mut |s| eprintln!("bench: {s}"))?;
        if json {
            println!("{}", report.to_json());
        } else {
            print!("{}", report.to_text());
        }
        Ok(())
    }
}
