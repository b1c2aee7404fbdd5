//! A timeline of one load, recorded only when asked for, written after the load as Chrome
//! trace-event JSON (it opens in Perfetto and `chrome://tracing` as it is).
//!
//! Trade-offs and rules:
//! - **Off costs one thread-local look-up per hook.** Hooks are free functions ([`span`],
//!   [`instant`], [`counter`], [`complete`]) that ask the calling thread for its current
//!   trace and return at once when it has none; arguments are built by closures that are not
//!   called then, so an untraced load allocates nothing here.
//! - **On costs a `Vec` push per event.** Each thread that enters a trace ([`enter`]) gets its
//!   own buffer; events go there with no lock, and the buffer joins the trace's list once,
//!   when the thread leaves (the guard drops) or calls [`flush`]. Only code on threads that
//!   cannot enter (the object store's async tasks) records under the trace's lock, once per
//!   request, through [`Lanes`].
//! - **Loads never mix.** A trace belongs to one load: the loader makes one per load (or
//!   uses the one the caller's thread has entered, so that a caller can add its own phases,
//!   such as CUDA's start-up and the header reads), and every thread the load spawns enters
//!   it explicitly with the `Arc` handed over at the spawn. A thread with no current trace
//!   records nothing, whatever other loads run beside it.
//! - **Tracks.** Each entered thread is a track named after its role. Reads that overlap on
//!   one thread (io_uring's requests in flight) go to one track per in-flight slot, so no two
//!   spans on a track overlap and the file needs no async events. Counters of reads in flight
//!   per volume are derived from the read spans when the file is written (exact, and free
//!   while loading).
//! - Timestamps are nanoseconds from the trace's start, written as microseconds with three
//!   decimals. The start is also read on the host's clocks ([`Trace::clock`]: monotonic and
//!   real time), so that the traces of several processes on one host (`--ranks`) can be put
//!   on one time line: the monotonic clock is the same for every process of a host and never
//!   steps, where real time can (NTP); real time is kept for traces merged across hosts,
//!   where it is the only clock they share, as well as their clocks agree.

mod json;
mod verdict;

pub use json::{
    parse, parse_processes, to_json, to_json_processes, Parsed, Process, TRACE_TEXT_MAX_BYTES,
};
pub(crate) use verdict::WAITING_FOR_PIECES;
pub use verdict::{measure, verdict, Bound, Settings, Usage, Verdict, VolumeUsage};

use std::borrow::Cow;
use std::cell::RefCell;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::error::{Error, Result};

/// An argument's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A count: bytes, an offset, an index.
    U64(u64),
    /// A name: a file, a volume, a reader.
    Str(String),
}

/// What an event is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// Work over an interval (`ph: X`).
    Span {
        /// Its length.
        dur_ns: u64,
    },
    /// A moment (`ph: i`).
    Instant,
    /// A counter's new value (`ph: C`).
    Counter {
        /// The value from here on.
        value: u64,
    },
}

/// One recorded event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Span, instant or counter.
    pub kind: Kind,
    /// Nanoseconds from the trace's start.
    pub ts_ns: u64,
    /// The track (`tid`) it is drawn on.
    pub track: u32,
    /// Its category: `phase`, `read`, `copy`, `hash`, `tensor`, `staging`, `gantry`.
    pub cat: Cow<'static, str>,
    /// Its name.
    pub name: Cow<'static, str>,
    /// Its arguments (`bytes` on every event that moves bytes).
    pub args: Args,
}

impl Event {
    /// Where the event ends (its start for instants and counters).
    pub fn end_ns(&self) -> u64 {
        match self.kind {
            Kind::Span { dur_ns } => self.ts_ns.saturating_add(dur_ns),
            _ => self.ts_ns,
        }
    }

    /// The argument `key` as a number.
    pub fn u64(&self, key: &str) -> Option<u64> {
        self.args.0.iter().find(|(k, _)| k == key).and_then(|(_, v)| match v {
            Value::U64(n) => Some(*n),
            Value::Str(_) => None,
        })
    }

