//! How many ranged GETs an object load keeps in flight, and how large each is, from what its
//! own GETs measure.
//!
//! A GET of `part` bytes holds its connection for the time to first byte (TTFB: the request's
//! round trip and the store's lookup, 10-60 ms on cloud stores, microseconds on an idle
//! loopback, tens of milliseconds on a busy one) and then `part / rate`, where `rate` is what
//! the store serves one connection. Only the second part moves bytes. To keep [`STREAMING`]
//! connections streaming at once, the load needs `STREAMING x (1 + ttfb x rate / part)` GETs
//! in flight: the bandwidth-delay product (`ttfb x rate` bytes per connection) in parts, on top
//! of the streams themselves. So the in-flight count rises with latency, bounded by
//! `--object-concurrency` (a cap). Where parts land in staging buffers (device loads), the
//! ring bounds the GETs streaming at once, not those waiting: a part's buffers are bound
//! while its GET waits for its first byte, as they come free, and a GET answered first waits
//! for them with its body in the socket (`super::Binder`), so the GETs that cover the wait
//! hold no buffers of their own. Where the parts land in place (host loads) nothing but the
//! cap bounds them.
//!
//! The part size follows the same measurements. A GET whose body takes `part / rate` after
//! waiting `ttfb` streams `part / (part + ttfb x rate)` of its time; parts of at least
//! [`BODY_PER_WAIT`] x `ttfb x rate` keep that above 80%, which also spends fewer requests
//! (and fewer of the cap's slots) on the wait. The plan cuts the objects into extents of the
//! configured part size before any GET; once GETs have answered, one GET covers as many
//! consecutive extents of an object as that asks, up to [`PART_BYTES_MAX`] and to what the
//! staging buffers can hold for [`STREAMING`] GETs at once.
//!
//! The GETs measure as they go: each records its TTFB (request to response headers) and its
//! body's bytes and seconds; the per-connection rate is their bytes over their body seconds.
//! The choices take the least TTFB seen, not the mean: a busy store answers later the more
//! it is asked at once, so the mean grows with the bytes in flight, and parts sized from it
//! would grow them further (on a 2-core loopback store the mean reached a second with 64 MiB
//! parts); the least is the network's and the store's own latency, as TCP's BBR takes the
//! least round trip. The mean is reported beside it. Before the first GET answers, the load starts with [`STREAMING`]
//! GETs of one extent each. What was measured and chosen is reported ([`NetReport`]).
//!
//! That model takes the per-connection rate as the network's: more GETs than it asks would
//! only share the same bytes. A store that serves each connection at a bounded rate (S3 serves
//! a GET at about 90 MB/s whatever the NIC) is the opposite case: every connection added adds
//! its rate, up to the NIC. The GETs alone cannot tell the two apart, so the load asks the
//! network, as TCP's slow start does: it keeps [`CLIMB_START_STEP`] times as many GETs in
//! flight (within the cap and the buffers) while each such step's bytes per second grow by at
//! least [`CLIMB_FULL`] of its GETs' growth (what a store bound per connection gives), then
//! [`CLIMB_STEP`] times as many while each step's grow by at least [`CLIMB_GAIN`] of its GETs'
//! growth (15% for a full step, less for one the cap cuts short). A step that gives less is
//! taken back to the count measured before it; a first step is then tried again halfway, any
//! later one leaves the count settled there, and no step goes as far as a count that gave too
//! little. A store bound per connection reaches a cap of 64 from 18 GETs in two steps, not
//! four; one bound by its network or itself pays a doubling and a step halfway back. A count's bytes per second come from a cohort of the GETs issued while it held
//! (half as many as it keeps in flight, at least [`CLIMB_SAMPLES`], after those its step
//! added at once, while fewer than the count were in flight), once every GET
//! of the cohort has landed, by Little's law: the count times their bytes over their
//! lifetimes (from the dispatcher issuing the GET to its last byte: the waits for staging
//! buffers, for the first byte and for retries included). Each GET times itself, so GETs that
//! land in bunches (those issued together at a step do) measure what they lived through, and
//! waiting for the whole cohort counts the GETs that live longest (a throttled first byte, a
//! large part) as well as the first to land; a step is judged about two lifetimes of a GET
//! after it is taken. A load bound by its network or its store (the GETs then live longer the
//! more there are, or wait longer for their first byte) pays the GETs of one step for the
//! question. The climb never backs off: a
//! store that throttles (S3's 503 SlowDown, per prefix) answers slower, the client retries, and
//! a fleet of loaders on one prefix may want a lower `--object-concurrency`.

use std::collections::HashMap;

use gantry_format::FileId;
use parking_lot::Mutex;

use crate::engine::read::uring::Job;

/// Connections kept streaming at once: the fixed count gantry kept in flight before it
/// measured the network (and its default cap before the climb), so that measuring never keeps fewer GETs in
/// flight than that did: on loopback, 8 streams read 0.56x of the in-process ceiling where 16
/// read 0.65x (`benches/README.md`).
pub const STREAMING: usize = 16;

/// Most bytes one GET asks for when it covers several extents.
pub const PART_BYTES_MAX: u64 = 64 << 20;

/// A part's body should take at least this many times the wait for its first byte.
pub const BODY_PER_WAIT: f64 = 4.0;

/// The climb's first steps each keep this many times the GETs of the count before, as long
/// as each gives at least [`CLIMB_FULL`] of its GETs' growth (TCP's slow start: a store bound
/// per connection gives it all).
pub const CLIMB_START_STEP: f64 = 2.0;

