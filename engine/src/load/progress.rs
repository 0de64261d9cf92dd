//! Load progress: a bar when stderr is a terminal, log lines otherwise (a worker started by
//! a supervisor writes to a log, where a redrawn bar is noise).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    what: &'static str,
    total: u64,
    done: std::sync::atomic::AtomicU64,
}

impl Progress {
    pub fn new(what: &'static str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            if let Ok(style) =
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({elapsed})")
            {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(what);
            bar
        });
        if bar.is_none() {
            tracing::info!("{what}: 0/{total}");
        }
        Self {
            bar,
            what,
            total,
            done: 0.into(),
        }
    }

    pub fn inc(&self, n: u64) {
        let done = self.done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        match &self.bar {
            Some(bar) => bar.inc(n),
            // Roughly every tenth, so a big model logs ~10 lines, not thousands.
            None => {
                let step = (self.total / 10).max(1);
                if done.is_multiple_of(step) || done == self.total {
                    tracing::info!("{}: {done}/{}", self.what, self.total);
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
