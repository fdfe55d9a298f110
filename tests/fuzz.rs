//! Deterministic, bounded mutation fuzzing of every loader on stable Rust
//! (`cargo fuzz` needs nightly). Each case must end in a value or an error:
//! a panic fails the test and names the case; a hang is caught by the
//! frame bound or the test harness. Seeds are fixed, so a failure replays.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use common::fixtures;

/// xorshift64*: the cases are the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One to four edits: bit flips, bytes set to edge values, spans deleted,
/// duplicated or zeroed, a cut. Half of them fall in the first 512 bytes,
/// where headers and lengths live.
fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        if v.is_empty() {
            v.push(0);
        }
        let head = rng.below(2) == 0;
        let at = if head {
            rng.below(v.len().min(512))
        } else {
            rng.below(v.len())
        };
        match rng.below(7) {
            0 => v[at] ^= 1 << rng.below(8),
            1 => v[at] = [0x00, 0xff, 0x7f, 0x80, 0x01, 0xfe][rng.below(6)],
            2 => {
                let n = (1 + rng.below(64)).min(v.len() - at);
                v.drain(at..at + n);
            }
            3 => {
                let n = (1 + rng.below(64)).min(v.len() - at);
                let span: Vec<u8> = v[at..at + n].to_vec();
                v.splice(at..at, span);
            }
            4 => {
                let n = (1 + rng.below(16)).min(v.len() - at);
                v[at..at + n].fill(0);
            }
            5 => v.truncate(at),
            _ => {
                // A 4-byte length or count set to an extreme.
                let n = 4.min(v.len() - at);
                let x = [u32::MAX, 0, 0x7fff_ffff, 1 << 24][rng.below(4)].to_le_bytes();
                v[at..at + n].copy_from_slice(&x[..n]);
            }
        }
    }
    v
}

/// Runs `cases` mutations of `seed_input` through `load`; any panic fails
/// with the case number.
fn fuzz(name: &str, seed: u64, cases: usize, seed_input: &[u8], mut load: impl FnMut(&[u8])) {
    let mut rng = Rng(seed);
    // The seed input itself, then every cut of its first 256 bytes.
    let mut inputs: Vec<Vec<u8>> = vec![seed_input.to_vec()];
    for cut in (0..seed_input.len().min(256)).step_by(7) {
        inputs.push(seed_input[..cut].to_vec());
    }
    for (k, input) in inputs.into_iter().enumerate() {
        if catch_unwind(AssertUnwindSafe(|| load(&input))).is_err() {
            panic!("{name}: cut case {k} panicked");
        }
    }
    for case in 0..cases {
        let input = mutate(&mut rng, seed_input);
        if catch_unwind(AssertUnwindSafe(|| load(&input))).is_err() {
            panic!("{name}: case {case} (seed {seed:#x}) panicked");
        }
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn safetensors_weights_and_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let ck = std::fs::read(fixtures().join("clip_c_hf16/descriptors.safetensors")).unwrap();
    fuzz("descriptors.safetensors", 1, 3000, &ck, |b| {
        let p = write(dir.path(), "d.safetensors", b);
        let _ = cliper::model::cliper::CliperCheckpoint::load(&p);
    });
    // The model file is 1.7 MB: mutate its header region only, fewer times.
    let model = std::fs::read(fixtures().join("clip_c_hf16/model.safetensors")).unwrap();
    std::fs::copy(
        fixtures().join("clip_c_hf16/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    fuzz("model.safetensors", 2, 300, &model, |b| {
        let p = write(dir.path(), "model.safetensors", b);
        let _ = cliper::model::Checkpoint::load(&p, candle_core::DType::F32);
    });
}

/// Rebuilds a torch zip around a (mutated) pickle, with right CRCs, so that
/// the pickle reader itself is what gets the bad bytes.
fn torch_zip(pickle: &[u8], tensors: &[(String, Vec<u8>)]) -> Vec<u8> {
    use std::io::Write;
    let mut out = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut out);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        z.start_file("archive/data.pkl", opts).unwrap();
        z.write_all(pickle).unwrap();
        for (name, data) in tensors {
            z.start_file(name.as_str(), opts).unwrap();
            z.write_all(data).unwrap();
        }
        z.finish().unwrap();
    }
    out.into_inner()
}

