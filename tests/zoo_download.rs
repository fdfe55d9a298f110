//! Named model downloads (`model::zoo`) against local stand-ins for GitHub's
//! raw files and Google Drive (its "can't scan for viruses" form included):
//! a file appears only whole and checked, and every failure says what to do.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use cliper::model::zoo::{self, ZooEntry, ZooError, ZooKind, ZooSource};
use common::*;

type Handler = Arc<dyn Fn(&str) -> (u16, &'static str, Vec<u8>) + Send + Sync>;

/// Answers every request with `handler(path)`: (status, content type,
/// body). Returns the endpoint and the paths asked for.
fn serve(handler: Handler) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let asked = Arc::new(Mutex::new(Vec::new()));
    let log = asked.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
            log.lock().unwrap().push(path.clone());
            let (status, ctype, body) = handler(&path);
            let mut out = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            out.extend_from_slice(&body);
            let _ = stream.write_all(&out);
        }
    });
    (url, asked)
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn entry(name: &'static str, file: &'static str, source: ZooSource) -> ZooEntry {
    let mut e = *zoo::find("expclip-b16").unwrap();
    e.name = name;
    e.file = file;
    e.source = source;
    e
}

fn installed(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// One test: the endpoints and the models folder are process-wide settings.
#[test]
fn named_downloads_install_only_checked_files() {
    let models = tempfile::tempdir().unwrap();
    std::env::set_var("CLIPER_MODELS_DIR", models.path());
    let head = std::fs::read(fixtures().join("zoo/expclip_head.pth")).unwrap();
    let dfer = std::fs::read(fixtures().join("zoo/dfer_mafw.pth")).unwrap();

    // GitHub: the published bytes, checked by their git blob id.
    let served = head.clone();
    let (github, asked) = serve(Arc::new(move |path: &str| {
        if path.ends_with("/checkpoint/head.pth") {
            (200, "application/octet-stream", served.clone())
        } else {
            (404, "text/plain", b"no".to_vec())
        }
    }));
    std::env::set_var("CLIPER_GITHUB_ENDPOINT", &github);
    let good = entry(
        "test-head",
        "head.pth",
        ZooSource::GitHub {
            repo: "someone/Exp-CLIP",
            commit: "0123abc",
            path: "checkpoint/head.pth",
            git_blob_sha1: leak(zoo::git_blob_sha1(&head)),
        },
    );
    let mut last = (0, 0);
    let path = zoo::fetch_entry(&good, &mut |d, t| last = (d, t)).unwrap();
    assert_eq!(path, models.path().join("head.pth"));
    assert_eq!(std::fs::read(&path).unwrap(), head);
    assert_eq!(
        last,
        (head.len() as u64, head.len() as u64),
        "progress reached the end"
    );
    assert_eq!(
        asked.lock().unwrap().last().unwrap(),
        "/someone/Exp-CLIP/0123abc/checkpoint/head.pth"
    );
    // The installed head works as --head.
    let (code, _out, err) = cliper(&[
        "classify",
        "--weights",
        &path_of("clip_c_hf16"),
        "--prompts",
        &fixtures().join("zoo/expclip_prompts.txt").to_string_lossy(),
        "--head",
        &path.to_string_lossy(),
        &fixtures().join("clip_c_hf16/face.png").to_string_lossy(),
    ]);
    assert_eq!(code, 0, "{err}");

    // Other bytes under the same name are refused, and nothing is left.
    let wrong = entry(
        "test-wrong",
        "wrong.pth",
        ZooSource::GitHub {
            repo: "someone/Exp-CLIP",
            commit: "0123abc",
            path: "checkpoint/head.pth",
            git_blob_sha1: "6f2b877fec83699e17283a511002376d117ce45f",
        },
    );
    let e = zoo::fetch_entry(&wrong, &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, ZooError::Mismatch { .. }), "{e}");
    assert!(e.to_string().contains("6f2b877f"), "{e}");
    assert_eq!(installed(models.path()), ["head.pth"]);
    // A missing file names the URL and the status.
    let gone = entry(
        "test-gone",
        "gone.pth",
        ZooSource::GitHub {
            repo: "someone/Exp-CLIP",
            commit: "0123abc",
            path: "checkpoint/gone.pth",
            git_blob_sha1: "00",
        },
    );
    let e = zoo::fetch_entry(&gone, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("gone.pth") && e.contains("HTTP 404"), "{e}");

    // Drive: the confirmation form first, then the file.
    let (drive_url, asked) = {
        let dfer = dfer.clone();
        let endpoint = Arc::new(Mutex::new(String::new()));
        let ep = endpoint.clone();
        let (url, asked) = serve(Arc::new(move |path: &str| {
            if path.contains("id=ok") && path.contains("uuid=abc%20123") {
                (200, "application/octet-stream", dfer.clone())
            } else if path.contains("id=ok") {
                let form = format!(
                    r#"<!DOCTYPE html><html><body><p>Google Drive can't scan this file for viruses.</p><form id="download-form" action="{}/download" method="get"><input type="submit" value="Download anyway"/><input type="hidden" name="id" value="ok"><input type="hidden" name="export" value="download"><input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="abc 123"></form></body></html>"#,
                    ep.lock().unwrap()
                );
                (200, "text/html; charset=utf-8", form.into_bytes())
            } else if path.contains("id=quota") {
                (
                    200,
                    "text/html",
                    b"<html>Too many users have viewed or downloaded this file recently.</html>"
                        .to_vec(),
                )
            } else if path.contains("id=notdfer") {
                (
                    200,
                    "application/octet-stream",
                    std::fs::read(fixtures().join("zoo/expclip_head.pth")).unwrap(),
                )
            } else {
                (404, "text/plain", Vec::new())
            }
        }));
        *endpoint.lock().unwrap() = url.clone();
        (url, asked)
    };
    std::env::set_var("CLIPER_DRIVE_ENDPOINT", &drive_url);
    let mut d = entry("test-dfer", "dfer.pth", ZooSource::Drive { id: "ok" });
    d.kind = ZooKind::DferClip;
    let path = zoo::fetch_entry(&d, &mut |_, _| {}).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), dfer);
    assert_eq!(asked.lock().unwrap().len(), 2, "the form was followed once");
    let (code, _o, err) = cliper(&[
        "classify",
        "--model",
        &path.to_string_lossy(),
        "--no-detect",
        &fixtures()
            .join("zoo/dfer_mafw_frame00.png")
            .to_string_lossy(),
    ]);
    assert_eq!(code, 0, "{err}");
    // A quota page: say how to get it by hand.
    let q = entry("test-quota", "quota.pth", ZooSource::Drive { id: "quota" });
    let e = zoo::fetch_entry(&q, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("https://drive.google.com/file/d/quota/view") && e.contains("by hand"),
        "{e}"
    );
    // A file that is not a DFER-CLIP checkpoint is not installed.
    let n = entry(
        "test-notdfer",
        "notdfer.pth",
        ZooSource::Drive { id: "notdfer" },
    );
    let e = zoo::fetch_entry(&n, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a DFER-CLIP checkpoint"), "{e}");
    assert_eq!(installed(models.path()), ["dfer.pth", "head.pth"]);

    // The CLI lists the catalogue.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cliper"))
        .args(["weights", "list", "--json"])
        .env("CLIPER_MODELS_DIR", models.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let models_list = v["models"].as_array().unwrap();
    assert!(models_list.len() >= 14);
    let b16 = models_list
        .iter()
        .find(|m| m["name"] == "expclip-b16")
        .unwrap();
    assert_eq!(b16["licence"], "MIT");
    assert_eq!(b16["installed"], false);
    assert!(b16["accuracy"].as_str().unwrap().contains("48.96"));
}

fn path_of(rel: &str) -> String {
    fixtures().join(rel).to_string_lossy().into_owned()
}
