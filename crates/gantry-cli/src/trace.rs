//! `gantry trace summarize FILE`: a trace written by `gantry load --trace` read back on any
//! machine: the verdict (computed by the same function `--explain` uses), each volume's and
//! GPU's utilisation, and a histogram of read latencies. A merged `--ranks` trace (a process
//! per rank) is summarized rank by rank, under each process's name.

use std::error::Error;
use std::io::Read;
use std::path::{Path, PathBuf};

use gantry::trace::{self, Event, Kind};

use crate::units;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print what bound the load, per-volume and per-GPU utilisation and read latencies.
    Summarize {
        /// A trace written by `gantry load --trace FILE`.
        file: PathBuf,
    },
}

pub fn run(args: &Args) -> Result<(), Box<dyn Error>> {
    match &args.command {
        Command::Summarize { file } => summarize(file),
    }
}

/// The file's text, refusing one larger than a trace can be.
pub fn read_capped(path: &Path) -> Result<String, Box<dyn Error>> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let cap = trace::TRACE_TEXT_MAX_BYTES as u64;
    let mut text = String::new();
    file.take(cap + 1).read_to_string(&mut text).map_err(|e| format!("{}: {e}", path.display()))?;
    if text.len() as u64 > cap {
        return Err(format!("{}: larger than {} bytes: not a trace", path.display(), cap).into());
    }
    Ok(text)
}

fn summarize(path: &Path) -> Result<(), Box<dyn Error>> {
    let processes = trace::parse_processes(&read_capped(path)?)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let loads: Vec<_> = (processes.iter())
        .filter_map(|(_, name, p)| Some((name, trace::measure(&p.events)?, &p.events)))
        .collect();
    if loads.is_empty() {
        return Err(format!(
            "{}: no load phase in this trace (was it written by gantry load --trace?)",
            path.display()
        )
        .into());
    }
    let merged = loads.len() > 1;
    for (name, usage, events) in loads {
        if merged {
            println!("{name}:");
        }
        summarize_load(&usage, events);
    }
    Ok(())
}

/// One load's summary.
fn summarize_load(usage: &trace::Usage, events: &[Event]) {
    println!("{}", trace::verdict(usage));
    let seconds = usage.window_ns as f64 / 1e9;
    let rate = if seconds > 0.0 { usage.read_bytes as f64 / seconds / 1e9 } else { 0.0 };
    println!("load: {seconds:.3} s, {} read ({rate:.2} GB/s)", units::bytes(usage.read_bytes));
    for v in &usage.volumes {
        println!(
            "volume {}: reads in flight {:.0}% of the load, {} at once {:.0}%, {} reads, {}",
            v.name,
            v.busy * 100.0,
            v.depth,
            v.full * 100.0,
            v.reads,
            units::bytes(v.bytes)
        );
    }
    if let Some(b) = usage.buffered {
        println!("buffered reads: busy {:.0}% of {} threads", b * 100.0, usage.settings.threads);
    }
    if let Some((busy, full)) = usage.objects {
        println!(
            "object GETs: in flight {:.0}% of the load, {:.0}% at the most allowed",
            busy * 100.0,
            full * 100.0
        );
    }
    if usage.settings.staging_slots > 0 {
        println!(
            "staging: {} slots, full {:.0}% of the load",
            usage.settings.staging_slots,
            usage.staging_full * 100.0
        );
    }
    if let Some(h) = usage.host_copy {
        println!("host copies: busy {:.0}% of the load", h * 100.0);
    }
    for (gpu, busy) in &usage.device_copy {
        println!("GPU {gpu}: copies queued or running {:.0}% of the load", busy * 100.0);
    }
    if let Some((busy, bytes)) = usage.exchange {
        println!(
            "exchange: at work {:.0}% of the load, {} broadcast",
            busy * 100.0,
            units::bytes(bytes)
        );
    }
    for line in histogram(events) {
        println!("{line}");
    }
}

/// Read latencies, and the object GETs' times to first byte, each in power-of-two buckets
/// of microseconds, one line per bucket.
fn histogram(events: &[Event]) -> Vec<String> {
    let reads = events.iter().filter(|e| e.cat == "read");
    let latencies: Vec<u64> = reads
        .clone()
        .filter_map(|e| match e.kind {
            Kind::Span { dur_ns } => Some(dur_ns / 1000),
            _ => None,
        })
        .collect();
    let ttfb: Vec<u64> = reads.filter_map(|e| e.u64("ttfb_us")).collect();
    let mut lines = buckets(&format!("read latency ({} reads):", latencies.len()), &latencies);
    lines.extend(buckets(&format!("GET time to first byte ({} GETs):", ttfb.len()), &ttfb));
    lines
}

/// `values` (microseconds) under `title` in power-of-two buckets; nothing when empty.
fn buckets(title: &str, values: &[u64]) -> Vec<String> {
    if values.is_empty() {
        return Vec::new();
    }
    let bucket = |us: u64| (64 - us.max(1).leading_zeros()) as usize; // 2^(b-1) <= us < 2^b
    let mut counts = vec![0usize; 65];
    for &us in values {
        counts[bucket(us)] += 1;
    }
    let most = counts.iter().copied().max().unwrap_or(1).max(1);
    let mut lines = vec![title.to_owned()];
    let first = counts.iter().position(|&c| c > 0).unwrap_or(0);
    let last = counts.iter().rposition(|&c| c > 0).unwrap_or(0);
    for (b, &count) in counts.iter().enumerate().take(last + 1).skip(first) {
        let below = 1u128 << b;
        let bar = "#".repeat((count * 40).div_ceil(most));
        lines.push(format!("  < {below:>9} us {count:>7} {bar}"));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry::trace::Args;

    fn get(dur_us: u64, ttfb_us: Option<u64>) -> Event {
        let args = Args::new().str("reader", "object").u64("bytes", 1);
        let args = match ttfb_us {
            Some(t) => args.u64("ttfb_us", t).u64("transfer_us", dur_us - t),
            None => args,
        };
        let kind = Kind::Span { dur_ns: dur_us * 1000 };
        Event { kind, ts_ns: 0, track: 1, cat: "read".into(), name: "read".into(), args }
    }

    /// Request latencies and times to first byte land in the power-of-two buckets counted by
    /// hand: 3 us in [2, 4), 5 and 7 in [4, 8), 1000 in [512, 1024); a GET without a first
    /// byte has a latency but no TTFB.
    #[test]
    fn ttfb_histogram_beside_the_latency_one() {
        let events = [get(1000, Some(3)), get(1500, Some(5)), get(2000, Some(7)), get(9, None)];
        let lines = histogram(&events);
        let at = lines.iter().position(|l| l == "GET time to first byte (3 GETs):").unwrap();
        assert_eq!(lines[0], "read latency (4 reads):");
        let counts = |from: usize, to: usize| -> Vec<(String, usize)> {
            lines[from..to]
                .iter()
                .map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f[1].to_owned(), f[3].parse().unwrap())
                })
                .filter(|c| c.1 > 0)
                .collect()
        };
        let want = |v: &[(&str, usize)]| -> Vec<(String, usize)> {
            v.iter().map(|(b, c)| (b.to_string(), *c)).collect()
        };
        assert_eq!(counts(1, at), want(&[("16", 1), ("1024", 1), ("2048", 2)]));
        assert_eq!(counts(at + 1, lines.len()), want(&[("4", 1), ("8", 2)]));
    }
}
