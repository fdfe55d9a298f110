//! The data thread: session.jsonl, session.csv and meta.json, written in
//! order, synced every few seconds, and the weights' hashes in the
//! background.

use super::*;

/// A file as far as a cached hash is concerned: path, size, modification time.
pub(super) type FileKey = (PathBuf, u64, Option<SystemTime>);

/// Hashes of files already computed in this process: the app records many
/// sessions with the same 600 MB weights.
pub(super) fn hash_cache() -> &'static Mutex<HashMap<FileKey, String>> {
    static CACHE: OnceLock<Mutex<HashMap<FileKey, String>>> = OnceLock::new();
    CACHE.get_or_init(Mutex::default)
}

/// Hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let md = std::fs::metadata(path)?;
    let key = (path.to_path_buf(), md.len(), md.modified().ok());
    if let Some(h) = hash_cache().lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(h);
    }
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher)?;
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if let Ok(mut c) = hash_cache().lock() {
        c.insert(key, hex.clone());
    }
    Ok(hex)
}

pub(super) struct DataThread {
    pub(super) dir: PathBuf,
    pub(super) jsonl: File,
    pub(super) csv: File,
    /// Whether session.csv has its header yet.
    pub(super) csv_header: bool,
    pub(super) lock: Option<File>,
    pub(super) meta: SessionMeta,
    pub(super) shared: Arc<Shared>,
    pub(super) tx: Sender<DataMsg>,
    pub(super) pending_hashes: usize,
    /// Hashes already known, by file.
    pub(super) hashes: HashMap<PathBuf, Option<String>>,
    pub(super) last_sync: Instant,
    /// Whether the last write of meta.json failed.
    pub(super) meta_write_failed: bool,
    pub(super) video_thread: Option<JoinHandle<()>>,
    pub(super) opts: SessionOptions,
}

impl DataThread {
    pub(super) fn run(mut self, rx: Receiver<DataMsg>) -> Result<FinishReport, SessionError> {
        for msg in rx.iter() {
            match msg {
                DataMsg::Frame(r) => self.write_frame(&r),
                DataMsg::Meta(u) => self.update(*u),
                DataMsg::Hashed { path, hex } => self.hashed(path, hex),
                DataMsg::Finish => break,
            }
        }
        if !self.shared.failed.load(Ordering::SeqCst) {
            if let Err(e) = self.write_csv_header() {
                self.fail(e);
            }
        }
        self.finish(&rx)
    }

    pub(super) fn fail(&mut self, e: SessionError) {
        self.note_error(e.to_string());
        self.shared.fail(&e);
    }

    /// Keeps an error for meta.json (the first few distinct ones).
    pub(super) fn note_error(&mut self, e: String) {
        if self.meta.errors.len() < 20 && !self.meta.errors.contains(&e) {
            self.meta.errors.push(e);
        }
    }

    pub(super) fn write_frame(&mut self, r: &FrameRecord) {
        if self.shared.failed.load(Ordering::SeqCst) {
            return;
        }
        let mut line = r.to_line();
        line.push('\n');
        // One write per file and frame: a crash leaves whole lines, or one
        // cut line that `finalize` removes.
        if let Err(e) = self.jsonl.write_all(line.as_bytes()) {
            return self.fail(SessionError::write(&self.dir.join(JSONL_FILE), e));
        }
        self.shared.frames.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.write_csv_header() {
            return self.fail(e);
        }
        if !r.faces.is_empty() {
            if let Err(e) = self
                .csv
                .write_all(r.to_csv_rows(&self.meta.classes).as_bytes())
            {
                return self.fail(SessionError::write(&self.dir.join(CSV_FILE), e));
            }
            (self.shared.face_rows).fetch_add(r.faces.len() as u64, Ordering::Relaxed);
        }
        if self.last_sync.elapsed() >= SYNC_EVERY {
            self.last_sync = Instant::now();
            if let Err(e) = self.sync(false) {
                self.fail(e);
            }
        }
    }

    /// Writes the CSV header (the session's classes) unless it is there.
    pub(super) fn write_csv_header(&mut self) -> Result<(), SessionError> {
        if self.csv_header {
            return Ok(());
        }
        self.csv_header = true;
        self.csv
            .write_all(csv_header(&self.meta.classes).as_bytes())
            .map_err(|e| SessionError::write(&self.dir.join(CSV_FILE), e))
    }

    /// Pushes the lines to the disk (flushing already hands them to the OS,
    /// which is enough for a crash; this is for a power cut).
    pub(super) fn sync(&self, all: bool) -> Result<(), SessionError> {
        for (f, name) in [(&self.jsonl, JSONL_FILE), (&self.csv, CSV_FILE)] {
            let r = if all { f.sync_all() } else { f.sync_data() };
            r.map_err(|e| SessionError::write(&self.dir.join(name), e))?;
        }
        Ok(())
    }

