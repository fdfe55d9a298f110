//! Hostile files, flags and signals: each ends in a clear error or a
//! finished recording, never a panic, an abort or a hang.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{astronaut_path, cliper, fixtures, torch_zip, weights};

/// Waits for `child` up to `limit`; kills it and fails the test on a hang.
fn wait_or_kill(mut child: Child, limit: Duration, what: &str) -> (i32, String) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            return (status.code().unwrap_or(-1), err);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("{what}: still running after {limit:?} (a hang)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cliper"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn pickle_bombs_and_foreign_objects_are_refused_not_run() {
    let dir = tempfile::tempdir().unwrap();
    // 10^6 nested lists (2 MB): overflowed the stack before.
    let mut deep = vec![0x80, 2];
    deep.extend(std::iter::repeat_n(b']', 1_000_000));
    deep.extend(std::iter::repeat_n(b'a', 999_999));
    deep.push(b'.');
    // A list that is copied out of the memo and appended to itself.
    let mut bomb = vec![0x80, 2, b']', b'q', 0];
    for _ in 0..40 {
        bomb.extend(b"h\x00h\x00aq\x00");
    }
    bomb.push(b'.');
    let mut system = vec![0x80, 2];
    system.extend(b"cos\nsystem\nX\x05\x00\x00\x00touchq\x00\x85R.");
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("deep.pt", deep, "nest deeper"),
        ("bomb.pt", bomb, "pickle bomb"),
        ("system.pth", system, "`os.system`"),
    ];
    let img = astronaut_path();
    let w = weights();
    for (name, pickle, needle) in cases {
        let path = dir.path().join(name);
        torch_zip(&path, &pickle);
        let p = path.to_str().unwrap();
        for args in [
            vec!["weights", "info", "--weights", p],
            vec![
                "classify",
                "--weights",
                &w,
                "--descriptors",
                p,
                img.to_str().unwrap(),
            ],
        ] {
            let (code, err) = wait_or_kill(spawn(&args), Duration::from_secs(60), name);
            assert_ne!(code, 0, "{args:?}");
            assert!(
                !err.contains("panicked") && !err.contains("overflow"),
                "{err}"
            );
            assert!(
                err.contains("not a plain PyTorch state dict") && err.contains(needle),
                "{name} {args:?}: {err}"
            );
            assert!(err.contains(name), "{err}");
        }
    }
}

/// The tiny fixture's tensors, and its config, written into `dir`.
fn fixture_copy(
    dir: &Path,
) -> (
    PathBuf,
    std::collections::HashMap<String, candle_core::Tensor>,
) {
    let src = fixtures().join("clip_c_hf16");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let t =
        candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    (dir.join("model.safetensors"), t)
}

