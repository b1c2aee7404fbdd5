//! Chrome trace-event JSON, written and read back.
//!
//! Written: `{"traceEvents": [...], "displayTimeUnit": "ms"}` with one process (pid 1), a
//! `thread_name` and `thread_sort_index` record per track, complete events (`X`) for spans,
//! thread-scoped instants (`i`) and counters (`C`). The counters of reads in flight per
//! volume are derived here from the read spans (category `derived`), so reading a file back
//! skips them: they carry nothing the spans do not.
//!
//! Several loads in one file ([`to_json_processes`], how `--ranks` merges its ranks): one
//! process per load, named and sorted by a `process_name` and `process_sort_index` record,
//! each with its own tracks and derived counters. Pids start at 1: Perfetto treats pid 0 as
//! the kernel's idle task (`swapper`) and renames its threads.
//!
//! Read: any file in that format; events of other phases are skipped, so a trace edited or
//! merged by other tools still reads. [`parse`] takes every process together (a file of one
//! load); [`parse_processes`] keeps them apart (a merged file).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write;

use super::{Args, Event, Kind, Value};

/// The pid every track of a one-load file is drawn under.
const PID: u32 = 1;

/// Bytes of trace text [`parse`] accepts.
pub const TRACE_TEXT_MAX_BYTES: usize = 1 << 30;

fn quoted(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

fn micros(ns: u64) -> String {
    format!("{}.{:03}", ns / 1000, ns % 1000)
}

fn args_json(args: &Args) -> String {
    let mut out = String::from("{");
    for (i, (k, v)) in args.0.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&quoted(k));
        out.push(':');
        match v {
            Value::U64(n) => out.push_str(&n.to_string()),
            Value::Str(s) => out.push_str(&quoted(s)),
        }
    }
    out.push('}');
    out
}

/// `events` (tracks named by `tracks`, tid `i + 1` at `i`) as Chrome trace-event JSON.
pub fn to_json(events: &[Event], tracks: &[String]) -> String {
    to_json_processes(&[Process { pid: PID, name: "gantry".into(), events, tracks }])
}

/// One load's events in a file of several ([`to_json_processes`]).
#[derive(Debug, Clone)]
pub struct Process<'a> {
    /// Its pid (at least 1; also its place in the list Perfetto draws).
    pub pid: u32,
    /// Its name (`rank 0 (cuda:0)`).
    pub name: String,
    /// Its events, timestamps from the file's common origin.
    pub events: &'a [Event],
    /// Its track names, tid `i + 1` at `i`.
    pub tracks: &'a [String],
}

