//! Progress of long waits for people: a spinner while `submit --wait` waits, a byte bar
//! while an artifact downloads. Drawn (on stderr, by `indicatif`) only in table format
//! when both stdout and stderr are terminals; otherwise nothing is drawn and the plain
//! lines scripts and tests read stay exactly as they are. (`workflow watch` draws its own
//! live tree of nodes on a terminal, one line per change otherwise.)

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use scabbard_common::client::artifacts::ArtifactSink;

/// Whether progress is drawn at all.
pub(crate) fn enabled() -> bool {
    !crate::render::structured()
        && std::io::stdout().is_terminal()
        && std::io::stderr().is_terminal()
}

/// A spinner saying `message` and the time elapsed, or `None` when not drawing.
pub(crate) fn spinner(message: String) -> Option<ProgressBar> {
    if !enabled() {
        return None;
    }
    let bar = ProgressBar::new_spinner().with_message(message);
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(120));
    Some(bar)
}

/// A byte bar for a transfer of `total` bytes named `name`, or `None`.
pub(crate) fn bytes(name: &str, total: u64) -> Option<ProgressBar> {
    if !enabled() {
        return None;
    }
    let bar = ProgressBar::new(total).with_message(crate::printable::printable(name).into_owned());
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    Some(bar)
}

/// An artifact sink that advances `bar` by what passes through it.
pub(crate) struct Counted<'a, S> {
    pub(crate) inner: &'a mut S,
    pub(crate) bar: Option<ProgressBar>,
}

impl<S: ArtifactSink> ArtifactSink for Counted<'_, S> {
    async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.inner.write(data).await?;
        if let Some(bar) = &self.bar {
            bar.inc(data.len() as u64);
        }
        Ok(())
    }

    async fn restart(&mut self) -> std::io::Result<()> {
        if let Some(bar) = &self.bar {
            bar.set_position(0);
        }
        self.inner.restart().await
    }

    async fn finish(&mut self) -> std::io::Result<()> {
        self.inner.finish().await
    }
}