#[test]
fn non_finite_and_integer_weights_are_errors_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let (path, mut t) = fixture_copy(dir.path());
    let name = "vision_model.post_layernorm.weight";
    let shape = t[name].dims().to_vec();
    let mut v = vec![1f32; shape.iter().product()];
    v[3] = f32::NAN;
    v[5] = f32::INFINITY;
    t.insert(
        name.into(),
        candle_core::Tensor::from_vec(v, shape.as_slice(), &candle_core::Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, &path).unwrap();
    let img = astronaut_path();
    let (code, _o, err) = cliper(&[
        "classify",
        "--weights",
        path.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains(name) && err.contains("1 NaN and 1 infinite"),
        "{err}"
    );

    let (path, mut t) = fixture_copy(dir.path());
    let name = "text_projection.weight";
    let ints = t[name].to_dtype(candle_core::DType::I64).unwrap();
    t.insert(name.into(), ints);
    candle_core::safetensors::save(&t, &path).unwrap();
    let (code, _o, err) = cliper(&[
        "classify",
        "--weights",
        path.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains(name) && err.contains("not floating point"),
        "{err}"
    );
}

fn jsonl_lines(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("session.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn ffprobe_frames(path: &Path) -> Option<usize> {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-select_streams", "v:0"])
        .args(["-show_entries", "stream=nb_read_frames", "-of", "csv=p=0"])
        .arg(path)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

#[test]
fn sigint_and_sigterm_finish_a_recording_like_stop() {
    for (sig, code) in [("-INT", 130), ("-TERM", 143)] {
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join("session");
        let w = weights();
        let child = spawn(&[
            "run",
            "--source",
            "demo",
            "--weights",
            &w,
            "--record",
            rec.to_str().unwrap(),
        ]);
        let start = Instant::now();
        while jsonl_lines(&rec) < 8 {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no frames recorded"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let pid = child.id().to_string();
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
        let (status, err) = wait_or_kill(child, Duration::from_secs(60), sig);
        assert_eq!(status, code, "{sig}: {err}");
        assert!(err.contains("stopped by SIG"), "{err}");
        let meta = common::read_json(&rec.join("meta.json"));
        assert_eq!(meta["status"], "complete", "{sig}: {meta}");
        let lines = jsonl_lines(&rec);
        assert_eq!(meta["counts"]["frames"], lines as u64);
        if let Some(n) = ffprobe_frames(&rec.join("video.mp4")) {
            assert_eq!(n, lines, "{sig}: video frames vs JSONL lines");
        }
    }
}

#[test]
fn flags_out_of_range_name_the_range_and_missing_ones_are_named() {
    let w = weights();
    let img = astronaut_path();
    let i = img.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["run", "--source", i, "--top", "-1"],
            "-1 is out of range: give 1 to 1000",
        ),
        (
            vec!["run", "--source", i, "--window", "17"],
            "17 is out of range: give 1 to 16",
        ),
        (
            vec!["run", "--source", i, "--stride", "0"],
            "0 is out of range",
        ),
        (
            vec!["run", "--source", i, "--margin", "-1"],
            "--margin -1 is out of range",
        ),
        (
            vec!["run", "--source", i, "--fps", "1e-30"],
            "--fps 1e-30 is out of range",
        ),
        (
            vec!["run", "--source", i, "--fps", "-5"],
            "--fps -5 is out of range",
        ),
        (
            vec!["bench", "--threads", "100000"],
            "100000 is out of range: give 1 to 1024",
        ),
        (
            vec!["live", "--grid", "-3"],
            "-3 is out of range: give 1 to 32",
        ),
        (
            vec!["classify"],
            "required arguments were not provided: <IMAGES>",
        ),
        (vec!["report"], "not provided: <DIR>"),
        (
            vec!["run", "--source", "demo", "--record-raw"],
            "not provided: --record <DIR>",
        ),
        (
            vec!["train", "--layout", "rafdb", "--out", "x"],
            "not provided: --data <DATA>",
        ),
        (
            vec![
                "train", "--data", "x", "--layout", "rafdb", "--out", "y", "--epochs", "0",
            ],
            "0 is out of range",
        ),
    ] {
        let mut a = args.clone();
        if a[0] == "run" {
            a.extend(["--weights", &w]);
        }
        common::assert_clean_error(&a, needle);
    }
}

#[test]
fn train_never_overwrites_what_it_reads_or_a_foreign_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for (split, class) in [("train", "happiness"), ("test", "sadness")] {
        let d = data.join(split).join(class);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(astronaut_path(), d.join("a.png")).unwrap();
    }
    let (wpath, _) = fixture_copy(dir.path());
    std::fs::copy(fixtures().join("clip_c_hf16/model.safetensors"), &wpath).unwrap();
    let before = std::fs::read(&wpath).unwrap();
    let w = wpath.to_str().unwrap();
    let d = data.to_str().unwrap();
    let base = [
        "train",
        "--weights",
        w,
        "--data",
        d,
        "--layout",
        "folder",
        "--stage1-only",
        "--stage1-epochs",
        "1",
    ];
    let mut a = base.to_vec();
    a.extend(["--out", w]);
    common::assert_fails_naming(&a, "is the CLIP weights file this run reads");
    assert_eq!(std::fs::read(&wpath).unwrap(), before);
    let inside = data.join("train/happiness/a.png");
    let mut a = base.to_vec();
    a.extend(["--out", inside.to_str().unwrap()]);
    common::assert_fails_naming(&a, "inside the data set");
    let notes = dir.path().join("notes.safetensors");
    std::fs::write(&notes, b"my notes").unwrap();
    let mut a = base.to_vec();
    a.extend(["--out", notes.to_str().unwrap()]);
    common::assert_fails_naming(
        &a,
        "is not a CLIPER checkpoint; cliper does not overwrite it",
    );
    assert_eq!(std::fs::read(&notes).unwrap(), b"my notes");
    let out = dir.path().join("new.safetensors");
    let (code, _o, err) = cliper(&[
        "train",
        "--weights",
        w,
        "--data",
        d,
        "--layout",
        "folder",
        "--stage1-epochs",
        "5",
        "--epochs",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("--stage1-epochs 5 is more than --epochs 1"),
        "{err}"
    );
}

#[test]
fn huge_and_bom_prompt_files_load() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("\u{feff}# written on Windows\n");
    for c in cliper::model::cliper::expressions::CLASSES {
        text.push_str(&format!("[{c}]\n"));
        for k in 0..4 {
            text.push_str(&format!("a photo of a {c} face, take {k}\n"));
        }
        // A prompt of 2 * 10^6 characters without a space (quadratic BPE
        // took over a minute; the tokenizer now cuts words long before BPE).
        text.push_str(&"x".repeat(2_000_000));
        text.push('\n');
    }
    let p = dir.path().join("prompts.txt");
    std::fs::write(&p, text).unwrap();
    let w = weights();
    let img = astronaut_path();
    let child = spawn(&[
        "classify",
        "--weights",
        &w,
        "--prompts",
        p.to_str().unwrap(),
        "--json",
        img.to_str().unwrap(),
    ]);
    let (code, err) = wait_or_kill(child, Duration::from_secs(120), "huge prompt");
    assert_eq!(code, 0, "{err}");
}