/// A first step that gives less than this share of its GETs' growth (but at least
/// [`CLIMB_GAIN`]) is kept, and the steps after it are [`CLIMB_STEP`]s: the load is near
/// what its network or store gives.
pub const CLIMB_FULL: f64 = 0.6;

/// The steps after the first ones (see [`CLIMB_START_STEP`]) keep this many times the GETs of
/// the count before.
pub const CLIMB_STEP: f64 = 1.5;

/// A count of the climb is judged on a cohort of the GETs issued while it held: half as many
/// as it keeps in flight, and at least this many.
pub const CLIMB_SAMPLES: usize = 16;

/// A step is kept when its count's bytes per second grew by at least this share of its GETs'
/// growth (a store bound per connection gives the whole step: 50% more GETs, 50% more bytes;
/// one bound by its network or itself gives nothing, within its noise), so a full step must
/// give 15% more.
pub const CLIMB_GAIN: f64 = 0.3;

/// What the GETs of one load measured, and the in-flight count and part size it led to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NetReport {
    /// Mean time to first byte of the GETs, milliseconds.
    pub ttfb_ms: f64,
    /// Least time to first byte of the GETs, milliseconds: what the choices follow.
    pub ttfb_min_ms: f64,
    /// Bytes per second the store served one connection (body bytes over body seconds),
    /// MB/s (10^6).
    pub connection_mb_s: f64,
    /// GETs kept in flight once measured (the last count chosen).
    pub in_flight: usize,
    /// Of those, the connections the model keeps streaming at once: [`STREAMING`], or as
    /// many as the staging buffers hold parts where that is fewer (the rest wait for their
    /// first byte).
    pub streaming: usize,
    /// Bytes per ranged GET once measured (the last size chosen): a whole number of the
    /// plan's extents.
    pub part_bytes: u64,
    /// Bytes of the plan's extents (the configured part size): what a GET covers before the
    /// first one answers.
    pub extent_bytes: u64,
    /// Of `in_flight`, the GETs the climb added to the model's count (see the module's
    /// documentation).
    pub climbed: usize,
    /// Whether the climb had settled when the report was made (else the load ended while a
    /// step was still being measured, and `climbed` is the step under test).
    pub climb_settled: bool,
}

/// A GET's place in the climb ([`Net::issue`], [`Net::landed`]): when it was issued, and the
/// cohort of the count it samples, if any.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ticket {
    issued_s: f64,
    cohort: Option<u64>,
}

/// What the load does next: how many GETs to keep in flight, each covering how many of the
/// plan's consecutive extents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// GETs in flight.
    pub gets: usize,
    /// Extents per GET.
    pub extents: usize,
}

/// Extents of `extent_bytes` one GET covers, given the measured TTFB (seconds) and
/// per-connection rate (bytes per second): enough that its body takes [`BODY_PER_WAIT`] times
/// the TTFB, at most [`PART_BYTES_MAX`] (or one extent, where an extent is larger), and at
/// most what `memory_parts` staging buffers hold for [`STREAMING`] GETs at once. Unmeasured:
/// one. Pure.
pub fn part_extents(measured: Option<(f64, f64)>, extent_bytes: u64, memory_parts: usize) -> usize {
    let Some((ttfb_s, rate)) = measured.filter(|(t, r)| t.is_finite() && r.is_finite()) else {
        return 1;
    };
    let extent = extent_bytes.max(1);
    let most = (PART_BYTES_MAX / extent).clamp(1, (memory_parts / STREAMING).max(1) as u64);
    let wanted = (BODY_PER_WAIT * ttfb_s.max(0.0) * rate.max(0.0) / extent as f64).ceil();
    if wanted >= most as f64 {
        most as usize
    } else {
        (wanted as usize).max(1)
    }
}

/// The GETs and extents per GET for parts of `extent_bytes`, at most `cap` GETs, and
/// `memory_parts` staging buffers for the GETs streaming at once ([`part_extents`], then
/// [`in_flight`] for parts of that many extents, the buffers shared among them). Pure.
///
/// Where the buffers hold fewer such GETs than the network asks (a device load far from its
/// store), spending them on more GETs of fewer extents each would move more by the model
/// (`g x k x extent / (ttfb + k x extent / rate)`), but on the GPU machine it did not: with a
/// cap of 32, 32 GETs of 16 MiB at 80 ms ran no faster than 16 of 32 MiB, and 24 GETs at
/// 20 ms ran 14% slower, each connection at half the rate (`benches/README.md`). The bytes in
/// flight, not the GETs, bound such a load, so the parts stay as latency asks.
pub fn choose(
    measured: Option<(f64, f64)>,
    extent_bytes: u64,
    cap: usize,
    memory_parts: usize,
) -> Choice {
    let extents = part_extents(measured, extent_bytes, memory_parts);
    let part_bytes = extent_bytes.saturating_mul(extents as u64);
    Choice { gets: in_flight(measured, part_bytes, cap, memory_parts / extents), extents }
}

/// GETs to keep in flight for parts of `part_bytes`, given the measured TTFB (seconds) and
/// per-connection rate (bytes per second): [`STREAMING`] streams, or as many as
/// `memory_parts` (staging buffers for the parts) hold where that is fewer, and the GETs that
/// cover their wait for the first byte (`covering`); at most `cap`, at least one.
/// Unmeasured: the streams, within the cap. Pure.
pub fn in_flight(
    measured: Option<(f64, f64)>,
    part_bytes: u64,
    cap: usize,
    memory_parts: usize,
) -> usize {
    covering(measured, part_bytes, streams(memory_parts), cap)
}

/// Connections kept streaming at once with `memory_parts` staging buffers for the parts:
/// [`STREAMING`], or as many as the buffers hold where that is fewer; at least one. Pure.
fn streams(memory_parts: usize) -> usize {
    STREAMING.min(memory_parts).max(1)
}

