//! A soak: `cliper run --source demo --record` for a while, its resident
//! memory sampled every second. After a warm-up (a twelfth of the run, at
//! least 60 s) RSS may not grow by more than 5% (the median of the last 5
//! samples against that of the first 5). Then SIGINT must still finish
//! the recording.
//!
//! CI runs 2 minutes. The README's one-hour figures come from
//! `CLIPER_SOAK_SECS=3600 CLIPER_SOAK_LOG=soak.tsv cargo test --release --test soak -- --nocapture`.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn a_long_recorded_run_keeps_its_memory_flat() {
    if !std::path::Path::new("/proc/self/status").exists() {
        println!("NOTICE: no /proc here; skipping the soak");
        return;
    }
    let secs: u64 = std::env::var("CLIPER_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    // Allocator arenas, FFmpeg's and the encoder's buffers fill up over
    // the first minute, then stay.
    let warm = (secs / 12).max(60);
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("soak");
    let w = common::weights();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cliper"))
        .args(["run", "--source", "demo", "--weights", &w, "--record"])
        .arg(&rec)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut log = std::env::var_os("CLIPER_SOAK_LOG").map(|p| std::fs::File::create(p).unwrap());
    let start = Instant::now();
    let mut samples: Vec<(u64, u64)> = Vec::new();
    while start.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(1));
        if let Some(status) = child.try_wait().unwrap() {
            panic!("cliper ended early: {status}");
        }
        let t = start.elapsed().as_secs();
        if let Some(kb) = rss_kb(pid) {
            samples.push((t, kb));
            if let Some(f) = log.as_mut() {
                let _ = writeln!(f, "{t}\t{kb}");
            }
        }
    }
    assert!(Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    let meta = common::read_json(&rec.join("meta.json"));
    assert_eq!(meta["status"], "complete");

    // The reference: the median of the 5 samples after the warm-up.
    let after: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| *t >= warm)
        .map(|&(_, kb)| kb)
        .collect();
    assert!(after.len() >= 10, "{} samples", after.len());
    let mut first: Vec<u64> = after[..5].to_vec();
    first.sort_unstable();
    let base = first[2];
    let peak = *after.iter().max().unwrap();
    let last = *after.last().unwrap();
    let frames = meta["counts"]["frames"].as_u64().unwrap_or(0);
    println!(
        "soak: {secs} s, {frames} frames recorded; RSS after {warm} s {:.1} MB, peak {:.1} MB ({:+.1}%), last {:.1} MB ({:+.1}%)",
        base as f64 / 1024.0,
        peak as f64 / 1024.0,
        (peak as f64 / base as f64 - 1.0) * 100.0,
        last as f64 / 1024.0,
        (last as f64 / base as f64 - 1.0) * 100.0
    );
    // Growth, not jitter: the median of the last 5 samples.
    let mut tail: Vec<u64> = after[after.len() - 5..].to_vec();
    tail.sort_unstable();
    let end = tail[2];
    assert!(
        end as f64 <= base as f64 * 1.05,
        "RSS grew from {base} kB to {end} kB (peak {peak} kB)"
    );
}
