//! `cliper classify`, `classify-clip` and `embed`: stills, clips and raw embeddings.

use super::*;

/// What `classify` and `classify-clip` print.
#[derive(clap::Args)]
struct OutputArgs {
    /// Show only the K highest-scoring descriptors of each face.
    #[arg(value_parser = ranged::<1, 1000>, long)]
    top: Option<usize>,
    /// One JSON object per image or clip on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub(crate) struct ClassifyArgs {
    #[command(flatten)]
    scoring: ScoringArgs,
    #[command(flatten)]
    output: OutputArgs,
    /// Images to classify.
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

#[derive(clap::Args)]
pub(crate) struct ClassifyClipArgs {
    #[command(flatten)]
    scoring: ScoringArgs,
    #[command(flatten)]
    output: OutputArgs,
    /// Videos (any format FFmpeg reads: .mp4, .mov, .mkv, .webm, .avi, ...) or folders of frames.
    #[arg(required = true)]
    clips: Vec<PathBuf>,
}

#[derive(clap::Args)]
pub(crate) struct EmbedArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Image to embed (the whole image, no face detection).
    #[arg(long, conflicts_with = "text", required_unless_present = "text")]
    image: Option<PathBuf>,
    /// Text to embed.
    #[arg(long)]
    text: Option<String>,
}

impl EmbedArgs {
    pub(crate) fn run(self) -> Result<()> {
        let Self { model, image, text } = self;
        embed(&model, image, text)
    }
}

fn load_model(args: &ModelArgs) -> Result<ClipModel> {
    let device = model::device::select(args.device.as_str())?;
    let dtype = model::device::default_dtype(&device);
    let path = model::weights::locate(args.weights.as_deref())?;
    let ckpt = model::Checkpoint::load(&path, candle_core::DType::F32)?;
    Ok(ClipModel::from_checkpoint(ckpt, &device, dtype)?)
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
    #[derive(serde::Serialize)]
    struct EmbeddingJson {
        embedding: Vec<f32>,
    }
    println!(
        "{}",
        serde_json::to_string(&EmbeddingJson { embedding: v })?
    );
    Ok(())
}

/// `cliper classify --json`'s line for one image.
#[derive(serde::Serialize)]
struct ImageJson<'a> {
    image: &'a std::path::Path,
    faces: Vec<output::FaceJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    branch: Option<&'static str>,
}

fn classify_note(bank: &cliper::model::cliper::DescriptorBank) {
    if bank.kind == cliper::model::cliper::BankKind::DferClip {
        eprintln!("note: DFER-CLIP is a video model; still images are scored by its image branch (each frame's feature against the class features). `cliper classify-clip` and the dynamic mode use its temporal module.");
    }
}

impl ClassifyArgs {
    pub(crate) fn run(self) -> Result<()> {
        let Self {
            scoring,
            output: OutputArgs { top, json },
            images,
        } = self;
        let mut analyzer = scoring.faces.still_analyzer()?;
        let loaded = setup::load(&scoring.spec())?;
        classify_note(&loaded.bank);
        super::each_image(&images, |path, rgb| {
            let faces = analyzer
                .analyze(&loaded.clip, &loaded.bank, &rgb)
                .with_context(|| format!("cannot classify {}", path.display()))?;
            if json {
                let line = ImageJson {
                    image: path,
                    faces: (faces.iter())
                        .map(|f| {
                            output::FaceJson::new(&f.bbox, &f.scores).with_descriptors(
                                &f.scores,
                                &loaded.bank,
                                top,
                            )
                        })
                        .collect(),
                    // DFER-CLIP is a video model: a still gets its image branch.
                    branch: (loaded.bank.kind == cliper::model::cliper::BankKind::DferClip)
                        .then_some("image"),
                };
                println!("{}", serde_json::to_string(&line)?);
            } else {
                print_table(path, &faces, &loaded.bank, top.unwrap_or(5));
            }
            Ok(())
        })
    }
}

