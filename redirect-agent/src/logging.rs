//! The agent's log: `tracing` events on stderr, filtered by `RUST_LOG` (default `info`), as
//! text for a person or as JSON, one object per line, for a node's log collector (which would
//! otherwise have to parse the text format's columns).

use tracing_subscriber::EnvFilter;

/// How log lines are written: `--log-format`, else `REDIRECT_LOG_FORMAT`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum LogFormat {
    /// tracing-subscriber's text lines: time, level, target, message, fields.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `fields` (with `message`), `target`,
    /// and the spans it happened in.
    Json,
}

/// Installs the process's subscriber. The same filter in both formats: only the layout of a
/// line differs, never which lines are written.
pub(crate) fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
