//! `cliper train` and `cliper eval`: the two-stage recipe with progress
//! bars, per-epoch metrics, the best checkpoint kept, and resumable state.
//!
//! Stage 1 (descriptors only) runs on cached image features, so it is cheap
//! on a CPU. Stage 2 fine-tunes the vision tower with augmentation; it runs
//! wherever the tower fits (a GPU for ViT-B/16 on real data, a CPU for tiny
//! models).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use indicatif::ProgressBar;

use super::augment::{augment, AugmentConfig};
use super::dataset::{self, Dataset, Layout};
use super::features::{encode_split, EncodedSplit};
use super::loss::cliper_loss;
use super::metrics::Metrics;
use super::optim::{cosine_warm_restarts, AdamW, AdamWConfig};
use super::TrainError;
use crate::model::cliper::bank::{learned_text_features, nearest_token_ids, WORDS_PER_TOKEN};
use crate::model::cliper::checkpoint::CliperCheckpoint;
use crate::model::cliper::expressions::{CLASSES, NUM_DESCRIPTORS, SLOTS};
use crate::model::cliper::scoring::{logits as score_logits, ExpressionScores};
use crate::model::layers::l2_normalize;
use crate::model::rng::SplitMix64;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::vision::VisionTower;
use crate::model::weights::{self, Checkpoint};
use crate::model::{device, ClipModel};
use crate::vision::images::load_rgb;
use stage1::{descriptor_stage, save_checkpoint};

mod clips;
mod evaluate;
mod stage1;
mod state;

use clips::*;
pub use evaluate::*;
pub use state::*;

#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub weights: Option<PathBuf>,
    pub data: PathBuf,
    pub layout: Layout,
    pub stage1_epochs: usize,
    pub epochs: usize,
    pub stage1_only: bool,
    pub batch_size: usize,
    pub out: PathBuf,
    pub resume: bool,
    pub seed: u64,
    pub cache_dir: Option<PathBuf>,
    pub skip_unreadable: bool,
    pub device: String,
    /// Replace an existing `out` file that is not this run's checkpoint.
    pub force: bool,
}

impl TrainOptions {
    pub fn new(data: PathBuf, layout: Layout, out: PathBuf) -> Self {
        Self {
            weights: None,
            data,
            layout,
            stage1_epochs: 2,
            epochs: 59,
            stage1_only: false,
            batch_size: 128,
            out,
            resume: false,
            seed: 0,
            cache_dir: None,
            skip_unreadable: false,
            force: false,
            device: "auto".into(),
        }
    }
}

/// What an epoch did on the training set, for its line of the log.
pub(super) struct EpochTally<'a> {
    /// 1 or 2, and how the log names it.
    pub(super) stage: u8,
    pub(super) label: &'a str,
    pub(super) total_epochs: usize,
    /// Summed loss, right predictions and samples seen.
    pub(super) loss_sum: f64,
    pub(super) correct: usize,
    pub(super) seen: usize,
}

/// An epoch's line of the log: the tally, the learning rate and the test
/// metrics.
fn epoch_line(t: &EpochTally, epoch: usize, lr: f64, m: &Metrics, best: bool) -> String {
    let seen = t.seen.max(1) as f64;
    format!(
        "epoch {epoch:>3}/{} {}  lr {lr:.1e}  loss {:.4}  train acc {:5.1}%  test WAR {:5.1}%  UAR {:5.1}%{}",
        t.total_epochs,
        t.label,
        t.loss_sum / seen,
        100.0 * t.correct as f64 / seen,
        100.0 * m.war(),
        100.0 * m.uar(),
        if best { "  (best, saved)" } else { "" }
    )
}

/// What a finished run reports.
#[derive(Debug)]
pub struct TrainSummary {
    pub best_war: f64,
    pub best_uar: f64,
    pub best_epoch: usize,
    pub epochs_run: usize,
}

impl TrainSummary {
    /// The best epoch so far of `state`, after `epochs_run` epochs.
    fn of(state: &State, epochs_run: usize) -> Self {
        Self {
            best_war: state.best_war.max(0.0),
            best_uar: state.best_uar,
            best_epoch: state.best_epoch,
            epochs_run,
        }
    }
}

/// The normalised text features of descriptors [35, T, D] (the scoring's
/// right-hand side).
fn descriptor_text(clip: &ClipModel, descriptor: &Tensor) -> candle_core::Result<Tensor> {
    l2_normalize(&learned_text_features(&clip.text, descriptor)?)
}

