//! Where log lines go: each thread appends its lines to a buffer of its own, and a buffer is
//! written out (one `write` for all its lines) once it holds [`FLUSH_BYTES`], or at most
//! [`FLUSH_AFTER`] after its first line, whichever comes first; [`flush`] writes every buffer at
//! once (at exit, and before a panic's message).
//!
//! Under load this turns one system call per admission decision into one per few dozen, and no
//! thread waits for another's write; a line still reaches standard error within
//! [`FLUSH_AFTER`]. Lines of one thread keep their order; lines of different threads are
//! interleaved by buffer, not by time (each line has its timestamp). A process killed outright
//! (`SIGKILL`, the OOM killer) loses the lines of its last [`FLUSH_AFTER`].

use std::{
    cell::RefCell,
    io::{self, Write},
    sync::{
        Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, Weak,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

/// The longest a line waits in its thread's buffer.
pub const FLUSH_AFTER: Duration = Duration::from_millis(50);
/// A buffer holding this many bytes is written at once, by the thread that filled it.
pub const FLUSH_BYTES: usize = 16 * 1024;

type Buffer = Arc<Mutex<Vec<u8>>>;

/// A log line writer (a `tracing_subscriber` `MakeWriter`) over `sink`; clones share the buffers.
#[derive(Clone)]
pub struct Lines {
    id: usize,
    shared: Arc<Shared>,
}

struct Shared {
    sink: Mutex<Box<dyn Write + Send>>,
    /// Every thread's buffer. Locks are taken in the order list, buffer, sink.
    buffers: Mutex<Vec<Buffer>>,
    /// Whether the flusher has a round to do: set by the line that makes a buffer non-empty.
    scheduled: AtomicBool,
    /// Set when there is no flusher: every line is written at once.
    direct: AtomicBool,
    due: Mutex<()>,
    wake: Condvar,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

thread_local! {
    /// This thread's buffer of each [`Lines`] it has written to, by id.
    static MINE: RefCell<Vec<(usize, Buffer)>> = const { RefCell::new(Vec::new()) };
}

impl Lines {
    /// Lines written to `sink`, with a thread of their own that writes out what waited
    /// [`FLUSH_AFTER`]; the thread ends when the last clone is dropped.
    pub fn new(sink: impl Write + Send + 'static) -> Self {
        static IDS: AtomicUsize = AtomicUsize::new(0);
        let shared = Arc::new(Shared {
            sink: Mutex::new(Box::new(sink)),
            buffers: Mutex::new(Vec::new()),
            scheduled: AtomicBool::new(false),
            direct: AtomicBool::new(false),
            due: Mutex::new(()),
            wake: Condvar::new(),
        });
        let weak = Arc::downgrade(&shared);
        // Without the thread the lines would wait for a full buffer: write each one at once.
        let spawned = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || flusher(&weak));
        if spawned.is_err() {
            shared.direct.store(true, Ordering::Relaxed);
        }
        Self {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            shared,
        }
    }

    /// Appends `line` to this thread's buffer, writing the buffer out when it is full.
    fn append(&self, line: &[u8]) {
        let appended = MINE.try_with(|mine| {
            let mut mine = mine.borrow_mut();
            let buffer = if let Some((_, b)) = mine.iter().find(|(id, _)| *id == self.id) {
                Arc::clone(b)
            } else {
                let b = Buffer::default();
                lock(&self.shared.buffers).push(Arc::clone(&b));
                mine.push((self.id, Arc::clone(&b)));
                b
            };
            drop(mine);
            let mut held = lock(&buffer);
            let first = held.is_empty();
            held.extend_from_slice(line);
            if held.len() >= FLUSH_BYTES || self.shared.direct.load(Ordering::Relaxed) {
                self.shared.write_out(&mut held);
            } else if first {
                drop(held);
                self.shared.schedule();
            }
        });
        // A line logged while this thread's storage is being torn down: after the lines this
        // thread (and every other) gathered before it.
        if appended.is_err() {
            self.shared.flush_all();
            self.shared.write_out(&mut line.to_vec());
        }
    }

    /// Writes every thread's buffered lines now.
    pub fn flush(&self) {
        self.shared.flush_all();
    }
}

impl Shared {
    fn schedule(&self) {
        if !self.scheduled.swap(true, Ordering::AcqRel) {
            let _due = lock(&self.due);
            self.wake.notify_one();
        }
    }

    fn write_out(&self, held: &mut Vec<u8>) {
        let mut sink = lock(&self.sink);
        // Nowhere to report a failed write to the log: the gathered lines are dropped, as a
        // closed standard error would drop each of them.
        let _ = sink.write_all(held).and_then(|()| sink.flush());
        held.clear();
        // One very long line does not keep its memory for the thread's life.
        if held.capacity() > 4 * FLUSH_BYTES {
            held.shrink_to(FLUSH_BYTES);
        }
    }

    fn flush_all(&self) {
        let buffers = lock(&self.buffers).clone();
        for b in &buffers {
            let mut held = lock(b);
            if !held.is_empty() {
                self.write_out(&mut held);
            }
        }
        drop(buffers);
        // A buffer only this list holds belongs to a thread that has ended, and is empty now.
        lock(&self.buffers).retain(|b| Arc::strong_count(b) > 1 || !lock(b).is_empty());
    }
}

/// The last writer gone: what every thread gathered is written.
impl Drop for Shared {
    fn drop(&mut self) {
        self.flush_all();
    }
}

fn flusher(shared: &Weak<Shared>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        {
            let mut due = lock(&s.due);
            while !s.scheduled.load(Ordering::Acquire) {
                let (d, timeout) = s
                    .wake
                    .wait_timeout(due, Duration::from_secs(1))
                    .unwrap_or_else(PoisonError::into_inner);
                due = d;
                // Nothing to do for a while: see whether the writer is still there.
                if timeout.timed_out() && Arc::strong_count(&s) == 1 {
                    return;
                }
            }
        }
        drop(s);
        std::thread::sleep(FLUSH_AFTER);
        let Some(s) = shared.upgrade() else { return };
        s.scheduled.store(false, Ordering::Release);
        s.flush_all();
    }
}

/// One event's writer.
pub struct Line<'a>(&'a Lines);

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Lines {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Line(self)
    }
}