impl ClassifyClipArgs {
    pub(crate) fn run(self) -> Result<()> {
        let Self {
            scoring,
            output: OutputArgs { top, json },
            clips,
        } = self;
        use cliper::commands::clip::{classify_clip, clip_json, sample_clip};
        use cliper::pipeline::dynamic::DynamicScorer;
        let mut analyzer = scoring.faces.still_analyzer()?;
        let loaded = setup::load(&scoring.spec())?;
        let temporal = match &loaded.cliper {
            Some(ck) => ck
                .temporal_module(loaded.clip.config.embed_dim, &loaded.clip.device)
                .with_context(|| {
                    format!("cannot load the temporal module of {}", ck.path.display())
                })?,
            None => None,
        };
        let scorer = DynamicScorer::new(temporal, &loaded.clip.device);
        if scorer.temporal.is_none() {
            eprintln!("note: no trained temporal weights; dynamic scores are the mean of the 16 frames' static scores");
        }
        let mut failed = 0;
        let mut incomplete = 0;
        for path in &clips {
            let sampled = match sample_clip(path, scorer.frames()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    failed += 1;
                    continue;
                }
            };
            for n in &sampled.notes {
                eprintln!("{}: {n}", path.display());
            }
            if !sampled.complete {
                incomplete += 1;
            }
            let r = classify_clip(&loaded.clip, &loaded.bank, &mut analyzer, &scorer, &sampled)
                .with_context(|| format!("cannot classify {}", path.display()))?;
            if json {
                println!("{}", clip_json(path, &r, &sampled, &loaded.bank, top));
            } else {
                let faces: Vec<cliper::pipeline::FaceResult> = match (&r.bbox, &r.scores) {
                    (Some(b), Some(s)) => vec![cliper::pipeline::FaceResult {
                        bbox: *b,
                        scores: s.scores.clone(),
                        embedding: Vec::new(),
                    }],
                    _ => Vec::new(),
                };
                println!(
                    "[dynamic: {}, {} frames{}]",
                    r.scores
                        .as_ref()
                        .map(|s| s.mode.as_str())
                        .unwrap_or("no face"),
                    sampled.frames.len(),
                    if sampled.complete {
                        String::new()
                    } else {
                        format!(
                            ", INCOMPLETE: sampled from the {} readable frames",
                            sampled.source_frames
                        )
                    }
                );
                print_table(path, &faces, &loaded.bank, top.unwrap_or(5));
            }
        }
        if failed > 0 {
            anyhow::bail!("{failed} of {} clips could not be read", clips.len());
        }
        if incomplete > 0 {
            anyhow::bail!(
            "{incomplete} of {} clips could not be read whole (\"complete\": false; see the notes above): their scores cover only the frames read",
            clips.len()
        );
        }
        Ok(())
    }
}

fn print_table(
    path: &std::path::Path,
    faces: &[cliper::pipeline::FaceResult],
    bank: &cliper::model::cliper::DescriptorBank,
    top: usize,
) {
    println!(
        "{}: {} face(s)  [{} descriptors: {}]",
        path.display(),
        faces.len(),
        bank.kind.as_str(),
        bank.source
    );
    for (n, f) in faces.iter().enumerate() {
        let b = &f.bbox;
        println!(
            "  face {} at x={} y={} w={} h={}: {}",
            n + 1,
            b.x,
            b.y,
            b.w,
            b.h,
            f.scores.predicted_name()
        );
        for (c, name) in f.scores.layout.classes().iter().enumerate() {
            let p = f.scores.probs[c];
            let bar = "#".repeat((p * 30.0).round() as usize);
            println!(
                "    {name:<10} score {:>8.3}  prob {p:>6.3}  {bar}",
                f.scores.class_scores[c]
            );
        }
        println!("    top descriptors:");
        for &i in f.scores.ranked().iter().take(top) {
            let d = &bank.descriptors[i];
            println!(
                "      {:>8.3}  {:<10} #{}  {}",
                f.scores.logits[i],
                bank.layout.name(d.class),
                d.index,
                d.text
            );
        }
    }
}
