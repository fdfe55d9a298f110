//! The progress bars of downloads, runs, training and explanation maps: one
//! look for all of them.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` steps drawn by `template` (indicatif's syntax), `message`
/// as its `{msg}`.
pub fn bar(len: u64, template: &str, message: impl Into<String>) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(message.into());
    pb
}
