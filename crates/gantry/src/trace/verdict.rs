//! What bound a load, from its own timeline and the ceilings it knew.
//!
//! The pipeline is readers -> staging ring -> consumer (host copies, queued device copies,
//! hashing) -> the ring again. A stage that cannot keep up shows in two places: its own
//! busy time, and the ring. When the ring is full most of the load, readers waited for
//! buffers: a stage after the ring bound it (the busiest of host copy, device copy and
//! hashing). Otherwise readers were what the load waited on: direct reads in flight on the
//! volumes mean storage; buffered reads of files the page cache held are memory copies
//! (`host copy`), of files it did not, storage; GETs in flight mean the network. When no
//! stage was busy half of the load, the load waited on none of them: `cpu` (the consumer's
//! own work, or set-up between stages).
//!
//! A cooperative rank adds the exchange: its exchanger's `exchange` spans (connecting,
//! each round's status exchange and broadcasts, the wait for the last ones) other than its
//! waits for this rank's own pieces. Its load lasts until the exchange ends, so the window
//! runs from the first `load` phase to the later of the last phase's end and the exchange's.
//! The exchange bound the load when it was at work most of that window while the readers were
//! not (they were waiting on it), and no stage after the ring was busier: it trails the reads,
//! so a busy exchange beside busy readers is the readers' load. No setting moves it (NVLink
//! or the network between the GPUs is what it is; `--piece-mib` only changes the rounds'
//! grain), so none is named.
//!
//! [`measure`] turns events into fractions of the load ([`Usage`]); [`verdict`] is a pure
//! function of those, table-tested; both run the same on a live load and on a file read back
//! with [`super::parse`], so `gantry trace summarize` and `--explain` agree by construction.

use std::collections::BTreeMap;

use super::{Event, Kind};

/// The exchanger's span while it waits for its own rank's readers (`coop::rounds`): the
/// exchange idle, not at work.
pub(crate) const WAITING_FOR_PIECES: &str = "waiting for pieces";

/// A stage is "busy" when it worked at least this fraction of the load.
const BUSY: f64 = 0.5;

/// The ceilings a load knew, from its `settings` event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    /// Direct volumes: name and reads in flight allowed.
    pub volumes: Vec<(String, u64)>,
    /// Buffered reader threads.
    pub threads: u64,
    /// Whether every buffered file was read because the page cache held it.
    pub warm: bool,
    /// Staging slots (0: nothing staged).
    pub staging_slots: u64,
    /// Object GETs in flight allowed.
    pub object_concurrency: u64,
}

impl Settings {
    /// As the `settings` event's arguments.
    pub fn args(&self) -> super::Args {
        let volumes: Vec<String> = self.volumes.iter().map(|(n, d)| format!("{n}:{d}")).collect();
        super::Args::new()
            .str("volumes", volumes.join(","))
            .u64("threads", self.threads)
            .u64("warm", u64::from(self.warm))
            .u64("staging_slots", self.staging_slots)
            .u64("object_concurrency", self.object_concurrency)
    }

    fn from_event(e: &Event) -> Self {
        let volumes = e.str("volumes").unwrap_or("");
        let volumes = volumes
            .split(',')
            .filter_map(|v| v.rsplit_once(':'))
            .filter_map(|(n, d)| Some((n.to_owned(), d.parse().ok()?)))
            .collect();
        Settings {
            volumes,
            threads: e.u64("threads").unwrap_or(0),
            warm: e.u64("warm") == Some(1),
            staging_slots: e.u64("staging_slots").unwrap_or(0),
            object_concurrency: e.u64("object_concurrency").unwrap_or(0),
        }
    }
}

/// One direct volume over the load.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VolumeUsage {
    /// Its name.
    pub name: String,
    /// Reads in flight allowed.
    pub depth: u64,
    /// Fraction of the load with a read in flight.
    pub busy: f64,
    /// Fraction of the load with `depth` reads in flight.
    pub full: f64,
    /// Reads, and their bytes.
    pub reads: u64,
    /// Bytes read.
    pub bytes: u64,
}

