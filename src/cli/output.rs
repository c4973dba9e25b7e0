//! How every command writes: text or one JSON document on stdout, progress
//! on stderr only for a person at a terminal.

use std::io::IsTerminal;

/// Writes command output; a closed pipe (`| head`) is not an error.
pub(super) fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => Err(err.into()),
        _ => Ok(()),
    }
}

/// Writes `value` as one pretty-printed JSON document.
pub(super) fn emit_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    emit(&(serde_json::to_string_pretty(value)? + "\n"))
}

/// Whether stderr may draw: a terminal that is not `TERM=dumb`, and no
/// `NO_COLOR` (no-color.org).
pub(super) fn decorated() -> bool {
    std::io::stderr().is_terminal()
        && std::env::var("TERM").map_or(true, |term| term != "dumb")
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty())
}

/// A progress bar for a long operation, drawn on stderr only when
/// [`decorated`]: piped or logged output gets the command's lines alone.
pub(super) fn progress(len: usize, what: &'static str) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let target = if decorated() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(len as u64), target);
    if let Ok(style) = ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} {elapsed}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what);
    bar
}
