//! `cliper weights`: the CLIP download, the named models, what is installed.

use super::*;

#[derive(Subcommand)]
pub(crate) enum WeightsAction {
    /// Without NAME: download openai/clip-vit-base-patch16 into the Hugging
    /// Face cache. With NAME: download a named model (`cliper weights list`):
    /// an Exp-CLIP head or a DFER-CLIP checkpoint.
    Fetch {
        /// A model name from `cliper weights list`.
        name: Option<String>,
    },
    /// The models that can be fetched by name, which are installed, and
    /// what each is: backbone, classes, source, licence, published accuracy.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show which weights would be used and their architecture.
    Info {
        #[arg(long)]
        weights: Option<PathBuf>,
    },
}

impl WeightsAction {
    pub(crate) fn run(self) -> Result<()> {
        match self {
            WeightsAction::Fetch { name: None } => {
                let path = model::weights::fetch()?;
                eprintln!("weights ready: {}", path.display());
                Ok(())
            }
            WeightsAction::Fetch { name: Some(name) } => fetch_named(&name),
            WeightsAction::List { json } => list_models(json),
            WeightsAction::Info { weights } => {
                let path = model::weights::locate(weights.as_deref())?;
                let ckpt = model::Checkpoint::load(&path, candle_core::DType::F32)?;
                #[derive(serde::Serialize)]
                struct InfoJson<'a> {
                    path: &'a std::path::Path,
                    naming: String,
                    config: &'a cliper::model::ClipConfig,
                }
                let info = InfoJson {
                    path: &path,
                    naming: format!("{:?}", ckpt.naming),
                    config: &ckpt.config,
                };
                println!("{}", serde_json::to_string_pretty(&info)?);
                Ok(())
            }
        }
    }
}

fn fetch_named(name: &str) -> Result<()> {
    let entry = model::zoo::find(name).ok_or_else(|| model::zoo::ZooError::Unknown(name.into()))?;
    let bar = model::weights::download_bar();
    bar.set_message(entry.name.to_string());
    let path = model::zoo::fetch(entry.name, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let path = path?;
    let how = match entry.kind {
        model::zoo::ZooKind::ExpClipHead => format!("--head {}", entry.name),
        model::zoo::ZooKind::DferClip => format!("--model {}", entry.name),
    };
    eprintln!(
        "{} ready: {} (use it with {how})",
        entry.name,
        path.display()
    );
    if let Some(clip) = entry.needs_clip {
        eprintln!("it runs on the CLIP weights {clip}");
    }
    Ok(())
}

fn list_models(json: bool) -> Result<()> {
    let clip = model::weights::locate(None).ok();
    if json {
        #[derive(serde::Serialize)]
        struct ModelJson {
            name: &'static str,
            kind: &'static str,
            installed: bool,
            path: PathBuf,
            backbone: &'static str,
            needs_clip: Option<&'static str>,
            classes: &'static str,
            descriptors_per_class: &'static str,
            source: String,
            project: &'static str,
            licence: &'static str,
            accuracy: &'static str,
        }
        #[derive(serde::Serialize)]
        struct ListJson {
            clip_weights: Option<PathBuf>,
            models_dir: PathBuf,
            models: Vec<ModelJson>,
        }
        let list = ListJson {
            clip_weights: clip,
            models_dir: model::zoo::models_dir(),
            models: (model::zoo::CATALOGUE.iter())
                .map(|e| ModelJson {
                    name: e.name,
                    kind: e.kind.as_str(),
                    installed: e.installed(),
                    path: e.path(),
                    backbone: e.backbone,
                    needs_clip: e.needs_clip,
                    classes: e.classes,
                    descriptors_per_class: e.descriptors_per_class,
                    source: e.page(),
                    project: e.project,
                    licence: e.licence,
                    accuracy: e.accuracy,
                })
                .collect(),
        };
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    match &clip {
        Some(p) => println!("CLIP weights: {} (installed)", p.display()),
        None => println!("CLIP weights: not installed (`cliper weights fetch`)"),
    }
    println!("models folder: {}\n", model::zoo::models_dir().display());
    for e in model::zoo::CATALOGUE {
        println!(
            "{:<22} {:<13} {}",
            e.name,
            e.kind.as_str(),
            if e.installed() {
                "installed"
            } else {
                "not installed"
            }
        );
        println!("    backbone:    {}", e.backbone);
        if let Some(c) = e.needs_clip {
            println!("    needs CLIP:  {c}");
        }
        println!("    classes:     {}", e.classes);
        println!("    per class:   {}", e.descriptors_per_class);
        println!(
            "    from:        {} ({}), licence {}",
            e.project,
            e.page(),
            e.licence
        );
        println!("    accuracy:    {}", e.accuracy);
    }
    Ok(())
}
