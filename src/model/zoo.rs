//! The models a user can fetch by name (`cliper weights fetch NAME`,
//! `cliper weights list`): what each is, where it comes from, its licence
//! and its published accuracy, and where it is installed.
//!
//! - Exp-CLIP heads come straight from the project's GitHub repository,
//!   pinned to a commit, and are checked against the git blob id the
//!   repository publishes for them (the SHA-1 of the git object, which
//!   identifies the exact bytes; no SHA-256 is published).
//! - DFER-CLIP checkpoints live on Google Drive. The download asks Drive's
//!   direct endpoint, follows its "can't scan this file for viruses" form
//!   when it answers with one, and refuses anything that is not a PyTorch
//!   checkpoint holding a DFER-CLIP prompt learner. When Drive will not hand
//!   the file out (quota, sign-in), the message says how to get it by hand.
//!
//! Installed files go to `$CLIPER_MODELS_DIR`, else `weights/models/` when
//! a `weights/` folder is here, else `~/.cache/cliper/models/`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What a named model is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZooKind {
    /// An Exp-CLIP projection head: `--head NAME` over zero-shot prompts.
    ExpClipHead,
    /// A DFER-CLIP checkpoint: `--model NAME`.
    DferClip,
}

impl ZooKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ZooKind::ExpClipHead => "exp-clip head",
            ZooKind::DferClip => "dfer-clip",
        }
    }
}