    /// The argument `key` as text.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.args.0.iter().find(|(k, _)| k == key).and_then(|(_, v)| match v {
            Value::Str(s) => Some(s.as_str()),
            Value::U64(_) => None,
        })
    }
}

/// An event's arguments, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Args(pub Vec<(Cow<'static, str>, Value)>);

impl Args {
    /// No arguments.
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// With `key` = `value`.
    pub fn u64(mut self, key: &'static str, value: u64) -> Self {
        self.0.push((Cow::Borrowed(key), Value::U64(value)));
        self
    }

    /// With `key` = `value`.
    pub fn str(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.0.push((Cow::Borrowed(key), Value::Str(value.into())));
        self
    }
}

/// Threads that entered a trace, in this process (a test's window on the off path).
static ENTERED: AtomicU64 = AtomicU64::new(0);

/// How many times any thread of this process entered a trace. An untraced load leaves it
/// unchanged: no thread of it entered one, so none recorded or allocated anything.
pub fn entered_count() -> u64 {
    ENTERED.load(Ordering::Relaxed)
}

/// Where a trace started on the host's clocks, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    /// `CLOCK_MONOTONIC`: the same for every process of one host.
    pub monotonic_ns: u64,
    /// `CLOCK_REALTIME`: since the Unix epoch.
    pub realtime_ns: u64,
}

/// `clock` now, in nanoseconds (0 if the kernel refuses, which it does not for these two).
fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `t` is a valid timespec for the kernel to write, and lives across the call.
    if unsafe { libc::clock_gettime(clock, &mut t) } != 0 {
        return 0;
    }
    (t.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(t.tv_nsec as u64)
}

/// The timeline of one load.
#[derive(Debug)]
pub struct Trace {
    start: Instant,
    clock: Clock,
    /// Events of threads that have left, and of [`Lanes`].
    events: Mutex<Vec<Event>>,
    /// Track names; track `t` is at `t - 1` (tid 0 is not used).
    tracks: Mutex<Vec<String>>,
}

impl Trace {
    /// An empty trace starting now.
    pub fn new() -> Arc<Self> {
        let monotonic_ns = clock_ns(libc::CLOCK_MONOTONIC);
        let start = Instant::now();
        let clock = Clock { monotonic_ns, realtime_ns: clock_ns(libc::CLOCK_REALTIME) };
        Arc::new(Self {
            start,
            clock,
            events: Mutex::new(Vec::new()),
            tracks: Mutex::new(Vec::new()),
        })
    }

    /// Where the trace started on the host's clocks (its timestamps count from there).
    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// Nanoseconds since the trace started.
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// A new track called `name`.
    pub fn track(&self, name: impl Into<String>) -> u32 {
        let mut tracks = self.tracks.lock();
        tracks.push(name.into());
        u32::try_from(tracks.len()).unwrap_or(u32::MAX)
    }

    /// Track names by tid (tid `i + 1` at `i`).
    pub fn track_names(&self) -> Vec<String> {
        self.tracks.lock().clone()
    }

    /// Records `event` under the trace's lock, for code that cannot enter the trace.
    pub fn record(&self, event: Event) {
        self.events.lock().push(event);
    }

    /// Every event recorded so far by threads that left the trace (and by this thread, if it
    /// is in this trace: its buffer is flushed first), ordered by time.
    pub fn events(self: &Arc<Self>) -> Vec<Event> {
        flush();
        let mut events = self.events.lock().clone();
        events.sort_by_key(|e| (e.ts_ns, e.track));
        events
    }

    /// Writes the trace to `path` as Chrome trace-event JSON.
    pub fn write(self: &Arc<Self>, path: &Path) -> Result<()> {
        let text = to_json(&self.events(), &self.track_names());
        std::fs::write(path, text).map_err(|source| Error::Io {
            op: "write trace",
            path: path.to_owned(),
            offset: 0,
            len: 0,
            source,
        })
    }
}