/// `cliper run` on the demo source at `precision` with `envs` set: it must
/// fail; returns its standard error, which must not blame the weights file
/// (kernel overrides are checked before the model loads).
fn refused_override(precision: &str, envs: &[(&str, &str)]) -> String {
    let w = weights();
    let out = Command::new(env!("CARGO_BIN_EXE_cliper"))
        .args(["run", "--source", "demo", "--frames", "1", "--weights", &w])
        .args(["--device", "cpu", "--precision", precision])
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{envs:?} ran: {err}");
    assert!(!err.contains(&w), "blames the weights file: {err}");
    err
}

/// A kernel override that names no kernel is said before the model loads,
/// and not as a fault of the weights file.
#[test]
fn an_unknown_kernel_override_is_named() {
    let err = refused_override("f32", &[("CLIPER_F32", "fast")]);
    assert!(
        err.contains("CLIPER_F32=\"fast\" is not a kernel: use gemm, onednn or packed"),
        "{err}"
    );
    let err = refused_override("q8", &[("CLIPER_Q8", "amx")]);
    assert!(
        err.contains("CLIPER_Q8=\"amx\" is not an 8-bit kernel: use own or onednn"),
        "{err}"
    );
    let err = refused_override("q8", &[("CLIPER_ATTENTION", "int4")]);
    assert!(
        err.contains("CLIPER_ATTENTION=\"int4\" is not an attention kernel: use f32 or bf16"),
        "{err}"
    );
}

/// Our kernels on a named instruction set and oneDNN's forced together.
#[test]
fn conflicting_kernel_overrides_are_named() {
    let err = refused_override("q8", &[("CLIPER_ISA", "avx2"), ("CLIPER_Q8", "onednn")]);
    assert!(
        err.contains("CLIPER_Q8=onednn runs oneDNN's int8 products")
            || err.contains("cannot run the avx2 path"),
        "{err}"
    );
}