/// Where a named model is downloaded from.
#[derive(Clone, Copy, Debug)]
pub enum ZooSource {
    /// A file of a GitHub repository at a commit, with its git blob id.
    GitHub {
        repo: &'static str,
        commit: &'static str,
        path: &'static str,
        git_blob_sha1: &'static str,
    },
    /// A Google Drive file id.
    Drive { id: &'static str },
}

#[derive(Clone, Copy, Debug)]
pub struct ZooEntry {
    pub name: &'static str,
    pub kind: ZooKind,
    /// The file name it is installed as.
    pub file: &'static str,
    pub backbone: &'static str,
    /// The CLIP weights it needs beside it (none for DFER-CLIP).
    pub needs_clip: Option<&'static str>,
    pub classes: &'static str,
    pub descriptors_per_class: &'static str,
    pub project: &'static str,
    pub licence: &'static str,
    /// Published accuracy, with its source.
    pub accuracy: &'static str,
    pub source: ZooSource,
}

const EXP_CLIP_COMMIT: &str = "23ace53ca7cebaaa3964ccbf526ea746c89aadba";
const EXP_CLIP: &str = "zengqunzhao/Exp-CLIP (Zhao et al., WACV 2025)";
const DFER_CLIP: &str = "zengqunzhao/DFER-CLIP (Zhao & Patras, BMVC 2023)";
const DFEW_ACC: &str = "DFEW 59.61 UAR / 71.25 WAR (mean of the 5 folds; DFER-CLIP paper, Table 1)";
const MAFW_ACC: &str = "MAFW 39.89 UAR / 52.55 WAR (mean of the 5 folds; DFER-CLIP paper, Table 3)";

macro_rules! dfer {
    ($name:expr, $file:expr, $id:expr, $classes:expr, $acc:expr) => {
        ZooEntry {
            name: $name,
            kind: ZooKind::DferClip,
            file: $file,
            backbone: "ViT-B/32 (fine-tuned, inside the file)",
            needs_clip: None,
            classes: $classes,
            descriptors_per_class: "1 (learned context + LLM description)",
            project: DFER_CLIP,
            licence: "MIT",
            accuracy: $acc,
            source: ZooSource::Drive { id: $id },
        }
    };
}

const DFEW7: &str = "7 (happiness, sadness, neutral, anger, surprise, disgust, fear)";
const MAFW11: &str = "11 (DFEW's 7 + contempt, anxiety, helplessness, disappointment)";

/// Every model known by name.
pub const CATALOGUE: &[ZooEntry] = &[
    ZooEntry {
        name: "expclip-b16",
        kind: ZooKind::ExpClipHead,
        file: "ExpCLIP_B16_model.pth",
        backbone: "ViT-B/16",
        needs_clip: Some("openai/clip-vit-base-patch16 (`cliper weights fetch`)"),
        classes: "any (zero-shot prompts)",
        descriptors_per_class: "the prompts given",
        project: EXP_CLIP,
        licence: "MIT",
        accuracy: "zero-shot RAF-DB 48.96 UAR / 54.50 WAR, FERPlus 40.81 / 53.02 (Exp-CLIP paper, Table 1; plain CLIP ViT-B/16: 38.66 / 37.16 and 34.33 / 45.14)",
        source: ZooSource::GitHub {
            repo: "zengqunzhao/Exp-CLIP",
            commit: EXP_CLIP_COMMIT,
            path: "checkpoint/ExpCLIP_B16_model.pth",
            git_blob_sha1: "6f2b877fec83699e17283a511002376d117ce45f",
        },
    },
    ZooEntry {
        name: "expclip-b32",
        kind: ZooKind::ExpClipHead,
        file: "ExpCLIP_B32_model.pth",
        backbone: "ViT-B/32",
        needs_clip: Some("openai/clip-vit-base-patch32 (download by hand, --weights)"),
        classes: "any (zero-shot prompts)",
        descriptors_per_class: "the prompts given",
        project: EXP_CLIP,
        licence: "MIT",
        accuracy: "see the Exp-CLIP paper, Table 1 (ViT-B/32 rows)",
        source: ZooSource::GitHub {
            repo: "zengqunzhao/Exp-CLIP",
            commit: EXP_CLIP_COMMIT,
            path: "checkpoint/ExpCLIP_B32_model.pth",
            git_blob_sha1: "c7d28eb6c9665e709d9d6a422864a9d5713432f3",
        },
    },
    ZooEntry {
        name: "expclip-l14",
        kind: ZooKind::ExpClipHead,
        file: "ExpCLIP_L14_model.pth",
        backbone: "ViT-L/14",
        needs_clip: Some("openai/clip-vit-large-patch14 (download by hand, --weights)"),
        classes: "any (zero-shot prompts)",
        descriptors_per_class: "the prompts given",
        project: EXP_CLIP,
        licence: "MIT",
        accuracy: "see the Exp-CLIP paper, Table 1 (ViT-L/14 rows)",
        source: ZooSource::GitHub {
            repo: "zengqunzhao/Exp-CLIP",
            commit: EXP_CLIP_COMMIT,
            path: "checkpoint/ExpCLIP_L14_model.pth",
            git_blob_sha1: "febcf3447362f5b3654de12f89b2185414d62ec8",
        },
    },
    dfer!("dfer-clip-dfew-fold1", "DFER-CLIP_DFEW_fold1.pth", "1tH1d2zZv2HtcQFPrGuVWJHXmD9sTeddQ", DFEW7, DFEW_ACC),
    dfer!("dfer-clip-dfew-fold2", "DFER-CLIP_DFEW_fold2.pth", "1w6yESY3cNwcOCwQa-dTxIHNWBv57PRUR", DFEW7, DFEW_ACC),
    dfer!("dfer-clip-dfew-fold3", "DFER-CLIP_DFEW_fold3.pth", "1kmI1XlZdQIr6R33tBdteyrmYl0UgyXv8", DFEW7, DFEW_ACC),
    dfer!("dfer-clip-dfew-fold4", "DFER-CLIP_DFEW_fold4.pth", "10pxe7fCtASuKaxpZSGb7nR6EAjN7YSR6", DFEW7, DFEW_ACC),
    dfer!("dfer-clip-dfew-fold5", "DFER-CLIP_DFEW_fold5.pth", "161pNBUgR_uPSvptzN4ZI4_L7-tvF9SD8", DFEW7, DFEW_ACC),
    dfer!(
        "dfer-clip-ferv39k",
        "DFER-CLIP_FERV39k.pth",
        "1lRUw5eTa7TGSEombjHqCPE76oP2c_3fz",
        DFEW7,
        "FERV39k 41.27 UAR / 51.65 WAR (DFER-CLIP paper, Table 2)"
    ),
    dfer!("dfer-clip-mafw-fold1", "DFER-CLIP_MAFW_fold1.pth", "1vaICPQ9g3gfYpEcRwej6Se5qRb0LzbP6", MAFW11, MAFW_ACC),
    dfer!("dfer-clip-mafw-fold2", "DFER-CLIP_MAFW_fold2.pth", "1NCJU33j7yr6t_RXJeR1pO_znrN_jV5EC", MAFW11, MAFW_ACC),
    dfer!("dfer-clip-mafw-fold3", "DFER-CLIP_MAFW_fold3.pth", "12MS8ZVh582n2j37zy2Z7V85IwcnxuKC4", MAFW11, MAFW_ACC),
    dfer!("dfer-clip-mafw-fold4", "DFER-CLIP_MAFW_fold4.pth", "1Zs6pkzPU2Wkqb5ykrTU-csiu_c8Tpggh", MAFW11, MAFW_ACC),
    dfer!("dfer-clip-mafw-fold5", "DFER-CLIP_MAFW_fold5.pth", "1txju5MPe2eODw98Uz16iG3vxTR1GLMrx", MAFW11, MAFW_ACC),
];

#[derive(Debug, thiserror::Error)]
pub enum ZooError {
    #[error("unknown model `{0}` (known: {known}; `cliper weights list` describes them)", known = CATALOGUE.iter().map(|e| e.name).collect::<Vec<_>>().join(", "))]
    Unknown(String),
    #[error("{url}: {reason}")]
    Download { url: String, reason: String },
    #[error("{name}: the downloaded file is not the published one ({reason}); nothing was installed. Try again; if it persists, the upstream file changed: get it by hand from {page}")]
    Mismatch {
        name: String,
        reason: String,
        page: String,
    },
    #[error("{name}: Google Drive did not hand out the file ({reason}). Download it by hand from https://drive.google.com/file/d/{id}/view (a browser signed in to Google works), and put it at {dest}")]
    Drive {
        name: String,
        id: String,
        reason: String,
        dest: String,
    },
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// The folder installed models live in.
pub fn models_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CLIPER_MODELS_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let local = Path::new(super::weights::LOCAL_WEIGHTS_DIR);
    if local.is_dir() {
        return local.join("models");
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => PathBuf::from(h)
            .join(".cache")
            .join("cliper")
            .join("models"),
        None => local.join("models"),
    }
}

pub fn find(name: &str) -> Option<&'static ZooEntry> {
    CATALOGUE
        .iter()
        .find(|e| e.name.eq_ignore_ascii_case(name.trim()))
}