/// Each stage's share of the load, from its events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    /// The load's length (its `load` phase).
    pub window_ns: u64,
    /// The ceilings.
    pub settings: Settings,
    /// Direct volumes.
    pub volumes: Vec<VolumeUsage>,
    /// Buffered reads: summed time over threads, as a fraction of `threads` x the load.
    pub buffered: Option<f64>,
    /// Object GETs: fraction of the load with one in flight, and with the most allowed.
    pub objects: Option<(f64, f64)>,
    /// Fraction of the load with every staging slot taken.
    pub staging_full: f64,
    /// Host copies (the consumer's): fraction of the load.
    pub host_copy: Option<f64>,
    /// Device copies per GPU: fraction of the load with a copy queued or running.
    pub device_copy: Vec<(u64, f64)>,
    /// Hashing: summed time over its threads, as a fraction of threads x the load.
    pub hashing: Option<(u64, f64)>,
    /// Bytes of all read spans.
    pub read_bytes: u64,
    /// A cooperative rank's exchange: fraction of the load at work, and bytes broadcast.
    pub exchange: Option<(f64, u64)>,
}

/// Time within `[0, window)` covered by at least `k` of `spans` (start, end), as a
/// fraction of the window.
fn covered(spans: &[(u64, u64)], window: (u64, u64), k: u64) -> f64 {
    let (w0, w1) = window;
    if w1 <= w0 || k == 0 {
        return 0.0;
    }
    let mut edges: Vec<(u64, i64)> = Vec::with_capacity(2 * spans.len());
    for &(a, b) in spans {
        let (a, b) = (a.clamp(w0, w1), b.clamp(w0, w1));
        if b > a {
            edges.push((a, 1));
            edges.push((b, -1));
        }
    }
    edges.sort_unstable();
    let (mut level, mut last, mut total) = (0i64, w0, 0u64);
    for (t, d) in edges {
        if level >= k as i64 {
            total += t - last;
        }
        level += d;
        last = t;
    }
    total as f64 / (w1 - w0) as f64
}

/// Summed length of `spans` within the window over `lanes` x the window.
fn summed(spans: &[(u64, u64)], window: (u64, u64), lanes: u64) -> f64 {
    let (w0, w1) = window;
    if w1 <= w0 || lanes == 0 {
        return 0.0;
    }
    let sum: u64 = spans.iter().map(|&(a, b)| b.clamp(w0, w1) - a.clamp(w0, w1)).sum();
    sum as f64 / ((w1 - w0) as f64 * lanes as f64)
}

/// Time with a counter at `at_least` or more, as a fraction of the window.
fn counter_at(samples: &[(u64, u64)], window: (u64, u64), at_least: u64) -> f64 {
    let mut spans = Vec::new();
    for (i, &(t, v)) in samples.iter().enumerate() {
        let until = samples.get(i + 1).map_or(window.1, |s| s.0);
        if v >= at_least {
            spans.push((t, until));
        }
    }
    covered(&spans, window, 1)
}

fn span_of(e: &Event) -> Option<(u64, u64)> {
    matches!(e.kind, Kind::Span { .. }).then(|| (e.ts_ns, e.end_ns()))
}

/// The ceilings recorded in `events`, with `warm` from the files' own events.
fn settings_of(events: &[Event]) -> Settings {
    let mut settings = events
        .iter()
        .find(|e| e.cat == "gantry" && e.name == "settings")
        .map(Settings::from_event)
        .unwrap_or_default();
    let buffered_files: Vec<&Event> = events
        .iter()
        .filter(|e| e.cat == "gantry" && e.name == "file" && e.str("reader") == Some("buffered"))
        .collect();
    if !buffered_files.is_empty() {
        // Warm: every buffered file was mostly in the page cache when it was chosen.
        settings.warm =
            buffered_files.iter().all(|e| e.u64("resident_permille").is_some_and(|r| r >= 500));
    }
    settings
}

