//! The real download path (`cliper weights fetch`, the app's first-run
//! download), against a local stand-in for the Hugging Face hub: the same
//! `resolve/main/FILE` URLs, range requests and headers (`ETag`,
//! `X-Repo-Commit`, `Content-Range`) that `hf-hub` reads, serving the tiny
//! fixture model. `HF_ENDPOINT` points the client at it, `HF_HOME` at a
//! temporary cache.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Serves `files` (name -> bytes) under `/openai/clip-vit-base-patch16/resolve/main/`;
/// a name mapped to `None` answers 500. Returns the endpoint URL and a
/// counter of requests.
fn serve(files: HashMap<&'static str, Option<Vec<u8>>>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            counter.fetch_add(1, Ordering::SeqCst);
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            let mut range = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    if k.eq_ignore_ascii_case("range") {
                        range = Some(v.trim().trim_start_matches("bytes=").to_string());
                    }
                }
            }
            let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
            let name = path
                .strip_prefix("/openai/clip-vit-base-patch16/resolve/main/")
                .unwrap_or("");
            let response = match files.get(name) {
                Some(Some(data)) => {
                    let len = data.len();
                    let (a, b) = match range.as_deref().and_then(|r| r.split_once('-')) {
                        Some((a, b)) => (
                            a.parse::<usize>().unwrap_or(0),
                            b.parse::<usize>().unwrap_or(len - 1).min(len - 1),
                        ),
                        None => (0, len - 1),
                    };
                    let mut head = format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {a}-{b}/{len}\r\nETag: \"etag-{name}\"\r\nX-Repo-Commit: {COMMIT}\r\nConnection: close\r\n\r\n",
                        b + 1 - a
                    )
                    .into_bytes();
                    head.extend_from_slice(&data[a..=b]);
                    head
                }
                Some(None) => {
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
                }
                None => {
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_vec()
                }
            };
            let _ = stream.write_all(&response);
        }
    });
    (url, hits)
}

fn fixture_files() -> HashMap<&'static str, Option<Vec<u8>>> {
    let dir = fixtures().join("clip_c_hf16");
    HashMap::from([
        (
            "model.safetensors",
            Some(std::fs::read(dir.join("model.safetensors")).unwrap()),
        ),
        (
            "config.json",
            Some(std::fs::read(dir.join("config.json")).unwrap()),
        ),
    ])
}

/// Runs `cliper ARGS` in `cwd` (no `weights/` folder there) with the hub
/// pointed at `endpoint` and the cache in `home`.
fn cliper_with_hub(
    args: &[&str],
    cwd: &Path,
    endpoint: &str,
    home: &Path,
) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cliper"))
        .args(args)
        .current_dir(cwd)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", home)
        .env_remove("CLIPER_WEIGHTS")
        .env_remove("HF_HUB_CACHE")
        .output()
        .expect("run cliper");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn weights_fetch_downloads_into_the_hub_cache_and_the_commands_find_them() {
    let (endpoint, hits) = serve(fixture_files());
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("hf");
    let cwd = tmp.path().join("work");
    std::fs::create_dir_all(&cwd).unwrap();

    // Nothing there yet: the error says how to get the weights.
    let (code, _, err) = cliper_with_hub(&["weights", "info"], &cwd, &endpoint, &home);
    assert_ne!(code, 0);
    assert!(err.contains("cliper weights fetch"), "{err}");

    let (code, _, err) = cliper_with_hub(&["weights", "fetch"], &cwd, &endpoint, &home);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("weights ready:"), "{err}");
    let snapshot = home
        .join("hub/models--openai--clip-vit-base-patch16/snapshots")
        .join(COMMIT);
    for file in ["model.safetensors", "config.json"] {
        let got = std::fs::read(snapshot.join(file)).unwrap();
        let want = std::fs::read(fixtures().join("clip_c_hf16").join(file)).unwrap();
        assert!(got == want, "{file} differs from what was served");
    }
    // Found without --weights, and used.
    let (code, out, err) = cliper_with_hub(&["weights", "info"], &cwd, &endpoint, &home);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("models--openai--clip-vit-base-patch16"),
        "{out}"
    );
    let photo = astronaut_path();
    let (code, out, err) = cliper_with_hub(
        &["classify", "--json", photo.to_str().unwrap()],
        &cwd,
        &endpoint,
        &home,
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(v["faces"].as_array().map(|f| f.len()), Some(1), "{out}");
    // A second fetch finds the cache and downloads nothing.
    let before = hits.load(Ordering::SeqCst);
    let (code, _, err) = cliper_with_hub(&["weights", "fetch"], &cwd, &endpoint, &home);
    assert_eq!(code, 0, "{err}");
    assert!(
        hits.load(Ordering::SeqCst) - before <= 2,
        "a cached file was downloaded again"
    );
}

#[test]
fn a_failing_download_says_what_to_do() {
    let mut files = fixture_files();
    files.insert("model.safetensors", None);
    let (endpoint, _) = serve(files);
    let tmp = tempfile::tempdir().unwrap();
    let (code, _, err) = cliper_with_hub(
        &["weights", "fetch"],
        tmp.path(),
        &endpoint,
        &tmp.path().join("hf"),
    );
    assert_ne!(code, 0);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(
        err.contains("could not download model.safetensors") && err.contains("by hand"),
        "{err}"
    );
    // Nothing half-downloaded passes for the weights.
    let (code, _, _) = cliper_with_hub(
        &["weights", "info"],
        tmp.path(),
        &endpoint,
        &tmp.path().join("hf"),
    );
    assert_ne!(code, 0);
}

/// The app's first-run screen downloads through `fetch_with_progress`.
#[test]
fn the_first_run_download_reports_its_progress() {
    let (endpoint, _) = serve(fixture_files());
    let tmp = tempfile::tempdir().unwrap();
    // The other tests give their child processes these variables explicitly.
    std::env::set_var("HF_ENDPOINT", &endpoint);
    std::env::set_var("HF_HOME", tmp.path());
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let path = cliper::model::weights::fetch_with_progress(move |file, done, total| {
        log.lock().unwrap().push((file.to_string(), done, total));
    })
    .unwrap();
    assert!(
        path.ends_with("model.safetensors") && path.is_file(),
        "{path:?}"
    );
    let size = std::fs::metadata(fixtures().join("clip_c_hf16/model.safetensors"))
        .unwrap()
        .len();
    let seen = seen.lock().unwrap();
    assert!(
        seen.iter()
            .any(|(f, d, t)| f == "model.safetensors" && *d == size && *t == size),
        "{seen:?}"
    );
    assert!(seen.iter().all(|(_, d, t)| d <= t));
}

#[test]
fn a_server_that_never_answers_fails_within_the_stall_limit() {
    // Accepts connections and holds them without a byte of answer.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cliper"))
        .args(["weights", "fetch"])
        .current_dir(tmp.path())
        .env("HF_ENDPOINT", &endpoint)
        .env("HF_HOME", tmp.path().join("hf"))
        .env("CLIPER_DOWNLOAD_STALL_SECS", "2")
        .env_remove("CLIPER_WEIGHTS")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("no data from {endpoint} for 2 s")) && err.contains("resumes"),
        "{err}"
    );
}