impl ZooEntry {
    /// Where it is (or would be) installed.
    pub fn path(&self) -> PathBuf {
        models_dir().join(self.file)
    }

    pub fn installed(&self) -> bool {
        self.path().is_file()
    }

    /// A page a person can open to get the file by hand.
    pub fn page(&self) -> String {
        match self.source {
            ZooSource::GitHub {
                repo, commit, path, ..
            } => format!("https://github.com/{repo}/blob/{commit}/{path}"),
            ZooSource::Drive { id } => format!("https://drive.google.com/file/d/{id}/view"),
        }
    }
}

/// A `--model`/`--head` argument: an existing path as is; else a
/// catalogue name, as its installed path (which a later load reports as
/// missing, see [`not_installed`]); else the argument unchanged.
pub fn resolve(arg: &Path) -> PathBuf {
    if arg.exists() {
        return arg.to_path_buf();
    }
    match arg.to_str().and_then(find) {
        Some(e) => e.path(),
        None => arg.to_path_buf(),
    }
}

/// The catalogue entry whose install path `path` is, when it is missing.
pub fn not_installed(path: &Path) -> Option<&'static ZooEntry> {
    if path.exists() {
        return None;
    }
    CATALOGUE.iter().find(|e| e.path() == path)
}

fn github_endpoint() -> String {
    std::env::var("CLIPER_GITHUB_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| "https://raw.githubusercontent.com".into())
}

fn drive_endpoint() -> String {
    std::env::var("CLIPER_DRIVE_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| "https://drive.usercontent.google.com".into())
}

fn agent() -> ureq::Agent {
    let stall = std::env::var("CLIPER_DOWNLOAD_STALL_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .unwrap_or(super::weights::DOWNLOAD_STALL_SECS);
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(30))
        // A server that stops sending for this long ends the download.
        .timeout_read(Duration::from_secs(stall))
        .redirects(8)
        .build()
}

/// The git blob id of `bytes`: SHA-1 of "blob LEN\0" + bytes.
pub fn git_blob_sha1(bytes: &[u8]) -> String {
    use sha1::{Digest, Sha1};
    let mut h = Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Streams a response body to `dest`, reporting (done, total).
fn save_body(
    resp: ureq::Response,
    url: &str,
    dest: &Path,
    report: &mut dyn FnMut(u64, u64),
) -> Result<(), ZooError> {
    let total: u64 = resp
        .header("Content-Length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let werr = |e: std::io::Error| ZooError::Write {
        path: dest.to_path_buf(),
        reason: e.to_string(),
    };
    let mut out = std::fs::File::create(dest).map_err(werr)?;
    let mut body = resp.into_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut done = 0u64;
    loop {
        let n = body.read(&mut buf).map_err(|e| ZooError::Download {
            url: url.to_string(),
            reason: format!(
                "the download broke off after {done} bytes ({e}): check the network and run the command again"
            ),
        })?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).map_err(werr)?;
        done += n as u64;
        report(done, total.max(done));
    }
    out.sync_all().map_err(werr)?;
    if total > 0 && done != total {
        return Err(ZooError::Download {
            url: url.to_string(),
            reason: format!("got {done} of {total} bytes: run the command again"),
        });
    }
    Ok(())
}

fn get(agent: &ureq::Agent, url: &str) -> Result<ureq::Response, ZooError> {
    agent.get(url).call().map_err(|e| ZooError::Download {
        url: url.to_string(),
        reason: match e {
            ureq::Error::Status(code, _) => format!("the server answered HTTP {code}"),
            ureq::Error::Transport(t) => {
                format!("{t}: check the network connection (and HTTPS_PROXY if you use a proxy)")
            }
        },
    })
}

/// The URL Drive's "can't scan for viruses" form submits to, from its HTML.
pub fn drive_form_url(html: &str) -> Option<String> {
    let form = html.find("<form")?;
    let rest = &html[form..];
    let action = attr(rest, "action")?;
    let end = rest.find("</form>").unwrap_or(rest.len());
    let mut query = Vec::new();
    let mut s = &rest[..end];
    while let Some(i) = s.find("<input") {
        s = &s[i + 6..];
        let tag_end = s.find('>').unwrap_or(s.len());
        let tag = &s[..tag_end];
        if let (Some(name), Some(value)) = (attr(tag, "name"), attr(tag, "value")) {
            query.push(format!("{}={}", url_encode(&name), url_encode(&value)));
        }
    }
    let action = action.replace("&amp;", "&");
    let sep = if action.contains('?') { '&' } else { '?' };
    Some(format!("{action}{sep}{}", query.join("&")))
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let key = format!("{name}=\"");
    let i = tag.find(&key)? + key.len();
    let j = tag[i..].find('"')? + i;
    Some(tag[i..j].to_string())
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn is_html(resp: &ureq::Response) -> bool {
    resp.header("Content-Type")
        .is_some_and(|c| c.to_ascii_lowercase().starts_with("text/html"))
}

/// Why a downloaded file is not a DFER-CLIP checkpoint.
#[derive(Debug, thiserror::Error)]
enum NotDferClip {
    #[error("{0}")]
    Pickle(String),
    #[error("not a DFER-CLIP checkpoint, which holds a `state_dict`: {0}")]
    NoStateDict(candle_core::Error),
    #[error("a PyTorch checkpoint, but without DFER-CLIP's `prompt_learner.ctx`")]
    NoPromptLearner,
}

/// Checks that a file is a DFER-CLIP checkpoint without loading its
/// tensors: the pickle guard, then the tensor index of `state_dict`.
fn check_dfer_clip(path: &Path) -> Result<(), NotDferClip> {
    super::pickle_guard::check_file(path).map_err(|e| NotDferClip::Pickle(e.to_string()))?;
    let infos = candle_core::pickle::read_pth_tensor_info(path, false, Some("state_dict"))
        .map_err(NotDferClip::NoStateDict)?;
    if super::dfer_clip::is_dfer_clip(infos.iter().map(|i| &i.name)) {
        Ok(())
    } else {
        Err(NotDferClip::NoPromptLearner)
    }
}

/// Downloads a named model into [`models_dir`]; returns its path. The file
/// appears only once whole and checked.
pub fn fetch(name: &str, report: &mut dyn FnMut(u64, u64)) -> Result<PathBuf, ZooError> {
    let entry = find(name).ok_or_else(|| ZooError::Unknown(name.to_string()))?;
    fetch_entry(entry, report)
}

/// [`fetch`] of any entry (tests serve their own).
pub fn fetch_entry(
    entry: &ZooEntry,
    report: &mut dyn FnMut(u64, u64),
) -> Result<PathBuf, ZooError> {
    let dest = entry.path();
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| ZooError::Write {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let tmp = dir.join(format!(".{}.part-{}", entry.file, std::process::id()));
    let result = fetch_to(entry, &tmp, report);
    match result {
        Ok(()) => std::fs::rename(&tmp, &dest).map_err(|e| ZooError::Write {
            path: dest.clone(),
            reason: e.to_string(),
        })?,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    }
    Ok(dest)
}

fn fetch_to(
    entry: &ZooEntry,
    tmp: &Path,
    report: &mut dyn FnMut(u64, u64),
) -> Result<(), ZooError> {
    let agent = agent();
    match entry.source {
        ZooSource::GitHub {
            repo,
            commit,
            path,
            git_blob_sha1: want,
        } => {
            let url = format!("{}/{repo}/{commit}/{path}", github_endpoint());
            save_body(get(&agent, &url)?, &url, tmp, report)?;
            let bytes = std::fs::read(tmp).map_err(|e| ZooError::Write {
                path: tmp.to_path_buf(),
                reason: e.to_string(),
            })?;
            let got = git_blob_sha1(&bytes);
            if got != want {
                return Err(ZooError::Mismatch {
                    name: entry.name.into(),
                    reason: format!("git blob id {got}, expected {want}"),
                    page: entry.page(),
                });
            }
            Ok(())
        }
        ZooSource::Drive { id } => {
            let drive_err = |reason: String| ZooError::Drive {
                name: entry.name.into(),
                id: id.into(),
                reason,
                dest: entry.path().display().to_string(),
            };
            let url = format!(
                "{}/download?id={id}&export=download&confirm=t",
                drive_endpoint()
            );
            let mut resp = get(&agent, &url).map_err(|e| drive_err(e.to_string()))?;
            let mut url = url;
            // Large files first get a form asking to confirm the download.
            for _ in 0..2 {
                if !is_html(&resp) {
                    break;
                }
                let html = resp.into_string().unwrap_or_default();
                let Some(next) = drive_form_url(&html) else {
                    return Err(drive_err(
                        "it answered with a web page instead of the file (a quota or sign-in page)"
                            .into(),
                    ));
                };
                url = if next.starts_with("http") {
                    next
                } else {
                    format!("{}{next}", drive_endpoint())
                };
                resp = get(&agent, &url).map_err(|e| drive_err(e.to_string()))?;
            }
            if is_html(&resp) {
                return Err(drive_err(
                    "it kept answering with a web page instead of the file".into(),
                ));
            }
            save_body(resp, &url, tmp, report)?;
            check_dfer_clip(tmp).map_err(|e| ZooError::Mismatch {
                name: entry.name.into(),
                reason: e.to_string(),
                page: entry.page(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_blob_ids_match_git() {
        // `printf 'hello\n' | git hash-object --stdin`
        assert_eq!(
            git_blob_sha1(b"hello\n"),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
    }

    #[test]
    fn drive_confirmation_form_is_followed() {
        let html = r#"<html><body><form id="download-form" action="https://drive.usercontent.google.com/download" method="get">
<input type="submit" id="uc-download-link" value="Download anyway"/>
<input type="hidden" name="id" value="1abc"><input type="hidden" name="export" value="download">
<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="u-1 2"></form></body></html>"#;
        assert_eq!(
            drive_form_url(html).unwrap(),
            "https://drive.usercontent.google.com/download?id=1abc&export=download&confirm=t&uuid=u-1%202"
        );
        assert_eq!(drive_form_url("<html>quota exceeded</html>"), None);
    }

    #[test]
    fn names_resolve_to_install_paths() {
        let e = find("ExpCLIP-B16").unwrap();
        assert_eq!(resolve(Path::new("expclip-b16")), e.path());
        assert_eq!(
            resolve(Path::new("no/such.pth")),
            PathBuf::from("no/such.pth")
        );
        assert!(CATALOGUE.iter().all(|e| e.licence == "MIT"));
        let mut names: Vec<&str> = CATALOGUE.iter().map(|e| e.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), CATALOGUE.len());
    }
}
