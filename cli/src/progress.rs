//! Progress for long operations: a spinner with elapsed time on a terminal,
//! plain lines (only when the status changes) when stderr is a pipe or file,
//! so logs stay readable.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    last: Option<String>,
    started: Instant,
}

impl Progress {
    /// Starts showing `label` on stderr.
    pub fn start(label: impl Into<String>) -> Self {
        let label = label.into();
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("static template is valid"),
            );
            bar.set_message(label.clone());
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        Self { bar, label, last: None, started: Instant::now() }
    }

    /// Shows the current status; repeated statuses print nothing new.
    pub fn status(&mut self, status: &str) {
        if self.last.as_deref() == Some(status) {
            return;
        }
        self.last = Some(status.to_string());
        match &self.bar {
            Some(bar) => bar.set_message(format!("{}: {status}", self.label)),
            None => eprintln!("{}: {status} ({:.1}s)", self.label, self.started.elapsed().as_secs_f64()),
        }
    }

    /// Removes the spinner so the result prints on a clean line.
    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}
