//! How many ranged GETs an object load keeps in flight, from what its own GETs measure.
//!
//! A GET of `part` bytes holds its connection for the time to first byte (TTFB: the request's
//! round trip and the store's lookup, 10-60 ms on cloud stores, microseconds on loopback) and
//! then `part / rate`, where `rate` is what the store serves one connection. Only the second
//! part moves bytes. To keep [`STREAMING`] connections streaming at once, the load needs
//! `STREAMING x (1 + ttfb x rate / part)` GETs in flight: the bandwidth-delay product
//! (`ttfb x rate` bytes per connection) in parts, on top of the streams themselves. So the
//! in-flight count rises with latency, bounded by `--object-concurrency` (a cap) and by the
//! staging buffers that hold the parts (memory).
//!
//! The GETs measure as they go: each records its TTFB (request to response headers) and its
//! body's bytes and seconds; the TTFB is their mean and the per-connection rate their bytes
//! over their body seconds. Before the first GET answers, the load starts with [`STREAMING`]
//! in flight. The part size is fixed when the load is planned (before any GET), so it is the
//! configured one; what was measured and kept in flight is reported ([`NetReport`]).

use parking_lot::Mutex;

/// Connections kept streaming at once: the fixed count gantry kept in flight before it
/// measured the network (and the default cap), so that measuring never keeps fewer GETs in
/// flight than that did: on loopback, 8 streams read 0.56x of the in-process ceiling where 16
/// read 0.65x (`benches/README.md`).
pub const STREAMING: usize = 16;

/// What the GETs of one load measured, and the in-flight count it led to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NetReport {
    /// Mean time to first byte of the GETs, milliseconds.
    pub ttfb_ms: f64,
    /// Bytes per second the store served one connection (body bytes over body seconds),
    /// MB/s (10^6).
    pub connection_mb_s: f64,
    /// GETs kept in flight once measured (the last count chosen).
    pub in_flight: usize,
    /// Bytes per ranged GET.
    pub part_bytes: u64,
}

/// GETs to keep in flight for parts of `part_bytes`, given the measured TTFB (seconds) and
/// per-connection rate (bytes per second), at most `cap` and `memory_parts` (staging buffers
/// for the parts), at least one. Unmeasured: [`STREAMING`], within the same bounds. Pure.
pub fn in_flight(
    measured: Option<(f64, f64)>,
    part_bytes: u64,
    cap: usize,
    memory_parts: usize,
) -> usize {
    let most = cap.min(memory_parts).max(1);
    let Some((ttfb_s, rate)) = measured.filter(|(t, r)| t.is_finite() && r.is_finite()) else {
        return STREAMING.clamp(1, most);
    };
    // Bytes one connection could have moved while it waited for its first byte, in parts.
    let waiting_parts = (ttfb_s.max(0.0) * rate.max(0.0)) / part_bytes.max(1) as f64;
    let wanted = (STREAMING as f64 * (1.0 + waiting_parts)).ceil();
    if wanted >= most as f64 {
        most
    } else {
        (wanted as usize).clamp(1, most)
    }
}

/// The measurements of one load's GETs, shared by them (one lock per GET, not per chunk).
#[derive(Debug)]
pub struct Net {
    part_bytes: u64,
    cap: usize,
    memory_parts: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    gets: u64,
    ttfb_s: f64,
    body_bytes: u64,
    body_s: f64,
    chosen: usize,
}

impl Default for Net {
    fn default() -> Self {
        Net::new(16 << 20, STREAMING, STREAMING)
    }
}

impl Net {
    /// For parts of `part_bytes`, at most `cap` GETs and `memory_parts` staging buffers.
    pub fn new(part_bytes: u64, cap: usize, memory_parts: usize) -> Self {
        Net { part_bytes, cap, memory_parts, state: Mutex::new(State::default()) }
    }

    /// Records one GET: its time to first byte, and its body's bytes and seconds.
    pub fn record(&self, ttfb_s: f64, body_bytes: u64, body_s: f64) {
        let mut s = self.state.lock();
        s.gets += 1;
        s.ttfb_s += ttfb_s;
        s.body_bytes += body_bytes;
        s.body_s += body_s;
    }

    /// The mean TTFB (seconds) and per-connection rate (bytes per second), once a GET with a
    /// body has answered.
    fn measured(s: &State) -> Option<(f64, f64)> {
        (s.gets > 0 && s.body_s > 0.0)
            .then(|| (s.ttfb_s / s.gets as f64, s.body_bytes as f64 / s.body_s))
    }

    /// GETs to keep in flight now (see [`in_flight`]).
    pub fn target(&self) -> usize {
        let mut s = self.state.lock();
        s.chosen = in_flight(Self::measured(&s), self.part_bytes, self.cap, self.memory_parts);
        s.chosen
    }

    /// What was measured and chosen; `None` when no GET answered with a body.
    pub fn report(&self) -> Option<NetReport> {
        let s = self.state.lock();
        let (ttfb_s, rate) = Self::measured(&s)?;
        Some(NetReport {
            ttfb_ms: ttfb_s * 1e3,
            connection_mb_s: rate / 1e6,
            in_flight: in_flight(
                Some((ttfb_s, rate)),
                self.part_bytes,
                self.cap,
                self.memory_parts,
            ),
            part_bytes: self.part_bytes,
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
            (Some((80.0, 400.0)), 8 * MIB, 64, 20, 20), // memory binds
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
    fn net_measures_means() {
        let net = Net::new(16 * MIB, 64, 64);
        assert_eq!(net.report(), None);
        assert_eq!(net.target(), STREAMING);
        net.record(0.010, 90_000_000, 1.0);
        net.record(0.030, 90_000_000, 1.0);
        let r = net.report().unwrap();
        assert!((r.ttfb_ms - 20.0).abs() < 1e-9 && (r.connection_mb_s - 90.0).abs() < 1e-9);
        assert_eq!((r.in_flight, r.part_bytes), (18, 16 * MIB));
        assert_eq!(net.target(), 18);
    }
}
