//! Rank 0's console for the W&B dashboard's Logs tab: a tracing layer copies every log
//! line the terminal shows (the progress bar's redraws are not log lines) to the W&B
//! run, stamped when it was logged. Lines logged before the run reports (start-up: the
//! resolved config, the data) wait in a bounded buffer and go first.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// Where console lines go: (text, is an error, seconds since the epoch).
pub type Sink = Arc<dyn Fn(&str, bool, f64) + Send + Sync>;

/// Lines kept while no sink is attached; past it the oldest go.
const PENDING_LINES: usize = 10_000;

#[derive(Default)]
struct Console {
    pending: VecDeque<(String, bool, f64)>,
    sink: Option<Sink>,
    /// Off until `capture` (other ranks, other commands): nothing is buffered.
    capturing: bool,
}

fn console() -> &'static Mutex<Console> {
    static CONSOLE: OnceLock<Mutex<Console>> = OnceLock::new();
    CONSOLE.get_or_init(|| Mutex::new(Console::default()))
}

fn lock() -> std::sync::MutexGuard<'static, Console> {
    console().lock().unwrap_or_else(|p| p.into_inner())
}

thread_local! {
    /// This thread is inside the sink: a line the sink logs itself is not sent again.
    static IN_SINK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Starts keeping this process's log lines for a sink to come.
pub fn capture() {
    lock().capturing = true;
}

/// Sends every line kept so far, then each new one, to `sink`.
pub fn attach(sink: Sink) {
    let mut c = lock();
    let pending: Vec<_> = c.pending.drain(..).collect();
    IN_SINK.with(|f| f.set(true));
    for (text, is_error, at) in &pending {
        sink(text, *is_error, *at);
    }
    IN_SINK.with(|f| f.set(false));
    c.sink = Some(sink);
}

/// No more lines to the sink (before the run it reports to finishes), and none kept.
pub fn detach() {
    let mut c = lock();
    c.sink = None;
    c.capturing = false;
    c.pending.clear();
}

fn emit(text: String, is_error: bool) {
    if IN_SINK.with(|f| f.get()) {
        return;
    }
    let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let mut c = lock();
    if let Some(sink) = c.sink.clone() {
        IN_SINK.with(|f| f.set(true));
        sink(&text, is_error, at);
        IN_SINK.with(|f| f.set(false));
    } else if c.capturing {
        if c.pending.len() == PENDING_LINES {
            c.pending.pop_front();
        }
        c.pending.push_back((text, is_error, at));
    }
}

/// The tracing layer; filter it as the terminal's layer is filtered.
pub struct ConsoleLayer;

impl<S: Subscriber> Layer<S> for ConsoleLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        emit(line_of(level, event), level == Level::ERROR);
    }
}

/// The line as the terminal shows it: the level, the message, then other fields.
fn line_of(level: Level, event: &Event<'_>) -> String {
    let mut fields = Fields::default();
    event.record(&mut fields);
    format!("{level} {}{}", fields.message, fields.rest)
}

#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn lines_before_the_sink_wait_then_every_line_reaches_it_once() {
        let got: Arc<Mutex<Vec<(String, bool)>>> = Arc::default();
        let subscriber = tracing_subscriber::registry().with(ConsoleLayer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("before capture");
            capture();
            tracing::info!("resolved config:\n  a: 1");
            let g = got.clone();
            attach(Arc::new(move |text, is_error, at| {
                assert!(at > 1.7e9);
                g.lock().unwrap().push((text.to_string(), is_error));
                // A line the sink itself logs does not come back to it.
                tracing::warn!("from inside the sink");
            }));
            tracing::warn!(rank = 1, "slow");
            tracing::error!("failed: {}", "disk full");
            detach();
            tracing::info!("after detach");
        });
        let got = got.lock().unwrap().clone();
        assert_eq!(
            got,
            [
                ("INFO resolved config:\n  a: 1".to_string(), false),
                ("WARN slow rank=1".to_string(), false),
                ("ERROR failed: disk full".to_string(), true)
            ]
        );
    }
}
