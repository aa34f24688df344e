//! Log forwarding: the app installs a `LogSink` and gets the core's `tracing` events at or
//! above a level (a warning about a failed replica, a retried session), one call per event,
//! instead of nowhere. The first `set_log_sink` installs Veil's forwarding subscriber as the
//! process's global one; if the host process installed its own first, the sink gets nothing
//! and `set_log_sink` says so with `false`.

use std::fmt::Write as _;
use std::sync::{Arc, OnceLock, RwLock};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// How much to forward.
#[derive(uniffi::Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    fn of(level: &Level) -> Self {
        match *level {
            Level::ERROR => Self::Error,
            Level::WARN => Self::Warn,
            Level::INFO => Self::Info,
            Level::DEBUG => Self::Debug,
            Level::TRACE => Self::Trace,
        }
    }

    /// Whether an event of `self` passes a filter at `at` (Error is the most severe).
    fn passes(self, at: LogLevel) -> bool {
        (self as u8) <= (at as u8)
    }
}

/// Receives log lines; called from Veil's threads, so keep it quick and thread-safe.
#[uniffi::export(with_foreign)]
pub trait LogSink: Send + Sync {
    /// `target`: the Rust module that logged (e.g. `veil_core::transport::replicas`);
    /// `message`: the message and its fields (`key=value`).
    fn log(&self, level: LogLevel, target: String, message: String);
}

type Installed = RwLock<Option<(Arc<dyn LogSink>, LogLevel)>>;

fn sink() -> &'static Installed {
    static SINK: OnceLock<Installed> = OnceLock::new();
    SINK.get_or_init(|| RwLock::new(None))
}

/// Forwards `level` and above to `sink` (None: stop forwarding). Returns whether Veil's
/// subscriber is the process's (false: another was installed first; nothing is forwarded).
#[uniffi::export]
pub fn set_log_sink(sink_to: Option<Arc<dyn LogSink>>, level: LogLevel) -> bool {
    static OURS: OnceLock<bool> = OnceLock::new();
    let ours = *OURS.get_or_init(|| {
        let subscriber = tracing_subscriber::registry().with(Forward);
        tracing::subscriber::set_global_default(subscriber).is_ok()
    });
    if let Ok(mut s) = sink().write() {
        *s = sink_to.map(|k| (k, level));
    }
    ours
}

struct Forward;

impl Forward {
    fn level() -> Option<LogLevel> {
        sink().read().ok().and_then(|s| s.as_ref().map(|(_, l)| *l))
    }
}

impl<S: Subscriber> Layer<S> for Forward {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> tracing::subscriber::Interest {
        // The level can change at run time: ask `enabled` every time.
        tracing::subscriber::Interest::sometimes()
    }

    fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
        Self::level().is_some_and(|at| LogLevel::of(metadata.level()).passes(at))
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let Some((sink, at)) = sink().read().ok().and_then(|s| s.clone()) else {
            return;
        };
        let level = LogLevel::of(event.metadata().level());
        if !level.passes(at) {
            return;
        }
        let mut text = Text::default();
        event.record(&mut text);
        sink.log(level, event.metadata().target().to_string(), text.0);
    }
}

/// The message first, then `key=value` for the other fields.
#[derive(Default)]
struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let rest = std::mem::take(&mut self.0);
            let _ = write!(self.0, "{value:?}");
            if !rest.is_empty() {
                self.0.push(' ');
                self.0.push_str(&rest);
            }
        } else {
            if !self.0.is_empty() {
                self.0.push(' ');
            }
            let _ = write!(self.0, "{}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Lines(Mutex<Vec<(LogLevel, String, String)>>);

    impl LogSink for Lines {
        fn log(&self, level: LogLevel, target: String, message: String) {
            if let Ok(mut l) = self.0.lock() {
                l.push((level, target, message));
            }
        }
    }

    #[test]
    fn events_at_or_above_the_level_reach_the_sink() {
        let lines = Arc::new(Lines::default());
        assert!(set_log_sink(Some(lines.clone()), LogLevel::Warn));
        tracing::info!("not forwarded");
        tracing::warn!(strip = 1, "replica failed");
        tracing::error!(target: "veil_core::x", "broken");
        set_log_sink(None, LogLevel::Trace);
        tracing::error!("after removal");
        let got = lines.0.lock().map(|l| l.clone()).unwrap_or_default();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].0, LogLevel::Warn);
        assert_eq!(got[0].2, "replica failed strip=1");
        assert_eq!(
            got[1],
            (LogLevel::Error, "veil_core::x".into(), "broken".into())
        );
    }
}
