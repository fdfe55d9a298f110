//! `cliper batch`: a folder or manifest of videos and images as shards of an
//! array job, resumable, merged into Parquet; and a real Slurm array.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{astronaut, astronaut_path, cliper, two_faces, weights};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;

/// Encodes `n` two-face frames as H.264 MP4 (cliper's own writer).
fn write_video(path: &Path, n: u32, fps: f64) {
    let portrait = astronaut();
    let first = two_faces(&portrait, 0);
    let mut w = cliper::vision::video::VideoWriter::create(path, first.dimensions(), fps).unwrap();
    for i in 0..n {
        w.push(&two_faces(&portrait, i), f64::from(i) / fps)
            .unwrap();
    }
    w.finish().unwrap();
}

/// An archive: two videos (one nested), a photo, an unreadable "video",
/// and a text file that is not an input.
fn archive(dir: &Path, frames: u32) {
    std::fs::create_dir_all(dir.join("day2")).unwrap();
    write_video(&dir.join("a.mp4"), frames, 10.0);
    write_video(&dir.join("day2/b.mp4"), frames + 2, 10.0);
    std::fs::copy(astronaut_path(), dir.join("photo.png")).unwrap();
    std::fs::write(dir.join("day2/broken.mp4"), b"not a video at all").unwrap();
    std::fs::write(dir.join("notes.txt"), b"ignored").unwrap();
}

fn batch(args: &[&str]) -> (i32, String) {
    let w = weights();
    let mut all = vec!["batch", "--weights", &w];
    all.extend_from_slice(args);
    let (code, _out, err) = cliper(&all);
    assert!(!err.contains("panicked"), "{err}");
    (code, err)
}

fn status_lines(out: &Path) -> Vec<serde_json::Value> {
    let mut lines = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(out.join("_status"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        for l in std::fs::read_to_string(&f).unwrap().lines() {
            lines.push(serde_json::from_str(l).unwrap());
        }
    }
    lines
}

/// (column names, rows) of a Parquet file.
fn read_table(path: &Path) -> (Vec<String>, Vec<Vec<Field>>) {
    let reader = SerializedFileReader::new(std::fs::File::open(path).unwrap()).unwrap();
    let names = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    let rows = reader
        .get_row_iter(None)
        .unwrap()
        .map(|r| {
            r.unwrap()
                .get_column_iter()
                .map(|(_, f)| f.clone())
                .collect()
        })
        .collect();
    (names, rows)
}

fn text(f: &Field) -> &str {
    match f {
        Field::Str(s) => s,
        other => panic!("not a string: {other:?}"),
    }
}

/// Rows of faces.parquet without the wall clock, floats as f64.
fn comparable(rows: &[Vec<Field>], names: &[String]) -> Vec<Vec<Field>> {
    let wall = names.iter().position(|n| n == "wall").unwrap();
    rows.iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .filter(|(i, _)| *i != wall)
                .map(|(_, f)| f.clone())
                .collect()
        })
        .collect()
}

fn assert_rows_close(a: &[Vec<Field>], b: &[Vec<Field>]) {
    assert_eq!(a.len(), b.len(), "row counts");
    for (k, (ra, rb)) in a.iter().zip(b).enumerate() {
        for (fa, fb) in ra.iter().zip(rb) {
            match (fa, fb) {
                (Field::Float(x), Field::Float(y)) => {
                    assert!((x - y).abs() <= 1e-5, "row {k}: {x} vs {y}")
                }
                (Field::Double(x), Field::Double(y)) => {
                    assert!((x - y).abs() <= 1e-9, "row {k}: {x} vs {y}")
                }
                _ => assert_eq!(fa, fb, "row {k}"),
            }
        }
    }
}

fn id_of(out: &Path, key: &str) -> String {
    let list = cliper::batch::read_work_list(out).unwrap();
    list.into_iter().find(|i| i.key == key).unwrap().id
}

