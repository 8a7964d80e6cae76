//! Progress display for long steps (image builds, boots). A spinner with the latest line of
//! output on a terminal; plain `pen: ...` lines otherwise, so logs and CI stay readable.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    started: Instant,
    title: String,
}

impl Progress {
    /// Starts a step titled `title` ("building the base image").
    pub fn start(title: &str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} pen: {prefix} [{elapsed}] {wide_msg}")
                    .expect("valid template"),
            );
            bar.set_prefix(title.to_string());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        if bar.is_none() {
            eprintln!("pen: {title}...");
        }
        Progress {
            bar,
            started: Instant::now(),
            title: title.to_string(),
        }
    }

    /// Shows the latest line of the step's output.
    pub fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(text.trim().to_string()),
            None => tracing::debug!("{text}"),
        }
    }

    /// Prints a line that stays (not replaced by the next one).
    pub fn println(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    pub fn finish(self, summary: &str) {
        let secs = self.started.elapsed().as_secs_f64();
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        eprintln!("pen: {} {summary} in {secs:.1}s", self.title);
    }

    pub fn abandon(self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