#[test]
fn pytorch_pickles() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    for (file, seed) in [
        ("descriptors_torch.pth", 3u64),
        ("dfer_clip_temporal.pth", 4),
    ] {
        let f = std::fs::File::open(fixtures().join("clip_c_hf16").join(file)).unwrap();
        let mut z = zip::ZipArchive::new(f).unwrap();
        let mut pickle = Vec::new();
        let mut tensors = Vec::new();
        for i in 0..z.len() {
            let mut e = z.by_index(i).unwrap();
            let name = e.name().unwrap().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            // Entries are `<archive name>/...`: rename the folder to `archive/`.
            let rest = name.split_once('/').map_or(name.as_str(), |(_, r)| r);
            if rest == "data.pkl" {
                pickle = data;
            } else {
                tensors.push((format!("archive/{rest}"), data));
            }
        }
        assert!(!pickle.is_empty(), "{file}");
        fuzz(file, seed, 2000, &pickle, |b| {
            let p = write(dir.path(), "x.pth", &torch_zip(b, &tensors));
            let _ = cliper::model::weights::read_tensors(&p, candle_core::DType::F32);
        });
        // And the zip container itself.
        let raw = std::fs::read(fixtures().join("clip_c_hf16").join(file)).unwrap();
        fuzz(&format!("{file} (zip)"), seed + 10, 1000, &raw, |b| {
            let p = write(dir.path(), "y.pth", b);
            let _ = cliper::model::weights::read_tensors(&p, candle_core::DType::F32);
        });
    }
}

#[test]
fn video_decoder() {
    use cliper::vision::video::VideoReader;
    let dir = tempfile::tempdir().unwrap();
    let files = [
        ("h264_long_gop.mp4", 5u64),
        ("vp9.webm", 6),
        ("mjpeg.avi", 7),
        ("hevc.mov", 8),
        ("av1.mkv", 9),
    ];
    for (name, seed) in files {
        let bytes = std::fs::read(fixtures().join("video").join(name)).unwrap();
        let ext = name.rsplit('.').next().unwrap();
        fuzz(name, seed, 400, &bytes, |b| {
            let p = write(dir.path(), &format!("v.{ext}"), b);
            if let Ok(mut r) = VideoReader::open(&p) {
                let _ = r.info();
                // Bounded: a reader that loops on a broken file is a hang.
                for _ in 0..2_000 {
                    match r.next_frame() {
                        Ok(Some(_)) => {}
                        _ => break,
                    }
                }
                let _ = r.seek(0.5);
                let _ = r.next_frame();
            }
        });
    }
}

#[test]
fn session_files_prompts_and_manifests() {
    use cliper::session::record::parse_csv_row;
    let dir = tempfile::tempdir().unwrap();
    // A real recorded session to mutate.
    let frames = dir.path().join("frames");
    std::fs::create_dir_all(&frames).unwrap();
    let portrait = common::astronaut();
    for i in 0..3 {
        common::two_faces(&portrait, i)
            .save(frames.join(format!("f{i}.png")))
            .unwrap();
    }
    let rec = dir.path().join("rec");
    let w = common::weights();
    let (code, _o, err) = common::cliper(&[
        "run",
        "--weights",
        &w,
        "--source",
        frames.to_str().unwrap(),
        "--record",
        rec.to_str().unwrap(),
        "--top",
        "3",
    ]);
    assert_eq!(code, 0, "{err}");
    let jsonl = std::fs::read(rec.join("session.jsonl")).unwrap();
    let csv = std::fs::read(rec.join("session.csv")).unwrap();
    let meta = std::fs::read(rec.join("meta.json")).unwrap();
    let target = dir.path().join("target");
    std::fs::create_dir_all(&target).unwrap();
    let reset = || {
        for (f, b) in [
            ("session.jsonl", &jsonl),
            ("session.csv", &csv),
            ("meta.json", &meta),
        ] {
            std::fs::write(target.join(f), b).unwrap();
        }
    };
    for (file, seed, bytes) in [("session.jsonl", 11u64, &jsonl), ("meta.json", 12, &meta)] {
        fuzz(file, seed, 1500, bytes, |b| {
            reset();
            std::fs::write(target.join(file), b).unwrap();
            if let Ok(s) = cliper::session::Session::open(&target) {
                let _ = cliper::session::report::summarize(&s);
                for id in s.face_ids() {
                    let _ = s.timeline(id);
                }
            }
            let _ = cliper::session::SessionMeta::read(&target);
        });
    }
    fuzz("session.csv", 13, 3000, &csv, |b| {
        for line in String::from_utf8_lossy(b).lines() {
            let _ = parse_csv_row(line, 7);
        }
    });
    let prompts = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/zero_shot_descriptors.txt"),
    )
    .unwrap();
    fuzz("prompts", 14, 3000, &prompts, |b| {
        let _ = cliper::model::cliper::bank::parse_prompts(&String::from_utf8_lossy(b), "fuzz");
    });
    let manifest = b"path,label,split\na.png,happiness,train\nb.png,3,test\n# note\n";
    std::fs::write(dir.path().join("a.png"), b"x").unwrap();
    std::fs::write(dir.path().join("b.png"), b"x").unwrap();
    fuzz("manifest.csv", 15, 2000, manifest, |b| {
        let p = write(dir.path(), "manifest.csv", b);
        let _ = cliper::train::dataset::load(&p, cliper::train::dataset::Layout::Csv);
    });
    let worklist = b"clips/a.mp4\n# c\n/abs/b.png\n";
    fuzz("batch manifest", 16, 2000, worklist, |b| {
        let p = write(dir.path(), "list.txt", b);
        let _ = cliper::batch::manifest_work_list(&p);
    });
}