/// GETs of `part_bytes` that keep `streams` connections streaming: the streams, and as many
/// waiting for their first byte as the measured TTFB (seconds) times the per-connection rate
/// (bytes per second) holds parts; at most `cap`, at least one. Unmeasured: the streams,
/// within the cap. Pure.
fn covering(measured: Option<(f64, f64)>, part_bytes: u64, streams: usize, cap: usize) -> usize {
    let (streams, cap) = (streams.max(1), cap.max(1));
    let Some((ttfb_s, rate)) = measured.filter(|(t, r)| t.is_finite() && r.is_finite()) else {
        return streams.min(cap);
    };
    // Bytes one connection could have moved while it waited for its first byte, in parts.
    let waiting_parts = (ttfb_s.max(0.0) * rate.max(0.0)) / part_bytes.max(1) as f64;
    let wanted = (streams as f64 * (1.0 + waiting_parts)).ceil();
    if wanted >= cap as f64 {
        cap
    } else {
        (wanted as usize).clamp(1, cap)
    }
}

/// For each of `jobs`, the job that continues it: the one of the same object that starts
/// where it ends (a GET covering several extents takes them in this order). Pure.
pub fn successors(jobs: &[Job]) -> Vec<Option<usize>> {
    let starts: HashMap<(FileId, u64), usize> =
        jobs.iter().enumerate().map(|(i, j)| ((j.file, j.offset), i)).collect();
    jobs.iter().map(|j| starts.get(&(j.file, j.offset + j.len)).copied()).collect()
}

/// The measurements of one load's GETs, shared by them (one lock per GET, not per chunk).
#[derive(Debug)]
pub struct Net {
    extent_bytes: u64,
    /// Whether GETs may cover several extents (the part size was not given).
    join: bool,
    cap: usize,
    /// The load's clock: the climb's GETs are timed on it.
    origin: std::time::Instant,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    memory_parts: usize,
    gets: u64,
    ttfb_s: f64,
    ttfb_min_s: f64,
    body_bytes: u64,
    body_s: f64,
    climb: Climb,
}

/// The climb above the model's count (see the module's documentation).
#[derive(Debug, Default)]
struct Climb {
    /// GETs kept in flight on top of the model's count.
    extra: usize,
    /// The cohort of the count under test: the first `size` GETs issued once it held (0: not
    /// yet sized), how many have been issued and have landed, and the bytes and lifetimes of
    /// those landed.
    cohort: u64,
    size: usize,
    /// GETs still to issue before the cohort's first: those a step adds, issued at once
    /// while fewer than the new count were in flight, are not its samples.
    skip: usize,
    issued: usize,
    landed: usize,
    bytes: u64,
    life_s: f64,
    /// The count before the step under test: its rate (bytes per second), GETs in flight,
    /// and GETs on top of the model's count then.
    before: Option<(f64, usize, usize)>,
    /// Whether the steps are [`CLIMB_STEP`]s (else [`CLIMB_START_STEP`]s).
    fine: bool,
    /// The least count that moved too little: no step goes there again.
    failed: Option<usize>,
    settled: bool,
}

impl Default for Net {
    fn default() -> Self {
        Net::new(16 << 20, STREAMING, STREAMING)
    }
}

impl Net {
    /// For extents of `extent_bytes`, at most `cap` GETs and `memory_parts` staging buffers.
    pub fn new(extent_bytes: u64, cap: usize, memory_parts: usize) -> Self {
        let state =
            Mutex::new(State { memory_parts, ttfb_min_s: f64::INFINITY, ..State::default() });
        Net { extent_bytes, join: true, cap, origin: std::time::Instant::now(), state }
    }

    /// The same with every GET one extent: the caller gave the part size.
    pub fn fixed_parts(mut self) -> Self {
        self.join = false;
        self
    }

    /// The model's choice ([`choose`]), with `extra` GETs on top within the cap and what the
    /// buffers keep streaming (every buffer streaming, and the GETs that cover their wait).
    fn choose(&self, measured: Option<(f64, f64)>, memory_parts: usize, extra: usize) -> Choice {
        let mut c = match self.join {
            true => choose(measured, self.extent_bytes, self.cap, memory_parts),
            false => Choice {
                gets: in_flight(measured, self.extent_bytes, self.cap, memory_parts),
                extents: 1,
            },
        };
        let (extents, part) = (c.extents.max(1), self.extent_bytes * c.extents.max(1) as u64);
        let most = covering(measured, part, memory_parts / extents, self.cap).max(c.gets);
        c.gets = c.gets.saturating_add(extra).min(most);
        c
    }

    /// Records one request of a GET (a GET resumed makes several): its time to first byte,
    /// and its body's bytes and seconds (the model's measurements).
    pub fn record(&self, ttfb_s: f64, body_bytes: u64, body_s: f64) {
        let mut s = self.state.lock();
        s.gets += 1;
        s.ttfb_s += ttfb_s;
        s.ttfb_min_s = s.ttfb_min_s.min(ttfb_s);
        s.body_bytes = s.body_bytes.saturating_add(body_bytes);
        s.body_s += body_s;
    }

    /// A GET about to be issued: its ticket, for [`Net::landed`].
    pub fn issue(&self) -> Ticket {
        self.issue_at(self.origin.elapsed().as_secs_f64())
    }