/// What a thread in a trace holds.
struct Local {
    trace: Arc<Trace>,
    track: u32,
    events: Vec<Event>,
}

thread_local! {
    static CURRENT: RefCell<Option<Local>> = const { RefCell::new(None) };
}

/// The trace the calling thread is in, to hand to the threads it spawns.
pub fn current() -> Option<Arc<Trace>> {
    CURRENT.with(|c| c.borrow().as_ref().map(|l| Arc::clone(&l.trace)))
}

/// Whether the calling thread records.
pub fn on() -> bool {
    CURRENT.with(|c| c.borrow().is_some())
}

/// The calling thread in `trace` until the guard drops, as a track called `name`. With
/// `None`, or when the thread is already in that trace, the guard does nothing.
pub fn enter(trace: Option<&Arc<Trace>>, name: &str) -> Entered {
    let Some(trace) = trace else { return Entered { previous: None, active: false } };
    let same = CURRENT.with(|c| c.borrow().as_ref().is_some_and(|l| Arc::ptr_eq(&l.trace, trace)));
    if same {
        return Entered { previous: None, active: false };
    }
    ENTERED.fetch_add(1, Ordering::Relaxed);
    let track = trace.track(name);
    let local = Local { trace: Arc::clone(trace), track, events: Vec::with_capacity(256) };
    let previous = CURRENT.with(|c| c.borrow_mut().replace(local));
    Entered { previous, active: true }
}

/// A thread's stay in a trace ([`enter`]); its events join the trace when it drops.
#[must_use = "the thread leaves the trace when this drops"]
pub struct Entered {
    previous: Option<Local>,
    active: bool,
}

impl std::fmt::Debug for Entered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entered").field("active", &self.active).finish()
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        if !self.active {
            return;
        }
        let previous = self.previous.take();
        let left = CURRENT.with(|c| std::mem::replace(&mut *c.borrow_mut(), previous));
        if let Some(mut local) = left {
            local.trace.events.lock().append(&mut local.events);
        }
    }
}

/// Moves the calling thread's buffered events into its trace (before reading it).
pub fn flush() {
    CURRENT.with(|c| {
        if let Some(local) = c.borrow_mut().as_mut() {
            local.trace.events.lock().append(&mut local.events);
        }
    });
}

/// Nanoseconds since the current trace started; `None` when the thread records nothing.
pub fn now() -> Option<u64> {
    CURRENT.with(|c| c.borrow().as_ref().map(|l| l.trace.now_ns()))
}

/// Records an event on the calling thread's buffer, on `track` (its own track when `None`).
fn push(
    kind: impl FnOnce(u64) -> (Kind, u64),
    track: Option<u32>,
    cat: &'static str,
    name: impl Into<Cow<'static, str>>,
    args: impl FnOnce() -> Args,
) {
    CURRENT.with(|c| {
        if let Some(local) = c.borrow_mut().as_mut() {
            let (kind, ts_ns) = kind(local.trace.now_ns());
            let track = track.unwrap_or(local.track);
            let (cat, name) = (Cow::Borrowed(cat), name.into());
            local.events.push(Event { kind, ts_ns, track, cat, name, args: args() });
        }
    });
}

/// A span from `begin_ns` (from [`now`]) until now, on `track` (the thread's own when
/// `None`).
pub fn complete(
    begin_ns: u64,
    track: Option<u32>,
    cat: &'static str,
    name: &'static str,
    args: impl FnOnce() -> Args,
) {
    let kind = |now: u64| (Kind::Span { dur_ns: now.saturating_sub(begin_ns) }, begin_ns);
    push(kind, track, cat, name, args);
}

/// A moment, on the calling thread's track.
pub fn instant(cat: &'static str, name: &'static str, args: impl FnOnce() -> Args) {
    push(|now| (Kind::Instant, now), None, cat, name, args);
}