/// The rows `batch` of `x` (on its device) and their labels.
fn select_batch(
    x: &Tensor,
    labels: &[usize],
    batch: &[usize],
) -> candle_core::Result<(Tensor, Vec<usize>)> {
    let idx = Tensor::from_vec(
        batch.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        batch.len(),
        x.device(),
    )?;
    Ok((
        x.index_select(&idx, 0)?,
        batch.iter().map(|&i| labels[i]).collect(),
    ))
}

fn epoch_bar(len: usize, label: String) -> ProgressBar {
    crate::progress::bar(len as u64, "{msg} [{bar:30}] {pos}/{len} {per_sec}", label)
}

fn weights_stamp(path: &Path) -> String {
    let meta = std::fs::metadata(path).ok();
    format!(
        "{}:{}:{:?}",
        path.display(),
        meta.as_ref().map(|m| m.len()).unwrap_or(0),
        meta.and_then(|m| m.modified().ok())
    )
}

/// Nearest-word readings of a descriptor tensor, one line per descriptor.
pub fn readings(clip: &ClipModel, descriptor: &Tensor) -> Result<String, TrainError> {
    let tok = ClipTokenizer::new();
    let ids = nearest_token_ids(
        clip.text.token_embedding_matrix(),
        descriptor,
        WORDS_PER_TOKEN,
    )?;
    let mut s = String::new();
    for (i, slots) in ids.iter().enumerate() {
        let words: Vec<String> = slots
            .iter()
            .map(|ids| {
                let w: Vec<String> = ids.iter().map(|&id| tok.decode_token(id)).collect();
                format!("[{}]", w.join(" "))
            })
            .collect();
        s.push_str(&format!(
            "  {:<10} #{}  {}\n",
            CLASSES[i / 5],
            i % 5,
            words.join(" ")
        ));
    }
    Ok(s)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// `--out` must not be a file the run reads (anything under the data set),
/// and an existing file there must be this run's checkpoint (`--resume`) or
/// be replaced on purpose (`--force`).
fn check_out(opts: &TrainOptions, data_root: &Path) -> Result<(), TrainError> {
    let out = &opts.out;
    if out.is_dir() {
        return Err(TrainError::Invalid(format!(
            "--out {} is a folder: give the checkpoint file to write (.safetensors)",
            out.display()
        )));
    }
    if !out.exists() {
        return Ok(());
    }
    if let (Ok(o), Ok(root)) = (out.canonicalize(), data_root.canonicalize()) {
        if o.starts_with(&root) || o == root {
            return Err(TrainError::Invalid(format!(
                "--out {} is inside the data set {} that this run reads: give a file elsewhere",
                out.display(),
                data_root.display()
            )));
        }
    }
    let ours = crate::model::weights::safetensors_metadata(out)
        .ok()
        .flatten()
        .is_some_and(|m| {
            m.get("format").map(String::as_str) == Some(crate::model::cliper::checkpoint::FORMAT)
        });
    if opts.force {
        return Ok(());
    }
    if opts.resume && ours {
        return Ok(());
    }
    Err(TrainError::Invalid(if ours {
        format!(
            "--out {} already holds a CLIPER checkpoint: continue that run with --resume, or replace it with --force",
            out.display()
        )
    } else {
        format!(
            "--out {} exists and is not a CLIPER checkpoint; cliper does not overwrite it (give a new file, or --force)",
            out.display()
        )
    }))
}

/// Runs the recipe; `log` receives one line per epoch and notices.
pub fn train(opts: &TrainOptions, log: &mut dyn FnMut(&str)) -> Result<TrainSummary, TrainError> {
    if opts.batch_size == 0 {
        return Err(TrainError::Invalid(
            "--batch-size must be at least 1".into(),
        ));
    }
    if opts.stage1_epochs == 0 && opts.stage1_only {
        return Err(TrainError::Invalid(
            "--stage1-only needs --stage1-epochs of at least 1".into(),
        ));
    }
    if opts.resume && !state_path(&opts.out).is_file() {
        return Err(TrainError::Invalid(format!(
            "cannot resume: no training state at {} (start without --resume)",
            state_path(&opts.out).display()
        )));
    }
    if !opts.stage1_only && opts.stage1_epochs > opts.epochs {
        return Err(TrainError::Invalid(format!(
            "--stage1-epochs {} is more than --epochs {} (the total): give --epochs {} or more, or --stage1-only",
            opts.stage1_epochs, opts.epochs, opts.stage1_epochs
        )));
    }
    let data = dataset::load(&opts.data, opts.layout)?;
    let wpath = weights::locate(opts.weights.as_deref())?;
    if same_file(&wpath, &opts.out) {
        return Err(TrainError::Invalid(format!(
            "--out {} is the CLIP weights file this run reads: give another file",
            opts.out.display()
        )));
    }
    check_out(opts, &data.root)?;
    if let Some(s) = data
        .train
        .iter()
        .chain(&data.test)
        .find(|s| s.label >= crate::model::cliper::expressions::NUM_CLASSES)
    {
        return Err(TrainError::Invalid(format!(
            "{}: class `{}` is not one of CLIPER's 7 ({}); `cliper train` learns CLIPER's 7 x 5 descriptors. Leave that class out of the training set (`cliper eval` scores any model's classes)",
            s.path.display(),
            crate::model::cliper::expressions::known_name(s.label),
            CLASSES.join(", ")
        )));
    }
    let c_train = Dataset::counts(&data.train);
    log(&format!(
        "data: {} train / {} test samples ({}) from {}",
        data.train.len(),
        data.test.len(),
        CLASSES
            .iter()
            .zip(c_train)
            .map(|(n, c)| format!("{n} {c}"))
            .collect::<Vec<_>>()
            .join(", "),
        data.root.display()
    ));
    let dev = device::select(&opts.device)?;
    let base = Checkpoint::load(&wpath, DType::F32)?;
    // Training runs in f32 everywhere.
    let mut clip = ClipModel::from_checkpoint(base.clone(), &dev, DType::F32)?;
    let width = clip.config.text.width;
    let total_epochs = if opts.stage1_only {
        opts.stage1_epochs
    } else {
        opts.epochs.max(opts.stage1_epochs)
    };

    let resume = if opts.resume {
        Some(load_state(&state_path(&opts.out))?)
    } else {
        None
    };
    let mut rng = SplitMix64::new(opts.seed ^ 0x5eed);
    let mut state = match resume {
        Some((s, stage)) => {
            if s.descriptor.dims() != [NUM_DESCRIPTORS, SLOTS, width] {
                return Err(TrainError::Invalid(format!(
                    "cannot resume: the saved descriptor has shape {:?}, but these weights need [35, 4, {width}] (a different CLIP?)",
                    s.descriptor.dims()
                )));
            }
            log(&format!("resuming after epoch {} (stage {stage})", s.epoch));
            // Advance the shuffling stream as if the earlier epochs ran.
            for _ in 0..s.epoch {
                rng.next_u64();
            }
            s
        }
        None => {
            let mut init = SplitMix64::new(opts.seed);
            let v: Vec<f32> = (0..NUM_DESCRIPTORS * SLOTS * width)
                .map(|_| init.normal() / 1000.0)
                .collect();
            State {
                descriptor: Tensor::from_vec(v, (NUM_DESCRIPTORS, SLOTS, width), &Device::Cpu)?,
                vision: HashMap::new(),
                temporal: HashMap::new(),
                moments: Vec::new(),
                opt_step: 0,
                epoch: 0,
                best_war: -1.0,
                best_uar: 0.0,
                best_epoch: 0,
            }
        }
    };
    if let Some(parent) = opts.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| TrainError::Invalid(format!("cannot create {}: {e}", parent.display())))?;
    }
    let cache_dir = opts.cache_dir.clone().unwrap_or_else(|| {
        opts.out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join(".cliper-cache")
    });
    let stamp = weights_stamp(&wpath);

    // Stage 2 state restores the tuned vision tower before features are computed.
    if !state.vision.is_empty() {
        let mut tuned = base.tensors.clone();
        tuned.extend(state.vision.clone());
        let vb = VarBuilder::from_tensors(tuned, DType::F32, &dev);
        clip.vision = VisionTower::new(&clip.config.vision, clip.config.embed_dim, vb)?;
    }

    if data.clips {
        return train_clips(
            opts,
            &data,
            &clip,
            state,
            &mut rng,
            &cache_dir,
            &stamp,
            total_epochs,
            log,
        );
    }
    let mut epochs_run = 0;
    // ---------------- stage 1: descriptors on cached features -------------
    if state.epoch < opts.stage1_epochs {
        let train_f = encode_split(
            &clip,
            &data.train,
            false,
            opts.skip_unreadable,
            Some(&cache_dir),
            &stamp,
            "train",
        )?;
        let test_f = encode_split(
            &clip,
            &data.test,
            false,
            opts.skip_unreadable,
            Some(&cache_dir),
            &stamp,
            "test",
        )?;
        epochs_run += descriptor_stage(
            opts,
            &clip,
            &mut state,
            &mut rng,
            (&train_f.features.to_device(&dev)?, &train_f.labels),
            (&test_f.features.to_device(&dev)?, &test_f.labels),
            total_epochs,
            "stage 1",
            log,
        )?;
    }

    // ---------------- stage 2: the vision tower ----------------------------
    if !opts.stage1_only && state.epoch < total_epochs {
        let text = descriptor_text(&clip, &state.descriptor.to_device(&dev)?)?;
        let varmap = VarMap::new();
        {
            let mut data_map = varmap
                .data()
                .lock()
                .map_err(|_| TrainError::Invalid("variable store poisoned".into()))?;
            for (name, t) in &base.tensors {
                if name.starts_with("vision_model.") || name.starts_with("visual_projection.") {
                    let t = state.vision.get(name).unwrap_or(t);
                    data_map.insert(name.clone(), Var::from_tensor(&t.to_device(&dev)?)?);
                }
            }
        }
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let tower = VisionTower::new(&clip.config.vision, clip.config.embed_dim, vb)?;
        let mut names: Vec<String> = varmap
            .data()
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        names.sort();
        let vars: Vec<Var> = {
            let m = varmap
                .data()
                .lock()
                .map_err(|_| TrainError::Invalid("variable store poisoned".into()))?;
            names.iter().filter_map(|n| m.get(n).cloned()).collect()
        };
        let mut opt = AdamW::new(vars.clone(), AdamWConfig::stage2())?;
        if state.moments.len() == vars.len()
            && opt.step == 0
            && state.opt_step > 0
            && !state.vision.is_empty()
        {
            state.resume_optimiser(&mut opt, &dev)?;
        }
        let size = clip.config.vision.image_size as u32;
        let s = size as usize;
        let aug = AugmentConfig::default();
        let n = data.train.len();
        while state.epoch < total_epochs {
            let e2 = state.epoch - opts.stage1_epochs;
            opt.set_lr(cosine_warm_restarts(AdamWConfig::stage2().lr, 0.0, 10, e2));
            let mut order: Vec<usize> = (0..n).collect();
            rng.shuffle(&mut order);
            let pb = epoch_bar(
                n.div_ceil(opts.batch_size),
                format!("epoch {}/{} stage 2", state.epoch + 1, total_epochs),
            );
            let (mut loss_sum, mut correct, mut seen) = (0f64, 0usize, 0usize);
            for batch in order.chunks(opts.batch_size) {
                let mut px = Vec::with_capacity(batch.len() * 3 * s * s);
                let mut labels = Vec::new();
                for &i in batch {
                    match load_rgb(&data.train[i].path) {
                        Ok(img) => {
                            px.extend(augment(&img, size, &aug, &mut rng));
                            labels.push(data.train[i].label);
                        }
                        Err(e) if opts.skip_unreadable => {
                            pb.suspend(|| log::warn!("skipping: {e}"))
                        }
                        Err(e) => return Err(TrainError::Unreadable(e.to_string())),
                    }
                }
                if labels.is_empty() {
                    continue;
                }
                let px = Tensor::from_vec(px, (labels.len(), 3, s, s), &dev)?;
                let f = l2_normalize(&tower.forward(&px)?)?;
                let logits = score_logits(&f, &text)?;
                let out = cliper_loss(&logits, &labels)?;
                let grads = out.loss.backward()?;
                opt.step(&grads)?;
                loss_sum += out.loss.to_scalar::<f32>()? as f64 * labels.len() as f64;
                seen += labels.len();
                correct += count_correct(&logits, &labels)?;
                pb.inc(1);
            }
            pb.finish_and_clear();
            // Evaluate with a frozen copy of the current tower.
            let tuned: HashMap<String, Tensor> = names
                .iter()
                .zip(&vars)
                .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
                .collect();
            let mut eval_map = base.tensors.clone();
            eval_map.extend(tuned.clone());
            clip.vision = VisionTower::new(
                &clip.config.vision,
                clip.config.embed_dim,
                VarBuilder::from_tensors(eval_map, DType::F32, &dev),
            )?;
            let test_f: EncodedSplit = encode_split(
                &clip,
                &data.test,
                false,
                opts.skip_unreadable,
                None,
                &stamp,
                "test",
            )?;
            let m = evaluate_features(&test_f.features.to_device(&dev)?, &test_f.labels, &text)?;
            state.vision = tuned
                .iter()
                .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
                .collect::<candle_core::Result<_>>()?;
            epochs_run += 1;
            let tally = EpochTally {
                stage: 2,
                label: "stage 2",
                total_epochs,
                loss_sum,
                correct,
                seen,
            };
            state.close_epoch(opts, &opt, &m, &tally, log)?;
        }
    }
    Ok(TrainSummary::of(&state, epochs_run))
}