#[test]
fn a_folder_becomes_sessions_a_rerun_skips_them_and_merge_writes_parquet() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("archive");
    archive(&input, 6);
    let out = tmp.path().join("out");
    let out_s = out.to_str().unwrap();
    let (code, err) = batch(&["--input", input.to_str().unwrap(), "--out", out_s]);
    // The unreadable file makes the task fail, after all the others are done.
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("[3/4] day2/broken.mp4: failed: cannot open"),
        "{err}"
    );
    assert!(
        err.contains("3 complete") && err.contains("1 failed"),
        "{err}"
    );
    assert!(err.contains("a.mp4: complete, 6 frames, 12 faces"), "{err}");

    // The work list: sorted relative paths, text file left out.
    let list = cliper::batch::read_work_list(&out).unwrap();
    let keys: Vec<&str> = list.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(
        keys,
        ["a.mp4", "day2/b.mp4", "day2/broken.mp4", "photo.png"]
    );

    // Each readable input is a session folder under its id, with batch.json.
    let a = out.join(id_of(&out, "a.mp4"));
    let result = common::read_json(&a.join("batch.json"));
    assert_eq!(result["outcome"], "complete");
    assert_eq!(
        (result["frames"].as_u64(), result["faces"].as_u64()),
        (Some(6), Some(12))
    );
    assert_eq!(result["tracks"], 2);
    let meta = common::read_json(&a.join("meta.json"));
    assert_eq!(meta["status"], "complete");
    assert_eq!(meta["counts"]["face_rows"], 12);
    assert!(
        !a.join("video.mp4").exists(),
        "video only with --record-video"
    );
    assert!(!out.join(id_of(&out, "day2/broken.mp4")).exists());
    let photo = common::read_json(&out.join(id_of(&out, "photo.png")).join("batch.json"));
    assert_eq!(
        (photo["frames"].as_u64(), photo["faces"].as_u64()),
        (Some(1), Some(1))
    );

    // The session's scores are `cliper run`'s on the same file.
    let w = weights();
    let a_path = input.join("a.mp4");
    let (code, run_out, err) = cliper(&[
        "run",
        "--weights",
        &w,
        "--source",
        a_path.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let recorded: Vec<serde_json::Value> = std::fs::read_to_string(a.join("session.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let printed: Vec<serde_json::Value> = run_out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recorded.len(), printed.len());
    for (r, p) in recorded.iter().zip(&printed) {
        for (rf, pf) in r["faces"]
            .as_array()
            .unwrap()
            .iter()
            .zip(p["faces"].as_array().unwrap())
        {
            assert_eq!(rf["box"], pf["box"]);
            for (rc, pc) in rf["classes"]
                .as_array()
                .unwrap()
                .iter()
                .zip(pf["classes"].as_array().unwrap())
            {
                assert_eq!(rc["name"], pc["name"]);
                let d = (rc["prob"].as_f64().unwrap() - pc["prob"].as_f64().unwrap()).abs();
                assert!(d < 1e-6, "{rc} vs {pc}");
            }
        }
    }

    // Status: one line per input, the failure with its error.
    let lines = status_lines(&out);
    assert_eq!(lines.len(), 4);
    let broken = lines
        .iter()
        .find(|l| l["input"] == "day2/broken.mp4")
        .unwrap();
    assert_eq!(broken["outcome"], "failed");
    assert!(
        broken["error"].as_str().unwrap().contains("broken.mp4"),
        "{broken}"
    );

    // A rerun skips the finished inputs (their files untouched) and retries
    // the failed one.
    let before = std::fs::read(a.join("session.jsonl")).unwrap();
    let before_t = std::fs::metadata(a.join("batch.json"))
        .unwrap()
        .modified()
        .unwrap();
    let (code, err) = batch(&["--input", input.to_str().unwrap(), "--out", out_s]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("3 skipped") && err.contains("1 failed"),
        "{err}"
    );
    assert_eq!(std::fs::read(a.join("session.jsonl")).unwrap(), before);
    assert_eq!(
        std::fs::metadata(a.join("batch.json"))
            .unwrap()
            .modified()
            .unwrap(),
        before_t
    );
    let lines = status_lines(&out);
    assert_eq!(
        lines.iter().filter(|l| l["outcome"] == "skipped").count(),
        3
    );

    // Merge: faces.parquet holds session.csv's rows, with the input first.
    let (code, _o, err) = cliper(&["batch", "merge", out_s]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("merged 4 inputs: 3 complete, 0 partial, 1 failed, 0 pending; 29 face rows"),
        "{err}"
    );
    let (names, rows) = read_table(&out.join("faces.parquet"));
    let mut want = vec!["input".to_string(), "input_id".to_string()];
    want.extend(cliper::session::record::csv_columns(
        &cliper::model::cliper::expressions::CLASSES,
    ));
    assert_eq!(names, want);
    assert_eq!(rows.len(), 12 + 16 + 1);
    let csv = std::fs::read_to_string(a.join("session.csv")).unwrap();
    let csv_rows: Vec<_> = csv
        .lines()
        .skip(1)
        .map(|l| cliper::session::record::parse_csv_row(l, 7).unwrap())
        .collect();
    let a_rows: Vec<&Vec<Field>> = rows.iter().filter(|r| text(&r[0]) == "a.mp4").collect();
    assert_eq!(a_rows.len(), csv_rows.len());
    let col = |n: &str| names.iter().position(|c| c == n).unwrap();
    for (r, c) in a_rows.iter().zip(&csv_rows) {
        assert_eq!(text(&r[1]), id_of(&out, "a.mp4"));
        assert_eq!(r[col("frame")], Field::Long(c.frame as i64));
        assert_eq!(r[col("face_id")], Field::Long(c.face_id as i64));
        assert_eq!(r[col("x")], Field::Int(c.bbox[0] as i32));
        assert_eq!(r[col("h")], Field::Int(c.bbox[3] as i32));
        assert_eq!(text(&r[col("predicted")]), c.predicted);
        assert_eq!(r[col("happiness")], Field::Float(c.probs[3]));
        assert_eq!(r[col("score_neutral")], Field::Float(c.scores[6]));
        assert_eq!(r[col("dynamic_anger")], Field::Null);
        assert_eq!(text(&r[col("wall")]), c.wall);
        match r[col("t")] {
            Field::Double(t) => assert!((t - c.t).abs() < 1e-6),
            ref other => panic!("{other:?}"),
        }
    }
    // The inputs table: outcomes, counts, shares that sum to 1, the error.
    let (inames, inputs) = read_table(&out.join("inputs.parquet"));
    let icol = |n: &str| inames.iter().position(|c| c == n).unwrap();
    assert_eq!(inputs.len(), 4);
    let by_key: HashMap<&str, &Vec<Field>> = inputs.iter().map(|r| (text(&r[0]), r)).collect();
    assert_eq!(text(&by_key["a.mp4"][icol("outcome")]), "complete");
    assert_eq!(by_key["a.mp4"][icol("faces")], Field::Long(12));
    assert_eq!(by_key["day2/b.mp4"][icol("frames")], Field::Long(8));
    let shares: f32 = cliper::model::cliper::expressions::CLASSES
        .iter()
        .map(|c| match by_key["a.mp4"][icol(&format!("share_{c}"))] {
            Field::Float(x) => x,
            ref other => panic!("{other:?}"),
        })
        .sum();
    assert!((shares - 1.0).abs() < 1e-5, "{shares}");
    let bad = by_key["day2/broken.mp4"];
    assert_eq!(text(&bad[icol("outcome")]), "failed");
    assert!(text(&bad[icol("error")]).contains("broken.mp4"));
    assert_eq!(bad[icol("share_happiness")], Field::Null);

    // Merging again writes the same bytes.
    let first = std::fs::read(out.join("faces.parquet")).unwrap();
    let first_inputs = std::fs::read(out.join("inputs.parquet")).unwrap();
    let (code, _o, err) = cliper(&["batch", "merge", out_s]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(out.join("faces.parquet")).unwrap(), first);
    assert_eq!(
        std::fs::read(out.join("inputs.parquet")).unwrap(),
        first_inputs
    );
}

#[test]
fn shards_together_equal_one_task_and_killed_work_is_redone() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("archive");
    archive(&input, 4);
    let manifest = tmp.path().join("list.txt");
    std::fs::write(
        &manifest,
        "# the archive\narchive/a.mp4\narchive/day2/b.mp4\narchive/photo.png\narchive/day2/broken.mp4\n",
    )
    .unwrap();
    let m = manifest.to_str().unwrap();
    let one = tmp.path().join("one");
    let (code, err) = batch(&["--manifest", m, "--out", one.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    let sharded = tmp.path().join("sharded");
    let s = sharded.to_str().unwrap();
    for (k, shard) in ["0/3", "1/3", "2/3"].iter().enumerate() {
        let (code, err) = batch(&["--manifest", m, "--out", s, "--shard", shard]);
        // Task 0 gets inputs 0 and 3 (a.mp4, broken.mp4): only it fails.
        assert_eq!(code, i32::from(k == 0), "{shard}: {err}");
        assert!(err.contains(&format!("task {shard}: ")), "{err}");
    }
    // Slurm's variables pick the shard (an array counted from 1 here).
    let w = weights();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cliper"))
        .args(["batch", "--weights", &w, "--manifest", m, "--out", s])
        .env("SLURM_ARRAY_TASK_ID", "2")
        .env("SLURM_ARRAY_TASK_MIN", "1")
        .env("SLURM_ARRAY_TASK_COUNT", "3")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("task 1/3: 1 of 4 inputs") && err.contains("skipped"),
        "{err}"
    );
    for dir in [&one, &sharded] {
        let (code, _o, err) = cliper(&["batch", "merge", dir.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
    }
    let (names, a) = read_table(&one.join("faces.parquet"));
    let (_, b) = read_table(&sharded.join("faces.parquet"));
    assert_eq!(a.len(), 8 + 12 + 1);
    assert_rows_close(&comparable(&a, &names), &comparable(&b, &names));
    // Manifest keys are the lines as written.
    assert_eq!(text(&a[0][0]), "archive/a.mp4");

    // Another work list into the same folder is refused.
    let (code, err) = batch(&["--input", input.to_str().unwrap(), "--out", s]);
    assert_eq!(code, 1);
    assert!(
        err.contains("holds the results of another work list"),
        "{err}"
    );

    // A task killed mid-input leaves only a .tmp folder: the rerun removes
    // it and does the input again; --force redoes a finished one.
    let b_id = id_of(&sharded, "archive/day2/b.mp4");
    let done = sharded.join(&b_id);
    std::fs::rename(&done, sharded.join(format!("{b_id}.tmp"))).unwrap();
    std::fs::remove_file(sharded.join(format!("{b_id}.tmp/batch.json"))).unwrap();
    let (code, err) = batch(&["--manifest", m, "--out", s, "--shard", "1/3"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("archive/day2/b.mp4: complete, 6 frames"),
        "{err}"
    );
    assert!(done.join("batch.json").is_file());
    assert!(!sharded.join(format!("{b_id}.tmp")).exists());
    let (code, err) = batch(&["--manifest", m, "--out", s, "--shard", "1/3", "--force"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("1 complete") && err.contains("0 skipped"),
        "{err}"
    );

    // --record-video adds the annotated video, a frame per JSONL line.
    let one_video = tmp.path().join("one-video.txt");
    std::fs::write(&one_video, "archive/a.mp4\n").unwrap();
    let with_video = tmp.path().join("with-video");
    let (code, err) = batch(&[
        "--manifest",
        one_video.to_str().unwrap(),
        "--out",
        with_video.to_str().unwrap(),
        "--record-video",
    ]);
    assert_eq!(code, 0, "{err}");
    let session = with_video.join(id_of(&with_video, "archive/a.mp4"));
    let meta = common::read_json(&session.join("meta.json"));
    assert_eq!(meta["counts"]["frames"], 4);
    assert_eq!(meta["counts"]["video_frames"], 4);
    assert!(session.join("video.mp4").is_file());

    // A cut video is kept, marked partial, and the task says so.
    let cut = tmp.path().join("cut.txt");
    let truncated = common::fixtures().join("video/truncated.mp4");
    std::fs::write(&cut, format!("{}\n", truncated.display())).unwrap();
    let partial = tmp.path().join("partial");
    let (code, err) = batch(&[
        "--manifest",
        cut.to_str().unwrap(),
        "--out",
        partial.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("partial, 8 frames") && err.contains("not read whole"),
        "{err}"
    );
    let (code, _o, err) = cliper(&["batch", "merge", partial.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("0 complete, 1 partial"), "{err}");
}

#[test]
fn bad_arguments_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let o = out.to_str().unwrap();
    let (code, err) = batch(&["--input", "/no/such/dir", "--out", o]);
    assert_eq!(code, 1);
    assert!(err.contains("/no/such/dir"), "{err}");
    let (code, err) = batch(&[
        "--input",
        tmp.path().to_str().unwrap(),
        "--out",
        o,
        "--shard",
        "3/3",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("out of range"), "{err}");
    let (code, err) = batch(&[
        "--input",
        tmp.path().to_str().unwrap(),
        "--out",
        o,
        "--shards",
        "4",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("--shards 4"), "{err}");
    let (code, _o, err) = cliper(&["batch", "merge", tmp.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("is not the output of `cliper batch`"), "{err}");
}

/// The Slurm array of tests/cluster/slurm.sh: 3 tasks, one cancelled
/// midway and the array resubmitted, against one process.
#[test]
fn a_slurm_array_job_equals_one_process_and_survives_scancel() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("archive");
    std::fs::create_dir_all(input.join("clips")).unwrap();
    for i in 1..=6 {
        write_video(&input.join(format!("clips/v{i}.mp4")), 24, 10.0);
    }
    std::fs::copy(astronaut_path(), input.join("a.png")).unwrap();
    std::fs::copy(astronaut_path(), input.join("b.png")).unwrap();
    std::fs::write(
        input.join("clips/broken.mp4"),
        b"\0\0\0\x18ftypmp42 not really",
    )
    .unwrap();
    let work = tmp.path().join("work");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cluster/slurm.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .args([env!("CARGO_BIN_EXE_cliper"), &weights()])
        .arg(&input)
        .arg(&work)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    if stdout.contains("SLURM-TEST: SKIPPED") {
        eprintln!(
            "{}",
            stdout
                .lines()
                .find(|l| l.starts_with("NOTICE"))
                .unwrap_or("NOTICE: Slurm test skipped")
        );
        return;
    }
    assert!(
        out.status.success() && stdout.contains("SLURM-TEST: OK"),
        "{log}"
    );

    let single = work.join("single");
    let array = work.join("array");
    let (names, a) = read_table(&single.join("faces.parquet"));
    let (_, b) = read_table(&array.join("faces.parquet"));
    assert_eq!(a.len(), 6 * 48 + 2, "{log}");
    assert_rows_close(&comparable(&a, &names), &comparable(&b, &names));
    let (inames, ia) = read_table(&single.join("inputs.parquet"));
    let (_, ib) = read_table(&array.join("inputs.parquet"));
    let oc = inames.iter().position(|c| c == "outcome").unwrap();
    let outcomes = |t: &[Vec<Field>]| -> Vec<(String, String)> {
        t.iter()
            .map(|r| (text(&r[0]).to_string(), text(&r[oc]).to_string()))
            .collect()
    };
    assert_eq!(outcomes(&ia), outcomes(&ib));
    let failed: Vec<_> = outcomes(&ib)
        .into_iter()
        .filter(|(_, o)| o != "complete")
        .collect();
    assert_eq!(
        failed,
        [("clips/broken.mp4".to_string(), "failed".to_string())]
    );

    // Nothing was done twice: every good input has one "complete" line over
    // both submissions; the cancelled task's finished input was skipped on
    // resubmission and its other two were done then.
    let lines = status_lines(&array);
    for (key, outcome) in outcomes(&ib) {
        if outcome == "complete" {
            let n = lines
                .iter()
                .filter(|l| l["input"] == key.as_str() && l["outcome"] == "complete")
                .count();
            assert_eq!(n, 1, "{key} done {n} times\n{log}");
        }
    }
    let task1: Vec<_> = lines.iter().filter(|l| l["task"] == "1/3").collect();
    let complete = task1.iter().filter(|l| l["outcome"] == "complete").count();
    assert_eq!(complete, 3, "{task1:?}\n{log}");
    // The first submission's lines come first: fewer than its 3 inputs.
    let first_skip = task1.iter().position(|l| l["outcome"] == "skipped");
    assert!(
        first_skip.is_some_and(|k| (1..3).contains(&k)),
        "{task1:?}\n{log}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&array)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