/// A counter's new value.
pub fn counter(cat: &'static str, name: &'static str, value: u64) {
    push(|now| (Kind::Counter { value }, now), None, cat, name, Args::new);
}

/// A file's reader, chosen: an instant with its path, reader and page-cache residency (per
/// mille, when known), from which the verdict tells warm buffered reads from cold ones.
pub fn file_chosen(path: &Path, reader: crate::ReaderKind, resident: Option<f64>) {
    instant("gantry", "file", || {
        let args = Args::new().str("path", path.display().to_string()).str("reader", reader.name());
        match resident {
            Some(r) => args.u64("resident_permille", (r.clamp(0.0, 1.0) * 1000.0).round() as u64),
            None => args,
        }
    });
}

/// A new track in the calling thread's trace; `None` when it records nothing.
pub fn track(name: impl FnOnce() -> String) -> Option<u32> {
    CURRENT.with(|c| c.borrow().as_ref().map(|l| l.trace.track(name())))
}

/// A span on the calling thread's track from now until it drops ([`span`]).
#[must_use = "the span ends when this drops"]
#[derive(Debug)]
pub struct Span {
    begin: Option<(u64, &'static str, &'static str)>,
    args: Args,
}

/// A span called `name` from now until the returned guard drops; nothing when the thread
/// records nothing.
pub fn span(cat: &'static str, name: &'static str) -> Span {
    Span { begin: now().map(|t| (t, cat, name)), args: Args::new() }
}

impl Span {
    /// Adds arguments (built only when recording).
    pub fn args(mut self, args: impl FnOnce(Args) -> Args) -> Self {
        if self.begin.is_some() {
            self.args = args(std::mem::take(&mut self.args));
        }
        self
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some((begin, cat, name)) = self.begin.take() {
            let args = std::mem::take(&mut self.args);
            complete(begin, None, cat, name, || args);
        }
    }
}

/// Tracks for spans that overlap, recorded from threads that cannot enter a trace (async
/// tasks): each span takes a free lane (one track) while it lasts.
#[derive(Debug)]
pub struct Lanes {
    trace: Arc<Trace>,
    name: String,
    /// Per lane: its track, and whether a span holds it.
    lanes: Mutex<Vec<(u32, bool)>>,
}

/// A span holding a lane of [`Lanes`].
#[derive(Debug)]
pub struct LaneSpan {
    lane: usize,
    begin_ns: u64,
}

impl Lanes {
    /// Lanes called `name N` in `trace`.
    pub fn new(trace: Arc<Trace>, name: impl Into<String>) -> Arc<Self> {
        Arc::new(Self { trace, name: name.into(), lanes: Mutex::new(Vec::new()) })
    }

    /// Starts a span on a free lane.
    pub fn begin(&self) -> LaneSpan {
        let begin_ns = self.trace.now_ns();
        let mut lanes = self.lanes.lock();
        let lane = match lanes.iter().position(|(_, busy)| !busy) {
            Some(i) => i,
            None => {
                let track = self.trace.track(format!("{} {}", self.name, lanes.len()));
                lanes.push((track, false));
                lanes.len() - 1
            }
        };
        lanes[lane].1 = true;
        LaneSpan { lane, begin_ns }
    }

    /// Ends `span` now as an event called `name` with `args`, and frees its lane.
    pub fn end(&self, span: LaneSpan, cat: &'static str, name: &'static str, args: Args) {
        let end = self.trace.now_ns();
        let mut lanes = self.lanes.lock();
        let Some(lane) = lanes.get_mut(span.lane) else { return };
        lane.1 = false;
        let dur_ns = end.saturating_sub(span.begin_ns);
        self.trace.record(Event {
            kind: Kind::Span { dur_ns },
            ts_ns: span.begin_ns,
            track: lane.0,
            cat: Cow::Borrowed(cat),
            name: Cow::Borrowed(name),
            args,
        });
    }
}

#[cfg(test)]
mod tests;