    /// [`Net::issue`] at `now_s` seconds on the load's clock: the GET samples the count under
    /// test while its cohort is still being issued.
    fn issue_at(&self, now_s: f64) -> Ticket {
        let unsampled = Ticket { issued_s: now_s, cohort: None };
        let mut s = self.state.lock();
        let measured = Self::measured(&s);
        // Before the first answer the count is the unmeasured one: no cohort yet.
        if s.climb.settled || measured.is_none() || !now_s.is_finite() {
            return unsampled;
        }
        if s.climb.skip > 0 {
            s.climb.skip -= 1;
            return unsampled;
        }
        if s.climb.size == 0 {
            let now = self.choose(measured, s.memory_parts, s.climb.extra).gets;
            s.climb.size = (now / 2).max(CLIMB_SAMPLES);
        }
        let c = &mut s.climb;
        if c.issued >= c.size {
            return unsampled;
        }
        c.issued += 1;
        Ticket { cohort: Some(c.cohort), ..unsampled }
    }

    /// A GET of `ticket` landed whole, `bytes` of it (after every request it took): once the
    /// whole cohort of the count under test has, the climb judges the count and takes its
    /// next step.
    pub fn landed(&self, ticket: Ticket, bytes: u64) {
        self.landed_at(self.origin.elapsed().as_secs_f64(), ticket, bytes);
    }

    /// [`Net::landed`] at `now_s` seconds on the load's clock.
    fn landed_at(&self, now_s: f64, ticket: Ticket, bytes: u64) {
        let mut s = self.state.lock();
        if s.climb.settled || ticket.cohort != Some(s.climb.cohort) {
            return;
        }
        let c = &mut s.climb;
        let life_s = now_s - ticket.issued_s;
        c.landed += 1;
        c.bytes = c.bytes.saturating_add(bytes);
        c.life_s += if life_s.is_finite() { life_s.max(0.0) } else { 0.0 };
        if c.landed < c.size {
            return;
        }
        let measured = Self::measured(&s);
        let now = self.choose(measured, s.memory_parts, s.climb.extra).gets;
        let c = &mut s.climb;
        // Little's law: GETs in flight over their mean lifetime, times their mean bytes.
        let (bytes, life_s) = (c.bytes, c.life_s);
        (c.cohort, c.size, c.issued, c.landed, c.bytes, c.life_s) = (c.cohort + 1, 0, 0, 0, 0, 0.0);
        if life_s <= 0.0 {
            return; // nothing timed: the next cohort judges this count
        }
        let rate = now as f64 * bytes as f64 / life_s;
        // The model's count now (its measurements move too).
        let model = self.choose(measured, s.memory_parts, 0).gets;
        let c = &mut s.climb;
        // The count the next step starts from (its rate, GETs and GETs on top of the model),
        // and the GETs it goes to where that is not a whole step.
        let (mut from, mut wanted) = ((rate, now, c.extra), None);
        if let Some((before, gets, extra)) = c.before.filter(|&(_, gets, _)| now > gets) {
            // The share of the step's growth in GETs that its bytes per second grew by.
            let given = (rate / before - 1.0) / ((now - gets) as f64 / gets as f64);
            log::debug!(
                "object climb at {now_s:.3} s: {now} GETs moved {:.3} GB/s, {gets} moved {:.3}",
                rate / 1e9,
                before / 1e9
            );
            if given < CLIMB_GAIN {
                // Too little: back to the count measured before; after a first step, try
                // halfway there from it, else stay.
                let halfway = (gets + now).div_ceil(2);
                c.failed = Some(now);
                if c.fine || halfway >= now {
                    (c.extra, c.settled) = (extra, true);
                    return;
                }
                (from, wanted, c.fine) = ((before, gets, extra), Some(halfway), true);
            } else if given < CLIMB_FULL {
                c.fine = true;
            }
        } else {
            log::debug!("object climb at {now_s:.3} s: {now} GETs moved {:.3} GB/s", rate / 1e9);
        }
        // The next step from there, where the cap and the buffers leave room for one.
        let factor = if c.fine { CLIMB_STEP } else { CLIMB_START_STEP };
        let wanted =
            wanted.unwrap_or_else(|| ((from.1 as f64 * factor).ceil() as usize).max(from.1 + 1));
        let next = self.choose(measured, s.memory_parts, wanted.saturating_sub(model)).gets;
        let c = &mut s.climb;
        log::debug!("object climb: next {next} GETs");
        if next <= from.1 || c.failed.is_some_and(|failed| next >= failed) {
            (c.extra, c.settled) = (from.2, true);
        } else {
            // The GETs the step adds at once, while fewer than `next` are in flight, are not
            // its cohort's (none where it goes down from `now`).
            (c.before, c.extra, c.skip) = (Some(from), next - model, next.saturating_sub(now));
        }
    }

    /// The least TTFB (seconds) and the per-connection rate (bytes per second), once a GET
    /// with a body has answered.
    fn measured(s: &State) -> Option<(f64, f64)> {
        (s.gets > 0 && s.body_s > 0.0).then(|| (s.ttfb_min_s, s.body_bytes as f64 / s.body_s))
    }

    /// GETs to keep in flight now, and extents per GET (see [`choose`]).
    pub fn target(&self) -> Choice {
        let s = self.state.lock();
        self.choose(Self::measured(&s), s.memory_parts, s.climb.extra)
    }

