//! What the panels' actions do to the app: the pipeline commands, the
//! settings they change, and files dropped on the window.

use super::*;

impl CliperApp {
    pub(super) fn apply(&mut self, action: Action, ctx: &egui::Context) {
        match action {
            Action::SetSource(spec) => {
                if let SourceSpec::Camera { resolution, .. } = &spec {
                    self.settings.camera_resolution = *resolution;
                }
                self.notice = None;
                self.set_paused(false);
                self.settings.source = Some(spec.to_arg());
                self.source = spec.clone();
                self.store.source_state = crate::app::store::SourceState::Opening(spec.clone());
                if let Some(p) = &self.pipeline {
                    p.command(PipelineCommand::SetSource(spec));
                }
            }
            Action::SetBank(choice) => {
                let source = match &choice {
                    BankChoice::ZeroShot => BankSource::BuiltinZeroShot,
                    BankChoice::File(p) => bank_source(Path::new(p)),
                };
                self.pending_bank = Some(choice);
                self.opts.bank_given = false;
                if let Some(p) = &self.pipeline {
                    p.command(PipelineCommand::SetBank(source));
                }
            }
            Action::SetProbe(text) => {
                self.settings.probe = text.clone();
                if let Some(p) = &self.pipeline {
                    let t = text.trim();
                    p.command(PipelineCommand::SetProbe(
                        (!t.is_empty()).then(|| t.to_string()),
                    ));
                }
            }
            Action::SelectFace(id) => self.store.selected = Some(id),
            Action::Explain(t) => {
                self.store.explain = t;
                if let Some(p) = &self.pipeline {
                    p.command(PipelineCommand::SetExplain(t));
                }
            }
            Action::SetPaused(p) => self.set_paused(p),
            Action::SetDetector(kind) => {
                self.settings.detector = kind;
                if let Some(p) = &self.pipeline {
                    p.command(PipelineCommand::SetDetector(kind));
                }
            }
            Action::Download => self.first_run.download(ctx),
            Action::RecheckWeights => match weights::locate(self.opts.model.weights.as_deref()) {
                Ok(_) => {
                    self.first_run.missing = None;
                    self.start(ctx);
                }
                Err(e) => self.first_run.missing = Some(e.to_string()),
            },
            Action::ToggleRecording => self.toggle_recording(),
            Action::OpenSession(dir) => self.recording.open_session(&dir),
            Action::RefreshCameras => {
                if self.camera_scan.is_none() {
                    let (tx, rx) = crossbeam_channel::bounded(1);
                    let ctx = ctx.clone();
                    let spawned = std::thread::Builder::new()
                        .name("cliper-cameras".into())
                        .spawn(move || {
                            let _ = tx.send(camera::list_cameras().unwrap_or_default());
                            ctx.request_repaint();
                        });
                    if spawned.is_ok() {
                        self.camera_scan = Some(rx);
                    }
                }
            }
        }
    }

    pub(super) fn handle_dropped_files(&mut self, ctx: &egui::Context, actions: &mut Vec<Action>) {
        let dropped: Vec<PathBuf> = ctx.input(|i| {
            i.raw
                .dropped_files
                .iter()
                .map(|f| f.path().to_path_buf())
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        });
        for path in dropped {
            if weights::is_weights_file(&path) || setup::is_prompts_file(&path) {
                actions.push(Action::SetBank(BankChoice::File(
                    path.display().to_string(),
                )));
                continue;
            }
            match SourceSpec::from_path(&path, crate::vision::source::DEFAULT_IMAGE_FPS) {
                Ok(spec) => actions.push(Action::SetSource(spec)),
                Err(e) => self.store.warning = Some((e.to_string(), self.store.now())),
            }
        }
    }
}
