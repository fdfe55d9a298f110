//! `cliper explain`: where on each face a descriptor or class looks.

use super::*;

#[derive(clap::Args)]
pub(crate) struct ExplainArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    bank: BankArgs,
    /// How the map is computed.
    #[arg(long, value_enum, default_value_t = cliper::model::explain::Method::Fast)]
    method: cliper::model::explain::Method,
    /// A class name of the model, or a descriptor index 0..D-1 (CLIPER:
    /// 0..34; default: each face's prediction).
    #[arg(long)]
    target: Option<String>,
    /// Occlusion grid cells per side.
    #[arg(value_parser = ranged::<1, 32>, long, default_value_t = 7)]
    grid: usize,
    /// Overlay opacity, 0..1.
    #[arg(long, default_value_t = 0.55)]
    opacity: f32,
    #[command(flatten)]
    faces: FaceArgs,
    /// The overlay PNG to write.
    #[arg(long)]
    out: PathBuf,
    /// Print the raw grid values as JSON.
    #[arg(long)]
    json: bool,
    image: PathBuf,
}

impl ExplainArgs {
    pub(crate) fn run(self) -> Result<()> {
        let Self {
            model,
            bank,
            method,
            target,
            grid,
            opacity,
            faces,
            out,
            json,
            image,
        } = self;
        use cliper::commands::explain as ex;
        use cliper::model::explain::Method;
        if !(0.0..=1.0).contains(&opacity) {
            anyhow::bail!("--opacity {opacity} is out of range 0..1");
        }
        if grid == 0 {
            anyhow::bail!("--grid must be at least 1");
        }
        let rgb = cliper::vision::images::load_rgb(&image)?;
        let loaded = setup::load(&model.spec(&bank))?;
        let layout = loaded.bank.layout.clone();
        let target = target
            .as_deref()
            .map(|t| ex::parse_target(t, &layout))
            .transpose()?;
        let mut analyzer = faces.still_analyzer()?;
        // Occlusion runs grid^2 + 1 forward passes per face: seconds each
        // with a full-size model on a CPU.
        let bar = (method == Method::Occlusion).then(|| {
            cliper::progress::bar(
                0,
                "occlusion [{bar:30}] {pos}/{len} forward passes, eta {eta}",
                "",
            )
        });
        let faces = ex::explain_image(
            &loaded.clip,
            &loaded.bank,
            &mut analyzer,
            &rgb,
            method,
            target,
            grid,
            &mut |done, total| {
                if let Some(b) = &bar {
                    b.set_length(total as u64);
                    b.set_position(done as u64);
                }
            },
        )
        .with_context(|| format!("cannot explain {}", image.display()))?;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let title = match faces.first().map(|f| f.target) {
            Some(cliper::model::explain::Target::Class(c)) => {
                format!("{} map: class {}", method.as_str(), layout.name(c))
            }
            Some(cliper::model::explain::Target::Descriptor(i)) => {
                format!(
                    "{} map: descriptor {} ({} #{})",
                    method.as_str(),
                    i,
                    layout.name(layout.locate(i).0),
                    layout.locate(i).1
                )
            }
            None => String::new(),
        };
        ex::render(&rgb, &faces, opacity, &title)
            .save(&out)
            .with_context(|| format!("cannot write {}", out.display()))?;
        if json {
            #[derive(serde::Serialize)]
            struct ExplainJson<'a> {
                image: &'a std::path::Path,
                method: &'a str,
                faces: Vec<ex::ExplanationJson<'a>>,
            }
            let line = ExplainJson {
                image: &image,
                method: method.as_str(),
                faces: (faces.iter())
                    .map(|f| ex::ExplanationJson::new(f, &layout))
                    .collect(),
            };
            println!("{}", serde_json::to_string(&line)?);
        } else {
            eprintln!("wrote {} ({} face(s))", out.display(), faces.len());
        }
        Ok(())
    }
}
