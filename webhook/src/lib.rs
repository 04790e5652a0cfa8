//! Palisade's admission webhook. Every check reads the pod through [`workload`] (Pods and the
//! pod templates of every workload kind) and its containers through [`pods`] (init, regular and
//! ephemeral), so no kind of object or container escapes a check.

pub mod cluster;
pub mod config;
pub mod decide;
pub mod identity;
pub mod images;
pub mod metrics;
pub mod pods;
pub mod report;
pub mod review;
pub mod scan;
pub mod secrets;
pub mod server;
pub mod tls;
pub mod workload;

/// This build's version (the crate version) and source commit (`PALISADE_COMMIT` at build time;
/// `unknown` without it), printed by `--version` and exported as the build-info metric.
pub const VERSION: (&str, &str) = (
    env!("CARGO_PKG_VERSION"),
    match option_env!("PALISADE_COMMIT") {
        Some(c) => c,
        None => "unknown",
    },
);

/// Starts the log: JSON lines on stderr, or human-readable text with `PALISADE_LOG_FORMAT=text`;
/// `RUST_LOG` filters (default `info,kube=warn`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=warn".into());
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(LogLines::stderr());
    if std::env::var("PALISADE_LOG_FORMAT").as_deref() == Ok("text") {
        log.init();
    } else {
        log.json().init();
    }
}

/// Where log lines go: a file (standard error, duplicated), each line handed to the kernel
/// whole while the request that logged it waits, as through `std::io::stderr`, but without its
/// lock: a line of at most `PIPE_BUF` bytes (which a pipe writes in one piece) is one `write`
/// under a shared lock, so the runtime's workers log side by side; a longer one takes the lock
/// alone, so no line is ever cut by another. Through `std::io::stderr`, two workers logging at
/// once made one of them sleep on the lock and be woken, for every decision they overlapped on.
pub struct LogLines {
    file: Option<std::fs::File>,
    whole: std::sync::RwLock<()>,
}

/// The size a pipe writes in one piece (POSIX `PIPE_BUF` on Linux).
const PIPE_BUF: usize = 4096;

impl LogLines {
    /// Standard error; when it cannot be duplicated (closed), lines go through
    /// `std::io::stderr`, which drops them as before.
    pub fn stderr() -> Self {
        use std::os::fd::AsFd as _;
        Self::to(
            std::io::stderr()
                .as_fd()
                .try_clone_to_owned()
                .ok()
                .map(std::fs::File::from),
        )
    }

    /// Lines into `file` (`None`: through `std::io::stderr`).
    pub fn to(file: Option<std::fs::File>) -> Self {
        Self {
            file,
            whole: std::sync::RwLock::new(()),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogLines {
    type Writer = &'a LogLines;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

impl std::io::Write for &LogLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf).map(|()| buf.len())
    }

    fn write_all(&mut self, line: &[u8]) -> std::io::Result<()> {
        let Some(mut file) = self.file.as_ref() else {
            return std::io::stderr().write_all(line);
        };
        if line.len() <= PIPE_BUF {
            let _shared = self
                .whole
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            return file.write_all(line);
        }
        let _alone = self
            .whole
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        file.write_all(line)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Why a fact could not be read from the cluster (a namespace, a Secret or ConfigMap key).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FactError {
    /// A namespace the cache does not know, with no live source to ask.
    #[error("namespace {0} is not in the webhook's cache")]
    NotCached(String),
    /// The object does not exist (`Secret ns/name`, `namespace x`).
    #[error("{0} does not exist")]
    Missing(String),
    /// The object exists without the key.
    #[error("{object} has no key {key}")]
    NoKey {
        /// `Secret ns/name` or `ConfigMap ns/name`.
        object: String,
        /// The key.
        key: String,
    },
    /// Not read yet (the refresher has not reached it).
    #[error("{0} not read yet")]
    NotReadYet(String),
    /// The API server refused or failed the read.
    #[error("cannot read {object}: {why}")]
    Api {
        /// What was read.
        object: String,
        /// The client's error.
        why: String,
    },
}

/// The guarded value even if another thread panicked while holding the lock. Every map the
/// webhook guards stays consistent between statements, and refusing to read it (an empty
/// policy list, say) would fail open.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::LogLines;

    /// Four threads log lines of 100 and 100,000 bytes at once into a pipe (where a write over
    /// `PIPE_BUF` may land in pieces): every line read back is whole, one writer's, and all of
    /// them arrive.
    #[test]
    fn lines_logged_at_once_arrive_whole() {
        let (mut reader, writer) = std::io::pipe().expect("pipe");
        let lines = LogLines::to(Some(std::fs::File::from(std::os::fd::OwnedFd::from(
            writer,
        ))));
        let drained = std::thread::spawn(move || {
            let mut all = Vec::new();
            reader.read_to_end(&mut all).expect("read");
            all
        });
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let lines = &lines;
                s.spawn(move || {
                    for i in 0..200 {
                        let len = if i % 2 == 0 { 100 } else { 100_000 };
                        let mut line = vec![b'a' + t; len];
                        line.push(b'\n');
                        (&*lines).write_all(&line).expect("write");
                    }
                });
            }
        });
        drop(lines);
        let all = drained.join().expect("reader");
        let read: Vec<&[u8]> = all
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(read.len(), 800);
        for line in read {
            assert!(
                line.len() == 100 || line.len() == 100_000,
                "a cut line: {} bytes",
                line.len()
            );
            assert!(
                line.iter().all(|b| *b == line[0]),
                "two writers' bytes in one line"
            );
        }
    }
}
