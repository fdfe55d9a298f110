//! `cliper faces`: the face detector on its own, for checking what it finds.

use super::*;
use cliper::vision::draw;
use cliper::vision::faces::FaceBox;
use serde::Serialize;

#[derive(clap::Args)]
pub(crate) struct FacesArgs {
    #[command(flatten)]
    faces: FaceArgs,
    /// Also save each image with its boxes and landmarks drawn, as
    /// DIR/<name>.faces.png.
    #[arg(long, value_name = "DIR")]
    draw: Option<PathBuf>,
    /// Images to search.
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

/// One line of output.
#[derive(Serialize)]
struct ImageFaces<'a> {
    file: &'a str,
    width: u32,
    height: u32,
    detector: &'static str,
    faces: Vec<FaceRecord>,
}

/// A face, as the session JSONL writes it.
#[derive(Serialize)]
pub(crate) struct FaceRecord {
    /// x, y, w, h in pixels.
    #[serde(rename = "box")]
    pub bbox: [u32; 4],
    pub score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub landmarks: Option<[[f32; 2]; 5]>,
}

impl From<&FaceBox> for FaceRecord {
    fn from(f: &FaceBox) -> Self {
        Self {
            bbox: [f.x, f.y, f.w, f.h],
            score: f.score,
            landmarks: f
                .landmarks
                .map(|l| l.map(|p| p.map(|v| (v * 10.0).round() / 10.0))),
        }
    }
}

impl FacesArgs {
    pub(crate) fn run(self) -> Result<()> {
        let mut analyzer = self.faces.still_analyzer()?;
        if !analyzer.config.detect {
            anyhow::bail!("`cliper faces` runs the detector: leave out --no-detect");
        }
        if let Some(dir) = &self.draw {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("could not create --draw folder {}", dir.display()))?;
        }
        let detector = analyzer.config.detector.kind.name();
        super::each_image(&self.images, |path, img| {
            let faces = analyzer.find_faces(&img);
            let file = path.display().to_string();
            let line = ImageFaces {
                file: &file,
                width: img.width(),
                height: img.height(),
                detector,
                faces: faces.iter().map(FaceRecord::from).collect(),
            };
            println!("{}", serde_json::to_string(&line)?);
            if let Some(dir) = &self.draw {
                let mut out = img;
                draw_faces(&mut out, &faces);
                let name = path
                    .file_name()
                    .map_or("image".into(), |n| n.to_string_lossy());
                let dest = dir.join(format!("{name}.faces.png"));
                out.save(&dest)
                    .with_context(|| format!("could not write {}", dest.display()))?;
            }
            Ok(())
        })
    }
}

/// Boxes in green, landmarks as small squares (eyes blue, nose red, mouth
/// yellow), and each score above its box.
pub(crate) fn draw_faces(img: &mut image::RgbImage, faces: &[FaceBox]) {
    let thick = (img.width().max(img.height()) / 400).max(2) as i64;
    for f in faces {
        let green = image::Rgb([40, 220, 60]);
        draw::stroke_rect(
            img, f.x as i64, f.y as i64, f.w as i64, f.h as i64, thick, green,
        );
        draw::draw_text(
            img,
            f.x as i64,
            f.y as i64 - 10 * thick,
            &format!("{:.2}", f.score),
            thick as u32,
            green,
        );
        if let Some(l) = f.landmarks {
            let colours = [
                [60, 120, 255],
                [60, 120, 255],
                [255, 60, 60],
                [255, 220, 0],
                [255, 220, 0],
            ];
            for (p, c) in l.iter().zip(colours) {
                let r = thick * 2;
                draw::fill_rect(
                    img,
                    p[0] as i64 - r,
                    p[1] as i64 - r,
                    2 * r + 1,
                    2 * r + 1,
                    image::Rgb(c),
                );
            }
        }
    }
}