static STDERR: OnceLock<Lines> = OnceLock::new();

/// The process's log writer, over standard error.
pub fn stderr() -> Lines {
    STDERR.get_or_init(|| Lines::new(io::stderr())).clone()
}

/// Writes the lines every thread has buffered for standard error.
pub fn flush() {
    if let Some(l) = STDERR.get() {
        l.flush();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// A sink the test reads back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(lock(&self.0).clone()).expect("utf-8")
        }
    }

    fn write(lines: &Lines, text: &str) {
        use tracing_subscriber::fmt::MakeWriter as _;
        lines
            .make_writer()
            .write_all(text.as_bytes())
            .expect("write");
    }

    /// Waits (a bounded time) for `sink` to hold `text`.
    fn arrives(sink: &Sink, text: &str) {
        let started = Instant::now();
        while !sink.text().contains(text) {
            assert!(
                started.elapsed() < FLUSH_AFTER * 40,
                "{text:?} was not written within {:?}",
                FLUSH_AFTER * 40
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_line_reaches_the_sink_without_a_flush() {
        let sink = Sink::default();
        let lines = Lines::new(sink.clone());
        write(&lines, "one\n");
        arrives(&sink, "one\n");
        // And the next one, after a round has been made.
        write(&lines, "two\n");
        arrives(&sink, "one\ntwo\n");
    }

    #[test]
    fn the_last_writer_gone_what_waits_is_written() {
        let sink = Sink::default();
        let lines = Lines::new(sink.clone());
        std::thread::spawn({
            let lines = lines.clone();
            move || write(&lines, "from a thread that ended\n")
        })
        .join()
        .expect("writer");
        write(&lines, "waiting\n");
        drop(lines);
        arrives(&sink, "waiting\n");
        arrives(&sink, "from a thread that ended\n");
    }

    #[test]
    fn every_line_of_every_thread_is_written_once_in_its_threads_order() {
        let sink = Sink::default();
        let lines = Lines::new(sink.clone());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let lines = lines.clone();
                std::thread::spawn(move || {
                    // Enough to fill the buffer several times over.
                    for i in 0..3_000 {
                        write(&lines, &format!("thread {t} line {i:05} padding padding\n"));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("writer");
        }
        lines.flush();
        let text = sink.text();
        for t in 0..4 {
            let mine: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("thread {t} line ")))
                .map(|l| l[..5].parse().expect("number"))
                .collect();
            assert_eq!(mine, (0..3_000).collect::<Vec<_>>(), "thread {t}");
        }
        assert_eq!(
            text.lines().count(),
            12_000,
            "no line torn, lost or doubled"
        );
    }

    #[test]
    fn a_flush_writes_what_waits() {
        let sink = Sink::default();
        let lines = Lines::new(sink.clone());
        write(&lines, "waiting\n");
        lines.flush();
        assert_eq!(sink.text(), "waiting\n");
    }
}