    pub(super) fn update(&mut self, u: MetaUpdate) {
        match u {
            MetaUpdate::Model {
                weights,
                device,
                kernel,
            } => {
                let sha = self.hash(&weights);
                self.meta.model = Some(ModelMeta {
                    weights: weights.display().to_string(),
                    weights_sha256: sha,
                    device,
                    kernel,
                });
            }
            MetaUpdate::Bank { mut bank, file } => {
                if let Some(f) = file {
                    bank.sha256 = self.hash(&f);
                }
                // The session's classes (the CSV's columns) are the first
                // bank's; a later bank's are in its own entry, and its
                // scores fill the columns of the classes it shares.
                if !self.csv_header && !bank.classes.is_empty() {
                    self.meta.classes = bank.classes.clone();
                }
                self.meta.banks.push(bank);
            }
            MetaUpdate::Source(s) => self.meta.sources.push(s),
            MetaUpdate::Settings(v) => self.meta.settings = v,
            MetaUpdate::Video(v) => self.meta.video = Some(v),
        }
        self.write_meta();
    }

    /// The hash of `path` if known; else starts hashing it in the background.
    pub(super) fn hash(&mut self, path: &Path) -> Option<String> {
        if let Some(h) = self.hashes.get(path) {
            return h.clone();
        }
        if !path.is_file() {
            return None;
        }
        self.hashes.insert(path.to_path_buf(), None);
        self.pending_hashes += 1;
        let (tx, p) = (self.tx.clone(), path.to_path_buf());
        let started = spawn("cliper-rec-hash", move || {
            let hex = sha256_file(&p).ok();
            let _ = tx.send(DataMsg::Hashed { path: p, hex });
        });
        if started.is_err() {
            self.pending_hashes -= 1;
        }
        None
    }

    pub(super) fn hashed(&mut self, path: PathBuf, hex: Option<String>) {
        self.pending_hashes = self.pending_hashes.saturating_sub(1);
        let as_text = path.display().to_string();
        if let Some(m) = self.meta.model.as_mut().filter(|m| m.weights == as_text) {
            m.weights_sha256 = hex.clone();
        }
        for b in self.meta.banks.iter_mut().filter(|b| b.source == as_text) {
            b.sha256 = hex.clone();
        }
        self.hashes.insert(path, hex);
        self.write_meta();
    }

    pub(super) fn write_meta(&mut self) {
        self.meta.counts.frames = self.shared.frames.load(Ordering::Relaxed);
        self.meta.counts.face_rows = self.shared.face_rows.load(Ordering::Relaxed);
        self.meta.counts.video_frames = self.shared.video_frames.load(Ordering::Relaxed);
        self.meta.counts.video_frames_dropped = self.shared.video_dropped.load(Ordering::Relaxed);
        match self.meta.write(&self.dir) {
            Ok(()) => self.meta_write_failed = false,
            Err(e) => {
                self.meta_write_failed = true;
                self.fail(e);
            }
        }
    }

    pub(super) fn finish(mut self, rx: &Receiver<DataMsg>) -> Result<FinishReport, SessionError> {
        if let Some(h) = self.video_thread.take() {
            let _ = h.join();
        }
        // The video thread's last messages, and the hashes still running.
        let deadline = Instant::now() + HASH_WAIT;
        loop {
            let msg = if self.pending_hashes > 0 {
                match rx.recv_deadline(deadline) {
                    Ok(m) => m,
                    Err(_) => break,
                }
            } else {
                match rx.try_recv() {
                    Ok(m) => m,
                    Err(_) => break,
                }
            };
            match msg {
                DataMsg::Frame(r) => self.write_frame(&r),
                DataMsg::Meta(u) => self.update(*u),
                DataMsg::Hashed { path, hex } => self.hashed(path, hex),
                DataMsg::Finish => {}
            }
        }
        if let Err(e) = self.sync(true) {
            self.fail(e);
        }
        if let Some(e) = self.shared.error() {
            self.note_error(e);
        }
        let video_path = Some(self.dir.join(VIDEO_FILE)).filter(|p| self.opts.video && p.is_file());
        self.meta.status = SessionStatus::Complete;
        self.meta.ended = Some(iso8601(SystemTime::now()));
        self.write_meta();
        // The session is finished: drop the lock and its file.
        drop(self.lock.take());
        let _ = std::fs::remove_file(self.dir.join(LOCK_FILE));
        let c = &self.meta.counts;
        Ok(FinishReport {
            dir: self.dir.clone(),
            frames: c.frames,
            face_rows: c.face_rows,
            video_frames: c.video_frames,
            video_dropped: c.video_frames_dropped,
            video: video_path,
            errors: self.meta.errors.clone(),
        })
    }
}