/// Each stage's share of the load recorded in `events`; `None` when they hold no `load`
/// phase (not a load's trace).
pub fn measure(events: &[Event]) -> Option<Usage> {
    let loads = events.iter().filter(|e| e.cat == "phase" && e.name == "load");
    let (start, mut end) = loads.filter_map(span_of).reduce(|a, b| (a.0.min(b.0), a.1.max(b.1)))?;
    let exchange: Vec<(u64, u64)> = events
        .iter()
        .filter(|e| e.cat == "exchange" && e.name != WAITING_FOR_PIECES)
        .filter_map(span_of)
        .collect();
    end = exchange.iter().map(|s| s.1).fold(end, u64::max);
    let window = (start, end);
    let settings = settings_of(events);
    let mut usage =
        Usage { window_ns: window.1 - window.0, settings: settings.clone(), ..Usage::default() };
    let volume = |(name, depth): &(String, u64)| VolumeUsage {
        name: name.clone(),
        depth: *depth,
        ..Default::default()
    };
    usage.volumes = settings.volumes.iter().map(volume).collect();
    let mut by_volume: BTreeMap<&str, Vec<(u64, u64)>> = BTreeMap::new();
    let (mut buffered, mut objects, mut host, mut hash) = (vec![], vec![], vec![], vec![]);
    let mut devices: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    let mut staging = Vec::new();
    let mut hash_threads = std::collections::BTreeSet::new();
    let mut exchanged = 0;
    for e in events {
        let Some(span) = span_of(e) else {
            if e.cat == "staging" {
                if let Kind::Counter { value } = e.kind {
                    staging.push((e.ts_ns, value));
                }
            }
            continue;
        };
        match (&*e.cat, &*e.name) {
            ("read", _) => {
                let bytes = e.u64("bytes").unwrap_or(0);
                usage.read_bytes += bytes;
                match e.str("reader") {
                    Some("buffered") => buffered.push(span),
                    Some("object") => objects.push(span),
                    _ => {
                        let name = e.str("volume").unwrap_or("");
                        by_volume.entry(name).or_default().push(span);
                        let v = match usage.volumes.iter().position(|v| v.name == name) {
                            Some(i) => &mut usage.volumes[i],
                            None => {
                                let v = VolumeUsage {
                                    name: name.into(),
                                    depth: 1,
                                    ..Default::default()
                                };
                                usage.volumes.push(v);
                                usage.volumes.last_mut().expect("just pushed")
                            }
                        };
                        v.reads += 1;
                        v.bytes += bytes;
                    }
                }
            }
            ("copy", "host copy") => host.push(span),
            ("copy", "device copy") => {
                devices.entry(e.u64("gpu").unwrap_or(0)).or_default().push(span)
            }
            ("hash", _) => {
                hash.push(span);
                hash_threads.insert(e.track);
            }
            ("exchange", "broadcast") => exchanged += e.u64("bytes").unwrap_or(0),
            _ => {}
        }
    }
    for v in &mut usage.volumes {
        let spans = by_volume.get(v.name.as_str()).map_or(&[][..], Vec::as_slice);
        v.busy = covered(spans, window, 1);
        v.full = covered(spans, window, v.depth.max(1));
    }
    if !buffered.is_empty() {
        usage.buffered = Some(summed(&buffered, window, settings.threads.max(1)));
    }
    if !objects.is_empty() {
        let most = settings.object_concurrency.max(1);
        usage.objects = Some((covered(&objects, window, 1), covered(&objects, window, most)));
    }
    if settings.staging_slots > 0 {
        usage.staging_full = counter_at(&staging, window, settings.staging_slots);
    }
    usage.host_copy = (!host.is_empty()).then(|| summed(&host, window, 1));
    usage.device_copy = devices.iter().map(|(g, s)| (*g, covered(s, window, 1))).collect();
    if !hash.is_empty() {
        let threads = hash_threads.len() as u64;
        usage.hashing = Some((threads, summed(&hash, window, threads)));
    }
    if !exchange.is_empty() {
        usage.exchange = Some((covered(&exchange, window, 1), exchanged));
    }
    Some(usage)
}

/// What bound a load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// Reads from local storage.
    Storage,
    /// Object GETs.
    Network,
    /// Copies in host memory (page cache to memory, staging to destination).
    HostCopy,
    /// Host-to-device copies.
    DeviceCopy,
    /// SHA-256 hashing.
    Hashing,
    /// Exchanges between ranks.
    Exchange,
    /// None of the stages: the consumer's own work or set-up between them.
    Cpu,
}

impl Bound {
    /// Its name in the verdict line.
    pub fn name(self) -> &'static str {
        match self {
            Bound::Storage => "storage",
            Bound::Network => "network",
            Bound::HostCopy => "host copy",
            Bound::DeviceCopy => "device copy",
            Bound::Hashing => "hashing",
            Bound::Exchange => "exchange",
            Bound::Cpu => "cpu",
        }
    }
}

/// A verdict: what bound the load, the evidence, and the setting that would move it.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The stage.
    pub bound: Bound,
    /// The figures behind it, comma-separated.
    pub evidence: String,
    /// The option that would move it, where one exists.
    pub setting: Option<&'static str>,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bound by {}: {}", self.bound.name(), self.evidence)?;
        match self.setting {
            Some(s) => write!(f, "; try {s}"),
            None => Ok(()),
        }
    }
}