    /// What was measured and chosen; `None` when no GET answered with a body.
    pub fn report(&self) -> Option<NetReport> {
        let s = self.state.lock();
        let (ttfb_s, rate) = Self::measured(&s)?;
        let chosen = self.choose(Some((ttfb_s, rate)), s.memory_parts, s.climb.extra);
        let model = self.choose(Some((ttfb_s, rate)), s.memory_parts, 0);
        Some(NetReport {
            ttfb_ms: s.ttfb_s / s.gets as f64 * 1e3,
            ttfb_min_ms: ttfb_s * 1e3,
            connection_mb_s: rate / 1e6,
            in_flight: chosen.gets,
            streaming: streams(s.memory_parts / chosen.extents.max(1)),
            part_bytes: self.extent_bytes * chosen.extents as u64,
            extent_bytes: self.extent_bytes,
            climbed: chosen.gets - model.gets,
            climb_settled: s.climb.settled,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn in_flight_table() {
        // (ttfb ms, connection MB/s, part, cap, memory parts, in flight)
        let cases = [
            (None, 16 * MIB, 64, 32, STREAMING), // unmeasured: the streams
            (None, 16 * MIB, 4, 32, 4),          // ... within the cap
            (Some((0.0, 500.0)), 16 * MIB, 64, 32, 16), // loopback: nothing to hide
            (Some((1.0, 500.0)), 16 * MIB, 64, 32, 17), // 0.5 MB waiting: a little more
            (Some((20.0, 90.0)), 16 * MIB, 64, 32, 18), // same-region S3: 1.8 MB waiting
            (Some((80.0, 90.0)), 16 * MIB, 64, 32, 23), // cross-region: 7.2 MB waiting
            (Some((80.0, 90.0)), 4 * MIB, 64, 128, 44), // small parts need more GETs
            (Some((80.0, 400.0)), 8 * MIB, 64, 128, 64), // fast connections, far away: the cap
            (Some((80.0, 400.0)), 8 * MIB, 16, 128, 16), // the cap binds
            (Some((80.0, 400.0)), 8 * MIB, 64, 20, 64), // 20 buffers: 16 stream, 48 wait
            (Some((80.0, 400.0)), 8 * MIB, 64, 4, 20), // 4 buffers: 4 stream, 16 wait
            (Some((80.0, 400.0)), 8 * MIB, 0, 0, 1), // at least one
            (Some((f64::NAN, 1.0)), 8 * MIB, 64, 64, 16), // nonsense is unmeasured
            (Some((1e9, 1e9)), 8 * MIB, 64, 64, 64), // huge stays bounded
        ];
        for (measured, part, cap, memory, want) in cases {
            let measured = measured.map(|(ms, mb): (f64, f64)| (ms / 1e3, mb * 1e6));
            let got = in_flight(measured, part, cap, memory);
            assert_eq!(got, want, "{measured:?} part {part} cap {cap} memory {memory}");
        }
    }

    #[test]
    fn more_latency_never_fewer_gets() {
        let mut last = 0;
        for ms in [0.0, 1.0, 5.0, 20.0, 40.0, 80.0, 160.0] {
            let n = in_flight(Some((ms / 1e3, 90e6)), 16 * MIB, 64, 64);
            assert!(n >= last, "{ms} ms: {n} < {last}");
            last = n;
        }
        assert!(last > in_flight(Some((0.0, 90e6)), 16 * MIB, 64, 64));
    }

    #[test]
    fn successors_follow_each_object() {
        let job = |extent, file, offset, len| Job {
            extent,
            file: FileId(file),
            offset,
            len,
            target: None,
        };
        // Two objects interleaved; object 1 has a gap (a skipped tensor) after 300.
        let jobs = [
            job(0, 0, 100, 100),
            job(1, 1, 0, 300),
            job(2, 0, 200, 100),
            job(3, 1, 400, 100),
            job(4, 0, 300, 50),
            job(5, 1, 500, 10),
        ];
        assert_eq!(successors(&jobs), [Some(2), None, Some(4), Some(5), None, None]);
    }

    #[test]
    fn part_extents_table() {
        // (ttfb ms, connection MB/s, extent, memory parts, extents per GET)
        let cases = [
            (None, 16 * MIB, 64, 1),                         // unmeasured: one extent
            (Some((0.0, 500.0)), 16 * MIB, 64, 1),           // loopback: nothing to amortize
            (Some((20.0, 90.0)), 16 * MIB, 64, 1),           // same-region: 7.2 MB is under a part
            (Some((80.0, 90.0)), 16 * MIB, 64, 2),           // cross-region: 28.8 MB
            (Some((80.0, 90.0)), 4 * MIB, 64, 4), // ... in small extents: capped by memory
            (Some((80.0, 90.0)), 4 * MIB, usize::MAX, 7), // ... in place: as asked
            (Some((80.0, 400.0)), 16 * MIB, usize::MAX, 4), // 128 MB asked: the 64 MiB cap
            (Some((80.0, 400.0)), 16 * MIB, 16, 1), // staging for the streams only
            (Some((80.0, 400.0)), 128 * MIB, usize::MAX, 1), // extents above the cap stay whole
            (Some((f64::NAN, 1.0)), 16 * MIB, 64, 1), // nonsense is unmeasured
            (Some((1e9, 1e9)), 1, usize::MAX, (PART_BYTES_MAX) as usize), // huge stays bounded
        ];
        for (measured, extent, memory, want) in cases {
            let measured = measured.map(|(ms, mb): (f64, f64)| (ms / 1e3, mb * 1e6));
            let got = part_extents(measured, extent, memory);
            assert_eq!(got, want, "{measured:?} extent {extent} memory {memory}");
        }
    }

    #[test]
    fn more_latency_never_smaller_parts() {
        let at = |ms: f64| choose(Some((ms / 1e3, 90e6)), 8 * MIB, 64, usize::MAX);
        let mut last = at(0.0);
        for ms in [1.0, 5.0, 20.0, 40.0, 80.0, 160.0] {
            let c = at(ms);
            assert!(c.extents >= last.extents, "{ms} ms: {c:?} after {last:?}");
            last = c;
        }
        let (near, far) = (at(0.0), at(80.0));
        assert!(far.extents > near.extents && far.gets > near.gets, "{near:?} {far:?}");
        // The staging buffers bound the bytes streaming: parts x streams.
        for ms in [0.0, 20.0, 80.0, 160.0] {
            let c = choose(Some((ms / 1e3, 400e6)), 8 * MIB, 64, 48);
            assert!(c.extents * c.gets.min(STREAMING) <= 48, "{ms} ms: {c:?}");
        }
    }

    #[test]
    fn staging_bound_loads_keep_the_parts_latency_asks() {
        // (ttfb ms, connection MB/s, extent, cap, memory parts, chosen)
        let cases = [
            // A GPU load 80 ms away, 32 buffers of 16 MiB: 16 GETs of two stream into them,
            // 20 more wait for their first byte (40 MB a connection could move meanwhile).
            (80.0, 500.0, 16 * MIB, 64, 32, Choice { gets: 36, extents: 2 }),
            (80.0, 500.0, 16 * MIB, 16, 32, Choice { gets: 16, extents: 2 }),
            // Host loads (no staging bound): parts as latency asks.
            (80.0, 500.0, 16 * MIB, 64, usize::MAX, Choice { gets: 26, extents: 4 }),
            // Loopback: the buffers are not what binds.
            (3.0, 500.0, 16 * MIB, 64, 32, Choice { gets: 18, extents: 1 }),
        ];
        for (ms, mb, extent, cap, memory, want) in cases {
            let got = choose(Some((ms / 1e3, mb * 1e6)), extent, cap, memory);
            assert_eq!(got, want, "{ms} ms, {mb} MB/s, cap {cap}, memory {memory}");
            assert!(got.gets.min(STREAMING) * got.extents <= memory && got.gets <= cap, "{got:?}");
        }
        // Odd inputs: no panic, at least one GET, within the buffers and the cap.
        for (t, r) in [(0.0, 0.0), (f64::INFINITY, 1e9), (1.0, f64::INFINITY), (-1.0, -1.0)] {
            for (extent, cap, memory) in [(0, 0, 0), (1, usize::MAX, usize::MAX), (4096, 64, 64)] {
                let c = choose(Some((t, r)), extent, cap, memory);
                assert!(c.gets >= 1 && c.extents >= 1, "{t} {r} {extent} {cap} {memory}: {c:?}");
                let streaming = c.gets.min(STREAMING) * c.extents;
                assert!(c.gets <= cap.max(1) && streaming <= memory.max(1), "{c:?}");
            }
        }
    }

    /// Runs `rounds` rounds of GETs through `net` against a store that serves each connection
    /// at most `conn` bytes per second and all of them at most `nic`, after `ttfb_s`: each
    /// round as many GETs as the target asks, issued together, landing together. Returns the
    /// GETs in flight at the end and the bytes per second of the last round.
    fn climb(net: &Net, ttfb_s: f64, conn: f64, nic: f64, rounds: usize) -> (usize, f64) {
        let (mut now, mut rate) = (0.0, 0.0);
        for _ in 0..rounds {
            let c = net.target();
            let part = (16 * MIB * c.extents as u64) as f64;
            rate = (c.gets as f64 * conn).min(nic);
            let body_s = part / (rate / c.gets as f64);
            let tickets: Vec<Ticket> = (0..c.gets).map(|_| net.issue_at(now)).collect();
            now += ttfb_s + body_s;
            for ticket in tickets {
                net.record(ttfb_s, part as u64, body_s);
                net.landed_at(now, ticket, part as u64);
            }
        }
        (net.target().gets, rate)
    }

    #[test]
    fn the_climb_finds_what_each_store_gives() {
        // S3-like: each connection 90 MB/s, the NIC far away: the cap.
        let (gets, _) = climb(&Net::new(16 * MIB, 64, usize::MAX), 0.020, 90e6, 1e12, 40);
        assert_eq!(gets, 64);
        // ... with 32 staging buffers: every buffer streaming, and the GETs that cover their
        // wait (1.8 MB a connection: a tenth of a part each, 36 in all).
        let (gets, _) = climb(&Net::new(16 * MIB, 64, 32), 0.020, 90e6, 1e12, 40);
        assert_eq!(gets, 36);
        // Connections of 90 MB/s behind 2.5 GB/s: climbs until a step gives less than
        // CLIMB_GAIN, keeps the step before, and moves at least 90% of the NIC.
        let net = Net::new(16 * MIB, 64, usize::MAX);
        let model = net.choose(Some((0.020, 90e6)), usize::MAX, 0).gets;
        let (gets, rate) = climb(&net, 0.020, 90e6, 2.5e9, 40);
        assert!(gets > model && rate >= 0.9 * 2.5e9, "{gets} GETs (model {model}), {rate}");
        assert!(net.state.lock().climb.settled);
        // Fast connections sharing 8 GB/s (loopback): a doubling and a step halfway back,
        // nothing gained, back to the model's count.
        let net = Net::new(16 * MIB, 64, usize::MAX);
        let (gets, _) = climb(&net, 0.003, 500e6, 8e9, 40);
        assert_eq!(gets, net.choose(Some((0.003, 500e6)), usize::MAX, 0).gets);
        assert!(net.state.lock().climb.settled);
        // Parts the caller fixed: the climb keeps them, one extent a GET.
        let fixed = Net::new(16 * MIB, 64, usize::MAX).fixed_parts();
        let (gets, _) = climb(&fixed, 0.020, 90e6, 1e12, 40);
        assert_eq!((gets, fixed.target().extents), (64, 1));
        // A device load whose ring the model already keeps streaming (80 ms, 8 buffers: 8
        // streams, 20 GETs covering their wait): no room, no climb, settled at once.
        let ring = Net::new(16 * MIB, 64, 8);
        let (gets, _) = climb(&ring, 0.080, 500e6, 1e12, 12);
        let r = ring.report().unwrap();
        assert!(gets == 28 && r.climbed == 0 && r.climb_settled, "{gets} {r:?}");
        // The cap at the model's count: no room, no climb.
        let (gets, _) = climb(&Net::new(16 * MIB, 16, usize::MAX), 0.020, 90e6, 1e12, 40);
        assert_eq!(gets, 16);
        // A settled climb stays, whatever comes after (the model's own count follows the
        // measurements).
        let net = Net::new(16 * MIB, 64, usize::MAX);
        climb(&net, 0.003, 500e6, 8e9, 12);
        let extra = net.state.lock().climb.extra;
        climb(&net, 0.003, 90e6, 1e12, 12);
        let c = &net.state.lock().climb;
        assert!(c.settled && c.extra == extra, "{c:?}");
        // Odd measurements: no panic, within the cap.
        let net = Net::new(16 * MIB, 64, usize::MAX);
        for (t, b, d) in [(0.0, 0, 0.0), (f64::NAN, 1, f64::INFINITY), (-1.0, u64::MAX, 1e-9)] {
            for at in [0.0, 0.0, -1.0, f64::NAN, 1e9] {
                net.record(t, b, d);
                let ticket = net.issue_at(at);
                net.landed_at(at - d, ticket, b);
                net.landed_at(at, Ticket { issued_s: f64::NAN, cohort: Some(0) }, b);
                let c = net.target();
                assert!(c.gets >= 1 && c.gets <= 64, "{c:?}");
            }
        }
    }

    /// A store for [`load`]: each GET waits `ttfb_s` to `ttfb_s + jitter_s` for its first
    /// byte, then streams at `conn` bytes per second or an equal share of `nic` among the
    /// GETs streaming, whichever is less. `mixed`: parts of 1 to 64 MiB (log-uniform), else
    /// 16 MiB. `throttle_above`: with more GETs in flight than this, each GET issued is
    /// throttled (1 to 3 s more before its first byte: retries of a 503) with the chance
    /// that the excess is of the GETs in flight.
    struct Store {
        ttfb_s: f64,
        jitter_s: f64,
        conn: f64,
        nic: f64,
        mixed: bool,
        throttle_above: usize,
    }

    impl Store {
        fn per_connection(ttfb_s: f64, conn: f64, nic: f64) -> Self {
            Store {
                ttfb_s,
                jitter_s: 3.0 * ttfb_s,
                conn,
                nic,
                mixed: false,
                throttle_above: usize::MAX,
            }
        }
    }

    /// What [`load`] saw: the GETs in flight at the end, the GETs landed when the count first
    /// reached it, the bytes per second from half the GETs landed to nine tenths (before the
    /// load's tail, when fewer are left), and over the whole load.
    struct Loaded {
        gets: usize,
        reached: usize,
        rate: f64,
        whole: f64,
    }

    /// Loads `gets` GETs through `net` from `store`, simulated millisecond by millisecond
    /// (a fixed pseudo-random sequence); a GET is issued whenever fewer are in flight than
    /// the target, as the load's dispatcher does.
    fn load(net: &Net, gets: usize, store: &Store) -> Loaded {
        load_seeded(net, gets, store, 0x9e37_79b9_7f4a_7c15)
    }

    fn load_seeded(net: &Net, gets: usize, store: &Store, mut seed: u64) -> Loaded {
        const DT: f64 = 1e-3;
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        // In flight: (ticket, issued at, first byte at, bytes, bytes left).
        let mut flight: Vec<(Ticket, f64, f64, u64, f64)> = Vec::new();
        let (mut now, mut issued, mut landed, mut bytes) = (0.0f64, 0usize, 0usize, 0u64);
        let (mut last, mut reached, mut half, mut most) = (0usize, 0usize, (0.0, 0), (0.0, 0));
        while landed < gets {
            let target = net.target().gets;
            if target != last {
                (last, reached) = (target, landed);
            }
            while flight.len() < target && issued < gets {
                let part =
                    if store.mixed { (MIB as f64 * 64f64.powf(random())) as u64 } else { 16 * MIB };
                let mut first = now + store.ttfb_s + store.jitter_s * random();
                let n = flight.len() + 1;
                if n > store.throttle_above
                    && random() < (n - store.throttle_above) as f64 / n as f64
                {
                    first += 1.0 + 2.0 * random();
                }
                flight.push((net.issue_at(now), now, first, part, part as f64));
                issued += 1;
            }
            now += DT;
            let streaming = flight.iter().filter(|g| g.2 <= now).count().max(1);
            let rate = store.conn.min(store.nic / streaming as f64);
            let mut i = 0;
            while i < flight.len() {
                let g = &mut flight[i];
                if g.2 <= now {
                    g.4 -= rate * DT;
                }
                if g.4 > 0.0 {
                    i += 1;
                    continue;
                }
                let (ticket, from, first, part, _) = flight.swap_remove(i);
                net.record(first - from, part, now - first);
                net.landed_at(now, ticket, part);
                (landed, bytes) = (landed + 1, bytes + part);
                if landed == gets / 2 {
                    half = (now, bytes);
                }
                if landed == gets * 9 / 10 {
                    most = (now, bytes);
                }
            }
        }
        let rate = (most.1 - half.1) as f64 / (most.0 - half.0);
        Loaded { gets: net.target().gets, reached, rate, whole: bytes as f64 / now }
    }

    /// The climb judged on cohorts of GETs, with first bytes that come late by up to three
    /// times the latency (GETs land out of the order they were issued, in no bunches): a
    /// store that serves each connection at 90 MB/s reaches the cap within 128 GETs of a
    /// 4 GiB load (96 over 30 seeds) and moves 5 GB/s of its 5.8 from the middle on
    /// (5.6-5.9 over 30 seeds; steps of 1.5 reached it at GET 243 and moved 3.4-3.7; the
    /// climb that judged windows of landings moved 2.3), and past 41 GETs to 62 or the cap in
    /// a load of parts of 1 to 64 MiB (a climb judged on the first GETs to land stopped at
    /// 27); behind a 2.5 GB/s NIC it settles where it moves at least 90% of the NIC; fast
    /// connections on loopback stay at the model's count or one step above; a store that
    /// throttles beyond 30 GETs (first bytes seconds late) leaves this load no slower than
    /// the model's count alone would be (over 30 seeds the whole load moved 0.67x to 1.27x
    /// the bytes per second of that count, median 1.21x: a cohort that misses the throttled GETs keeps a
    /// count past 30; judged on the first GETs to land, it settled at 62 GETs, 0.63x).
    #[test]
    fn the_climb_judges_cohorts_of_gets() {
        let net = Net::new(16 * MIB, 64, usize::MAX);
        let l = load(&net, 256, &Store::per_connection(0.020, 90e6, 1e12));
        assert!(
            l.gets == 64 && l.reached <= 128 && l.rate >= 5.0e9,
            "{} GETs (from {}): {}",
            l.gets,
            l.reached,
            l.rate
        );
        let net = Net::new(16 * MIB, 64, usize::MAX);
        let mixed = Store { mixed: true, ..Store::per_connection(0.020, 90e6, 1e12) };
        let l = load(&net, 1024, &mixed);
        assert!(l.gets >= 62 && net.state.lock().climb.settled, "{} GETs", l.gets);
        let net = Net::new(16 * MIB, 64, usize::MAX);
        let l = load(&net, 1024, &Store::per_connection(0.020, 90e6, 2.5e9));
        assert!(net.state.lock().climb.settled, "{}", l.gets);
        assert!(l.rate >= 0.9 * 2.5e9, "{} GETs: {}", l.gets, l.rate);
        let net = Net::new(16 * MIB, 64, usize::MAX);
        let model = net.choose(Some((0.003, 500e6)), usize::MAX, 0).gets;
        let l = load(&net, 1024, &Store::per_connection(0.003, 500e6, 8e9));
        let settled = net.state.lock().climb.settled;
        assert!(settled && l.gets <= model * 3 / 2 + 1, "{} (model {model})", l.gets);
        let throttling = Store { throttle_above: 30, ..Store::per_connection(0.020, 90e6, 1e12) };
        let climbing = load(&Net::new(16 * MIB, 64, usize::MAX), 1024, &throttling);
        let model = Net::new(16 * MIB, 64, usize::MAX).choose(Some((0.020, 90e6)), usize::MAX, 0);
        let alone = load(&Net::new(16 * MIB, model.gets, usize::MAX), 1024, &throttling);
        let (c, a) = (climbing.whole, alone.whole);
        assert!(climbing.gets <= 41 && c >= 0.9 * a, "{} GETs: {c} against {a}", climbing.gets);
    }

    #[test]
    fn net_measures_means() {
        let net = Net::new(16 * MIB, 64, 64);
        assert_eq!(net.report(), None);
        assert_eq!(net.target(), Choice { gets: STREAMING, extents: 1 });
        net.record(0.030, 90_000_000, 1.0);
        net.record(0.010, 90_000_000, 1.0);
        let r = net.report().unwrap();
        assert!((r.ttfb_ms - 20.0).abs() < 1e-9 && (r.ttfb_min_ms - 10.0).abs() < 1e-9);
        assert!((r.connection_mb_s - 90.0).abs() < 1e-9, "{r:?}");
        // The choices follow the least TTFB: 0.9 MB waiting per connection.
        assert_eq!((r.in_flight, r.part_bytes, r.extent_bytes), (17, 16 * MIB, 16 * MIB));
        assert_eq!(net.target(), Choice { gets: 17, extents: 1 });
        // A busy store's queue (a long TTFB now and then) moves nothing.
        net.record(2.0, 90_000_000, 1.0);
        assert_eq!(net.target(), Choice { gets: 17, extents: 1 });
        // Far away (every GET waits 90 ms): larger parts, and the GETs they need.
        let far = Net::new(16 * MIB, 64, 64);
        far.record(0.090, 90_000_000, 1.0);
        let r = far.report().unwrap();
        assert_eq!((r.in_flight, r.part_bytes), (20, 32 * MIB), "{r:?}");
        assert_eq!(r.streaming, STREAMING, "no staging buffers bound the streams: {r:?}");
        // Staging for 32 extents: 16 GETs of two stream into them, 4 more wait.
        let near = Net::new(16 * MIB, 64, 32);
        near.record(0.090, 90_000_000, 1.0);
        assert_eq!(near.target(), Choice { gets: 20, extents: 2 });
        assert_eq!(near.report().unwrap().streaming, 16);
        // Staging for 8: 8 GETs of one stream into them, 4 more wait (0.48 of a part each).
        let small = Net::new(16 * MIB, 64, 8);
        small.record(0.090, 90_000_000, 1.0);
        let r = small.report().unwrap();
        assert_eq!((r.in_flight, r.streaming, r.part_bytes), (12, 8, 16 * MIB), "{r:?}");
    }
}