#[test]
fn messages_name_the_real_cause() {
    let dir = tempfile::tempdir().unwrap();
    let w = weights();
    // eval needs only a test split (a BOM in front of the header, too).
    std::fs::copy(astronaut_path(), dir.path().join("a.png")).unwrap();
    let m = dir.path().join("manifest.csv");
    std::fs::write(&m, "\u{feff}path,label,split\na.png,happiness,test\n").unwrap();
    let (code, _o, err) = cliper(&[
        "eval",
        "--weights",
        &w,
        "--data",
        m.to_str().unwrap(),
        "--layout",
        "csv",
    ]);
    assert_eq!(code, 0, "{err}");
    // A 1 MB bad line is quoted short.
    let long = format!("path,label,split\n{}\n", "x".repeat(1 << 20));
    std::fs::write(&m, long).unwrap();
    let (code, _o, err) = cliper(&[
        "eval",
        "--weights",
        &w,
        "--data",
        m.to_str().unwrap(),
        "--layout",
        "csv",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.len() < 1000 && err.contains("bytes in all"),
        "{} bytes: {}",
        err.len(),
        &err[..err.len().min(300)]
    );
    // A token embedding of the wrong width is the tensor named.
    let (path, mut t) = fixture_copy(dir.path());
    let name = "text_model.embeddings.token_embedding.weight";
    let dims = t[name].dims().to_vec();
    t.insert(
        name.into(),
        candle_core::Tensor::zeros(
            (dims[0], dims[1] + 8),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap(),
    );
    candle_core::safetensors::save(&t, &path).unwrap();
    let (code, _o, err) = cliper(&["weights", "info", "--weights", path.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains(name), "{err}");
}

#[test]
fn run_on_a_file_finds_small_faces_that_live_settings_miss() {
    // A group photo: 8 portraits of 300 px (faces of about 57 px) in a
    // 1280x720 frame.
    let face = image::imageops::resize(
        &common::astronaut(),
        300,
        300,
        image::imageops::FilterType::Triangle,
    );
    let mut group = image::RgbImage::from_pixel(1280, 720, image::Rgb([40, 40, 50]));
    for k in 0..8 {
        let (x, y) = (20 + (k % 4) * 315, 40 + (k / 4) * 330);
        image::imageops::overlay(&mut group, &face, x as i64, y as i64);
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("group.png");
    group.save(&p).unwrap();
    let w = weights();
    let faces = |extra: &[&str]| -> usize {
        let mut a = vec![
            "run",
            "--weights",
            &w,
            "--source",
            p.to_str().unwrap(),
            "--json",
        ];
        a.extend_from_slice(extra);
        let (code, out, err) = cliper(&a);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        v["faces"].as_array().unwrap().len()
    };
    // SeetaFace's 40 px window: live settings shrink the faces below it.
    let file = faces(&["--detector", "seeta"]);
    let live = faces(&[
        "--detector",
        "seeta",
        "--min-face",
        "64",
        "--detect-size",
        "480",
    ]);
    assert!(file >= 7, "{file} of 8 faces found");
    assert!(live < file, "live settings {live}, file settings {file}");
    // CenterFace sees faces from 20 px at its resolution: all 8 either way.
    assert_eq!(faces(&[]), 8);
    assert_eq!(faces(&["--min-face", "64", "--detect-size", "480"]), 8);
}

#[test]
fn a_damaged_training_state_says_to_start_again() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for (split, class) in [("train", "happiness"), ("test", "sadness")] {
        let d = data.join(split).join(class);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(astronaut_path(), d.join("a.png")).unwrap();
    }
    let out = dir.path().join("model.safetensors");
    let w = weights();
    let args = [
        "train",
        "--weights",
        &w,
        "--data",
        data.to_str().unwrap(),
        "--layout",
        "folder",
        "--stage1-only",
        "--stage1-epochs",
        "1",
        "--batch-size",
        "2",
        "--out",
        out.to_str().unwrap(),
    ];
    let (code, _o, err) = cliper(&args);
    assert_eq!(code, 0, "{err}");
    // The state file sits next to the checkpoint; cut it in half.
    let state = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("state"))
        .expect("a training state file");
    let bytes = std::fs::read(&state).unwrap();
    std::fs::write(&state, &bytes[..bytes.len() / 2]).unwrap();
    let mut resume = args.to_vec();
    resume.push("--resume");
    let (code, _o, err) = cliper(&resume);
    assert_ne!(code, 0);
    assert!(
        err.contains("training state") && err.contains("start again without --resume"),
        "{err}"
    );
    assert!(!err.contains("download it again"), "{err}");
}