fn pct(x: f64) -> String {
    format!("{:.0}%", (x * 100.0).clamp(0.0, 100.0))
}

/// The evidence line: every stage that took part, in pipeline order.
fn evidence(u: &Usage) -> Vec<String> {
    let mut out = Vec::new();
    if !u.volumes.is_empty() {
        let n = u.volumes.iter().filter(|v| v.busy >= BUSY).count();
        let mean = u.volumes.iter().map(|v| v.busy).sum::<f64>() / u.volumes.len() as f64;
        let full = u.volumes.iter().map(|v| v.full).sum::<f64>() / u.volumes.len() as f64;
        out.push(format!(
            "reads in flight {} of the load on {n} of {} volumes (at full depth {})",
            pct(mean),
            u.volumes.len(),
            pct(full)
        ));
    }
    if let Some(b) = u.buffered {
        let from = if u.settings.warm { "page cache" } else { "storage" };
        out.push(format!(
            "buffered reads ({from}) busy {} of {} threads",
            pct(b),
            u.settings.threads
        ));
    }
    if let Some((busy, full)) = u.objects {
        out.push(format!(
            "GETs in flight {} of the load ({} at {} at once)",
            pct(busy),
            pct(full),
            u.settings.object_concurrency
        ));
    }
    if u.settings.staging_slots > 0 {
        out.push(match u.staging_full {
            f if f < 0.005 => "staging never full".to_owned(),
            f => format!("staging full {}", pct(f)),
        });
    }
    if let Some(h) = u.host_copy {
        out.push(format!("host copies busy {}", pct(h)));
    }
    for (gpu, busy) in &u.device_copy {
        out.push(format!("copy engine of GPU {gpu} busy {}", pct(*busy)));
    }
    if let Some((threads, busy)) = u.hashing {
        out.push(format!("hashing busy {} of {threads} threads", pct(busy)));
    }
    if let Some((busy, bytes)) = u.exchange {
        out.push(format!("exchange busy {} ({bytes} bytes broadcast)", pct(busy)));
    }
    out
}

/// What bound the load measured by `u` (see the module's rules).
pub fn verdict(u: &Usage) -> Verdict {
    let mean_volumes = (!u.volumes.is_empty())
        .then(|| u.volumes.iter().map(|v| v.busy).sum::<f64>() / u.volumes.len() as f64);
    let mut upstream: Vec<(Bound, f64, Option<&'static str>)> = Vec::new();
    if let Some(busy) = mean_volumes {
        upstream.push((Bound::Storage, busy, Some("--queue-depth")));
    }
    if let Some(b) = u.buffered {
        let bound = if u.settings.warm { Bound::HostCopy } else { Bound::Storage };
        upstream.push((bound, b, Some("--threads")));
    }
    if let Some((busy, _)) = u.objects {
        upstream.push((Bound::Network, busy, Some("--object-concurrency")));
    }
    let mut downstream: Vec<(Bound, f64, Option<&'static str>)> = Vec::new();
    if let Some(h) = u.host_copy {
        downstream.push((Bound::HostCopy, h, None));
    }
    if let Some(d) = u.device_copy.iter().map(|d| d.1).reduce(f64::max) {
        downstream.push((Bound::DeviceCopy, d, None));
    }
    if let Some((_, h)) = u.hashing {
        downstream.push((Bound::Hashing, h, None));
    }
    let busiest = |list: &[(Bound, f64, Option<&'static str>)]| {
        list.iter().copied().reduce(|a, b| if b.1 > a.1 { b } else { a })
    };
    let staging_full = u.settings.staging_slots > 0 && u.staging_full >= BUSY;
    let exchange = u.exchange.map(|(busy, _)| (Bound::Exchange, busy, None));
    let pick = match (busiest(&upstream), busiest(&downstream), exchange) {
        (_, Some(d), _) if staging_full => Some(d),
        (Some(up), _, _) if up.1 >= BUSY => Some(up),
        (_, d, Some(x)) if x.1 >= BUSY && d.is_none_or(|d| x.1 >= d.1) => Some(x),
        (_, Some(d), _) if d.1 >= BUSY => Some(d),
        _ => None,
    };
    let (bound, setting) = pick.map_or((Bound::Cpu, None), |p| (p.0, p.2));
    let mut lines = evidence(u);
    if bound == Bound::Cpu {
        lines.insert(0, format!("no stage busy {} of the load", pct(BUSY)));
    }
    Verdict { bound, evidence: lines.join(", "), setting }
}