/// Several loads' events as one Chrome trace-event file, a process each.
pub fn to_json_processes(processes: &[Process<'_>]) -> String {
    let mut lines: Vec<String> = Vec::new();
    for p in processes {
        let pid = p.pid;
        lines.push(format!(
            r#"{{"ph":"M","name":"process_name","pid":{pid},"tid":0,"args":{{"name":{}}}}}"#,
            quoted(&p.name)
        ));
        lines.push(format!(
            r#"{{"ph":"M","name":"process_sort_index","pid":{pid},"tid":0,"args":{{"sort_index":{pid}}}}}"#
        ));
        for (i, name) in p.tracks.iter().enumerate() {
            let tid = i + 1;
            lines.push(format!(
                r#"{{"ph":"M","name":"thread_name","pid":{pid},"tid":{tid},"args":{{"name":{}}}}}"#,
                quoted(name)
            ));
            lines.push(format!(
                r#"{{"ph":"M","name":"thread_sort_index","pid":{pid},"tid":{tid},"args":{{"sort_index":{tid}}}}}"#
            ));
        }
        for e in p.events {
            let head = format!(
                r#""name":{},"cat":{},"ts":{},"pid":{pid},"tid":{}"#,
                quoted(&e.name),
                quoted(&e.cat),
                micros(e.ts_ns),
                e.track
            );
            lines.push(match e.kind {
                Kind::Span { dur_ns } => format!(
                    r#"{{"ph":"X",{head},"dur":{},"args":{}}}"#,
                    micros(dur_ns),
                    args_json(&e.args)
                ),
                Kind::Instant => {
                    format!(r#"{{"ph":"i","s":"t",{head},"args":{}}}"#, args_json(&e.args))
                }
                Kind::Counter { value } => {
                    format!(r#"{{"ph":"C",{head},"args":{{"value":{value}}}}}"#)
                }
            });
        }
        lines.extend(in_flight_counters(p.events, pid));
    }
    let mut out = String::from("{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n");
    for (i, line) in lines.iter().enumerate() {
        let _ = write!(out, "{line}{}", if i + 1 < lines.len() { ",\n" } else { "\n" });
    }
    out.push_str("]}\n");
    out
}

/// Per volume of the read spans, a counter of reads in flight at every change.
fn in_flight_counters(events: &[Event], pid: u32) -> Vec<String> {
    let mut changes: BTreeMap<&str, Vec<(u64, i64)>> = BTreeMap::new();
    for e in events.iter().filter(|e| e.cat == "read" && matches!(e.kind, Kind::Span { .. })) {
        let volume = e.str("volume").unwrap_or("reads");
        let list = changes.entry(volume).or_default();
        list.push((e.ts_ns, 1));
        list.push((e.end_ns(), -1));
    }
    let mut lines = Vec::new();
    for (volume, mut list) in changes {
        // Ends before starts at the same moment: back-to-back reads are not two in flight.
        list.sort_by_key(|&(t, d)| (t, d));
        let name = quoted(&format!("reads in flight {volume}"));
        let mut level = 0i64;
        let mut i = 0;
        while i < list.len() {
            let t = list[i].0;
            while i < list.len() && list[i].0 == t {
                level += list[i].1;
                i += 1;
            }
            lines.push(format!(
                r#"{{"ph":"C","name":{name},"cat":"derived","ts":{},"pid":{pid},"tid":0,"args":{{"reads":{}}}}}"#,
                micros(t),
                level.max(0)
            ));
        }
    }
    lines
}

/// A trace file read back: its events (derived counters left out) and track names.
#[derive(Debug, Clone, Default)]
pub struct Parsed {
    /// Events, ordered by time.
    pub events: Vec<Event>,
    /// Track names by tid (tid `i + 1` at `i`; unnamed tids are empty).
    pub tracks: Vec<String>,
}

fn to_ns(v: Option<&serde_json::Value>) -> Option<u64> {
    let us = v?.as_f64()?;
    (0.0..1.8e13).contains(&us).then(|| (us * 1000.0).round() as u64)
}

fn parse_args(v: Option<&serde_json::Value>) -> Args {
    let mut args = Args::new();
    if let Some(map) = v.and_then(|v| v.as_object()) {
        for (k, v) in map {
            let value = match v {
                serde_json::Value::String(s) => Value::Str(s.clone()),
                v => match v.as_u64() {
                    Some(n) => Value::U64(n),
                    None => continue,
                },
            };
            args.0.push((Cow::Owned(k.clone()), value));
        }
    }
    args
}

/// The event list of Chrome trace-event JSON (an object with `traceEvents`, or a bare array).
fn event_list(text: &str) -> Result<Vec<serde_json::Value>, String> {
    if text.len() > TRACE_TEXT_MAX_BYTES {
        return Err(format!("{} bytes, more than {TRACE_TEXT_MAX_BYTES}", text.len()));
    }
    let root: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    match root {
        serde_json::Value::Array(list) => Ok(list),
        mut v => match v.get_mut("traceEvents").map(serde_json::Value::take) {
            Some(serde_json::Value::Array(list)) => Ok(list),
            _ => Err("no traceEvents array: not a Chrome trace-event file".into()),
        },
    }
}

/// Reads Chrome trace-event JSON (an object with `traceEvents`, or a bare array), every
/// process together.
pub fn parse(text: &str) -> Result<Parsed, String> {
    let list = event_list(text)?;
    parse_list(&list.iter().collect::<Vec<_>>())
}

/// Reads Chrome trace-event JSON one process at a time: per pid, in pid order, its name
/// (from its `process_name` record; empty without one) and its events and tracks.
pub fn parse_processes(text: &str) -> Result<Vec<(u32, String, Parsed)>, String> {
    let list = event_list(text)?;
    let mut by_pid: BTreeMap<u32, Vec<&serde_json::Value>> = BTreeMap::new();
    let mut names: BTreeMap<u32, String> = BTreeMap::new();
    for (i, e) in list.iter().enumerate() {
        let pid = e.get("pid").and_then(|v| v.as_u64()).unwrap_or(0);
        let pid = u32::try_from(pid).map_err(|_| format!("event {i}: pid {pid} too large"))?;
        let field = |k: &str| e.get(k).and_then(|v| v.as_str()).unwrap_or("");
        if field("ph") == "M" && field("name") == "process_name" {
            let label = e.get("args").and_then(|a| a.get("name")).and_then(|n| n.as_str());
            names.insert(pid, label.unwrap_or("").to_owned());
        }
        by_pid.entry(pid).or_default().push(e);
    }
    let mut out = Vec::with_capacity(by_pid.len());
    for (pid, events) in by_pid {
        let parsed = parse_list(&events).map_err(|e| format!("pid {pid}: {e}"))?;
        out.push((pid, names.remove(&pid).unwrap_or_default(), parsed));
    }
    Ok(out)
}

fn parse_list(list: &[&serde_json::Value]) -> Result<Parsed, String> {
    let mut parsed = Parsed::default();
    for (i, e) in list.iter().enumerate() {
        let field = |k: &str| e.get(k).and_then(|v| v.as_str()).unwrap_or("");
        let tid = e.get("tid").and_then(|v| v.as_u64()).unwrap_or(0);
        let track = u32::try_from(tid).map_err(|_| format!("event {i}: tid {tid} too large"))?;
        let (ph, cat, name) = (field("ph"), field("cat"), field("name"));
        if ph == "M" && name == "thread_name" && track > 0 {
            let label = e.get("args").and_then(|a| a.get("name")).and_then(|n| n.as_str());
            let at = track as usize - 1;
            if at >= list.len() {
                return Err(format!("event {i}: tid {tid} beyond the file's events"));
            }
            if parsed.tracks.len() <= at {
                parsed.tracks.resize(at + 1, String::new());
            }
            parsed.tracks[at] = label.unwrap_or("").to_owned();
            continue;
        }
        if cat == "derived" {
            continue;
        }
        let kind = match ph {
            "X" => match to_ns(e.get("dur")) {
                Some(dur_ns) => Kind::Span { dur_ns },
                None => return Err(format!("event {i} ({name}): a span without a valid dur")),
            },
            "i" | "I" => Kind::Instant,
            "C" => {
                let args = e.get("args").and_then(|a| a.as_object());
                let value = args.and_then(|a| a.values().find_map(|v| v.as_u64()));
                Kind::Counter { value: value.unwrap_or(0) }
            }
            _ => continue,
        };
        let ts_ns = to_ns(e.get("ts")).ok_or(format!("event {i} ({name}): no valid ts"))?;
        let args = if ph == "C" { Args::new() } else { parse_args(e.get("args")) };
        let (cat, name) = (Cow::Owned(cat.to_owned()), Cow::Owned(name.to_owned()));
        parsed.events.push(Event { kind, ts_ns, track, cat, name, args });
    }
    parsed.events.sort_by_key(|e| (e.ts_ns, e.track));
    Ok(parsed)
}
