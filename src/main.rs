//! The `cliper` command line: a thin edge over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use cliper::model::{self, ClipModel};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "cliper",
    version,
    about = "Live, interpretable facial-expression recognition with CLIPER"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// CLIP weights: a file (.safetensors, .pt, .pth, .bin) or a folder.
    /// Default: $CLIPER_WEIGHTS, then weights/, then the Hugging Face cache.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Compute device: auto, cpu, cuda or metal.
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Subcommand)]
enum Command {
    /// Print the L2-normalised CLIP embedding of an image or a text as JSON.
    Embed {
        #[command(flatten)]
        model: ModelArgs,
        /// Image to embed (the whole image, no face detection).
        #[arg(long, conflicts_with = "text", required_unless_present = "text")]
        image: Option<PathBuf>,
        /// Text to embed.
        #[arg(long)]
        text: Option<String>,
    },
    /// Manage CLIP weights.
    Weights {
        #[command(subcommand)]
        action: WeightsAction,
    },
}

#[derive(Subcommand)]
enum WeightsAction {
    /// Download openai/clip-vit-base-patch16 into the Hugging Face cache.
    Fetch,
    /// Show which weights would be used and their architecture.
    Info {
        #[arg(long)]
        weights: Option<PathBuf>,
    },
}

fn load_model(args: &ModelArgs) -> Result<ClipModel> {
    let device = model::device::select(&args.device)?;
    let dtype = model::device::default_dtype(&device);
    let path = model::weights::locate(args.weights.as_deref())?;
    let ckpt = model::Checkpoint::load(&path, candle_core::DType::F32)?;
    Ok(ClipModel::from_checkpoint(&ckpt, &device, dtype)?)
}

fn embed(args: &ModelArgs, image: Option<PathBuf>, text: Option<String>) -> Result<()> {
    let clip = load_model(args)?;
    let emb = match (image, text) {
        (Some(path), _) => {
            let rgb = cliper::vision::images::load_rgb(&path)?;
            let size = clip.config.vision.image_size as u32;
            let px = model::preprocess::preprocess_tensor(
                &image::DynamicImage::ImageRgb8(rgb),
                size,
                &clip.device,
            )?
            .unsqueeze(0)?;
            clip.encode_images(&px)?
        }
        (None, Some(text)) => {
            let tok = model::tokenizer::ClipTokenizer::new();
            clip.encode_texts(&tok, &[text.as_str()])
                .context("cannot embed the text")?
        }
        (None, None) => anyhow::bail!("give --image FILE or --text STRING"),
    };
    let v: Vec<f32> = emb.squeeze(0)?.to_vec1()?;
    println!("{}", serde_json::json!({ "embedding": v }));
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Embed { model, image, text } => embed(&model, image, text),
        Command::Weights { action } => match action {
            WeightsAction::Fetch => {
                let path = model::weights::fetch().map_err(anyhow::Error::msg)?;
                eprintln!("weights ready: {}", path.display());
                Ok(())
            }
            WeightsAction::Info { weights } => {
                let path = model::weights::locate(weights.as_deref())?;
                let ckpt = model::Checkpoint::load(&path, candle_core::DType::F32)?;
                let info = serde_json::json!({
                    "path": path,
                    "naming": format!("{:?}", ckpt.naming),
                    "config": ckpt.config,
                });
                println!("{}", serde_json::to_string_pretty(&info)?);
                Ok(())
            }
        },
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line, not clap's multi-line usage block.
            let msg = e.render().to_string();
            let first = msg.lines().next().unwrap_or("invalid arguments");
            eprintln!("{first} (see `cliper --help`)");
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Candle appends a backtrace when RUST_BACKTRACE is set: keep
            // the message to its first line.
            let msg = format!("{e:#}");
            eprintln!("error: {}", msg.lines().next().unwrap_or("unknown error"));
            ExitCode::FAILURE
        }
    }
}
