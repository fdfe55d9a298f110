//! Downloading the official CLIP weights from the Hugging Face hub.

use super::*;

/// Seconds without a byte from the hub before a download gives up
/// (`$CLIPER_DOWNLOAD_STALL_SECS` overrides it).
pub const DOWNLOAD_STALL_SECS: u64 = 60;

/// The hub's address (`$HF_ENDPOINT`, as `hf-hub` reads it).
pub fn hub_endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| "https://huggingface.co".to_string())
}

pub(super) fn stall_limit() -> std::time::Duration {
    let secs = std::env::var("CLIPER_DOWNLOAD_STALL_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .unwrap_or(DOWNLOAD_STALL_SECS);
    std::time::Duration::from_secs(secs)
}

/// Downloads the official weights (safetensors + config) into the hub cache
/// with a progress bar, returning the weights file.
///
/// `hf-hub` has no timeouts of its own, so the download runs on a thread
/// watched from here: if no byte arrives for [`DOWNLOAD_STALL_SECS`]
/// (a server that accepts and never answers, a dead link), it fails with a
/// message naming the host. `hf-hub` retries 3 times and resumes a partial
/// file from where it stopped, so running the command again goes on.
pub fn fetch() -> std::result::Result<PathBuf, DownloadError> {
    let bar = download_bar();
    let b = bar.clone();
    let result = fetch_watched(move |file, done, total| {
        b.set_message(file.to_string());
        b.set_length(total);
        b.set_position(done);
    });
    bar.finish_and_clear();
    result
}

/// Why the CLIP weights could not be downloaded; each says what to do.
#[derive(Clone, Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("cannot start the download: {0}")]
    Thread(String),
    #[error("cannot set up the Hugging Face client: {0}")]
    Client(String),
    #[error(
        "no data from {host} for {secs} s: check the network connection (and HTTPS_PROXY if you use a proxy), then run `cliper weights fetch` again, which resumes the download. Without network access, download model.safetensors and config.json from https://huggingface.co/{HUB_REPO} by hand and put them in {LOCAL_WEIGHTS_DIR}/"
    )]
    Stalled { host: String, secs: u64 },
    #[error("the download stopped without a result")]
    Stopped,
    #[error(
        "could not download {file} from {HUB_REPO} ({reason}). Without network access, download \
         model.safetensors and config.json from https://huggingface.co/{HUB_REPO} by hand \
         and put them in {LOCAL_WEIGHTS_DIR}/ (or anywhere, and pass --weights DIR or set \
         ${WEIGHTS_ENV})"
    )]
    File { file: String, reason: String },
}

/// The progress bar of every download (the hub's, the named models').
pub fn download_bar() -> indicatif::ProgressBar {
    crate::progress::bar(
        0,
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}, eta {eta}",
        "",
    )
}

/// [`fetch_with_progress`] under the stall watchdog of [`fetch`].
pub fn fetch_watched(
    mut report: impl FnMut(&str, u64, u64),
) -> std::result::Result<PathBuf, DownloadError> {
    enum Msg {
        Progress(String, u64, u64),
        Done(std::result::Result<PathBuf, DownloadError>),
    }
    let (tx, rx) = crossbeam_channel::unbounded();
    let progress = tx.clone();
    std::thread::Builder::new()
        .name("cliper-download".into())
        .spawn(move || {
            let r = fetch_with_progress(move |f, d, t| {
                let _ = progress.send(Msg::Progress(f.to_string(), d, t));
            });
            let _ = tx.send(Msg::Done(r));
        })
        .map_err(|e| DownloadError::Thread(e.to_string()))?;
    let limit = stall_limit();
    loop {
        match rx.recv_timeout(limit) {
            Ok(Msg::Progress(f, d, t)) => report(&f, d, t),
            Ok(Msg::Done(r)) => return r,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                return Err(DownloadError::Stalled {
                    host: hub_endpoint(),
                    secs: limit.as_secs(),
                })
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                return Err(DownloadError::Stopped)
            }
        }
    }
}

/// Like [`fetch`], for a GUI: `report(file, bytes_done, bytes_total)` is
/// called as the download goes (from the calling thread).
pub fn fetch_with_progress(
    report: impl FnMut(&str, u64, u64) + Send + 'static,
) -> std::result::Result<PathBuf, DownloadError> {
    struct Report<F> {
        file: String,
        done: u64,
        total: u64,
        f: std::sync::Arc<std::sync::Mutex<F>>,
    }
    impl<F: FnMut(&str, u64, u64)> hf_hub::api::Progress for Report<F> {
        fn init(&mut self, size: usize, filename: &str) {
            self.file = filename.to_string();
            self.total = size as u64;
            self.done = 0;
            if let Ok(mut f) = self.f.lock() {
                f(&self.file, 0, self.total);
            }
        }
        fn update(&mut self, size: usize) {
            self.done += size as u64;
            if let Ok(mut f) = self.f.lock() {
                f(&self.file, self.done, self.total);
            }
        }
        fn finish(&mut self) {
            if let Ok(mut f) = self.f.lock() {
                f(&self.file, self.total, self.total);
            }
        }
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(false)
        .with_retries(3)
        .build()
        .map_err(|e| DownloadError::Client(e.to_string()))?;
    let repo = api.model(HUB_REPO.to_string());
    let shared = std::sync::Arc::new(std::sync::Mutex::new(report));
    let mut last = PathBuf::new();
    for file in ["config.json", "model.safetensors"] {
        let cache = hf_hub::Cache::from_env();
        if let Some(p) = cache.model(HUB_REPO.to_string()).get(file) {
            last = p;
            continue;
        }
        let progress = Report {
            file: file.to_string(),
            done: 0,
            total: 0,
            f: shared.clone(),
        };
        last = repo
            .download_with_progress(file, progress)
            .map_err(|e| DownloadError::File {
                file: file.to_string(),
                reason: e.to_string(),
            })?;
    }
    Ok(last)
}
