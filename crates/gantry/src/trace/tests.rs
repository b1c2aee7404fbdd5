use super::*;

fn span_event(cat: &'static str, name: &'static str, t: (u64, u64), args: Args) -> Event {
    let kind = Kind::Span { dur_ns: t.1 - t.0 };
    Event { kind, ts_ns: t.0, track: 1, cat: cat.into(), name: name.into(), args }
}

#[test]
fn a_thread_without_a_trace_records_nothing_and_threads_of_two_traces_never_mix() {
    instant("tensor", "landed", || panic!("arguments built while off"));
    let _s = span("phase", "off").args(|_| panic!("arguments built while off"));
    assert!(current().is_none() && now().is_none());
    let (a, b) = (Trace::new(), Trace::new());
    std::thread::scope(|s| {
        for (trace, n) in [(&a, 3u64), (&b, 5u64)] {
            s.spawn(move || {
                let _in = enter(Some(trace), "worker");
                for i in 0..n {
                    instant("tensor", "landed", || Args::new().u64("i", i));
                }
                // Entering the same trace again nests without a second track.
                let _again = enter(Some(trace), "again");
            });
        }
    });
    assert!(!on(), "the guard restored the thread");
    assert_eq!(a.events().len(), 3);
    assert_eq!(b.events().len(), 5);
    assert_eq!(a.track_names(), vec!["worker".to_owned()]);
}

#[test]
fn spans_nest_on_a_thread_and_a_file_reads_back_as_written() {
    let trace = Trace::new();
    {
        let _in = enter(Some(&trace), "main \"thread\"");
        let _outer = span("phase", "load");
        {
            let _inner = span("read", "read").args(|a| a.u64("bytes", 4096).str("file", "a\nb"));
        }
        counter("staging", "staging slots in use", 2);
    }
    let events = trace.events();
    let text = to_json(&events, &trace.track_names());
    let back = parse(&text).unwrap();
    assert_eq!(back.tracks, trace.track_names());
    assert_eq!(back.events.len(), events.len());
    for (a, b) in events.iter().zip(&back.events) {
        assert_eq!(
            (a.kind, a.ts_ns, a.track, &a.cat, &a.name),
            (b.kind, b.ts_ns, b.track, &b.cat, &b.name)
        );
    }
    let inner = back.events.iter().find(|e| e.name == "read").unwrap();
    let outer = back.events.iter().find(|e| e.name == "load").unwrap();
    assert!(outer.ts_ns <= inner.ts_ns && inner.end_ns() <= outer.end_ns());
    assert_eq!((inner.u64("bytes"), inner.str("file")), (Some(4096), Some("a\nb")));
    // The derived counter of reads in flight went up to one and back.
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let counters: Vec<u64> = v["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["cat"] == "derived")
        .map(|e| e["args"]["reads"].as_u64().unwrap())
        .collect();
    assert_eq!(counters, vec![1, 0]);
}

#[test]
fn bad_trace_files_are_errors_not_panics() {
    for text in [
        "",
        "{",
        "[1, 2]",
        r#"{"traceEvents": 3}"#,
        r#"{"x": []}"#,
        r#"[{"ph":"X","ts":1,"name":"a"}]"#,
        r#"[{"ph":"X","ts":-1,"dur":1}]"#,
        r#"[{"ph":"M","name":"thread_name","tid":99999999999}]"#,
        r#"[{"ph":"M","name":"thread_name","tid":4000000000,"args":{"name":"x"}}]"#,
    ] {
        match parse(text) {
            Err(e) => assert!(!e.is_empty()),
            Ok(p) => assert!(p.events.is_empty(), "{text}: {p:?}"),
        }
    }
}

#[test]
fn lanes_put_overlapping_spans_on_tracks_of_their_own() {
    let trace = Trace::new();
    let lanes = Lanes::new(Arc::clone(&trace), "GETs");
    let a = lanes.begin();
    let b = lanes.begin();
    lanes.end(a, "read", "GET", Args::new());
    let c = lanes.begin(); // reuses a's lane
    lanes.end(b, "read", "GET", Args::new());
    lanes.end(c, "read", "GET", Args::new());
    let events = trace.events();
    assert_eq!(trace.track_names(), vec!["GETs 0".to_owned(), "GETs 1".to_owned()]);
    for t in [1, 2] {
        let mut on: Vec<&Event> = events.iter().filter(|e| e.track == t).collect();
        on.sort_by_key(|e| e.ts_ns);
        assert!(on.windows(2).all(|w| w[0].end_ns() <= w[1].ts_ns));
    }
}

/// A load's events: a `load` phase of 1000 ns, `settings`, then `extra`.
fn load_of(settings: &Settings, extra: Vec<Event>) -> Vec<Event> {
    let mut events = vec![span_event("phase", "load", (0, 1000), Args::new())];
    let mut s = span_event("gantry", "settings", (0, 0), settings.args());
    s.kind = Kind::Instant;
    events.push(s);
    events.extend(extra);
    events
}

fn read(volume: &str, reader: &str, t: (u64, u64)) -> Event {
    let args = Args::new().str("volume", volume).str("reader", reader).u64("bytes", 10);
    span_event("read", "read", t, args)
}

fn staging(t: u64, value: u64) -> Event {
    let kind = Kind::Counter { value };
    Event {
        kind,
        ts_ns: t,
        track: 1,
        cat: "staging".into(),
        name: "in use".into(),
        args: Args::new(),
    }
}

/// What, the ceilings, the events, the stage and setting expected, and a piece of evidence.
type Case<'a> = (&'a str, &'a Settings, Vec<Event>, Bound, Option<&'a str>, &'a str);

#[test]
fn the_verdict_names_the_stage_that_bound_the_load() {
    let two_volumes = Settings {
        volumes: vec![("nvme0n1".into(), 2), ("nvme1n1".into(), 2)],
        staging_slots: 4,
        ..Settings::default()
    };
    let warm = Settings { threads: 2, warm: true, ..Settings::default() };
    let cold = Settings { threads: 2, warm: false, staging_slots: 4, ..Settings::default() };
    let objects = Settings { object_concurrency: 2, staging_slots: 2, ..Settings::default() };
    let host = |t| span_event("copy", "host copy", t, Args::new());
    let device = |t| span_event("copy", "device copy", t, Args::new().u64("gpu", 0));
    let hash = |t| span_event("hash", "sha256", t, Args::new());
    let status = |t| span_event("exchange", "status", t, Args::new().u64("round", 0));
    let broadcast = |t| span_event("exchange", "broadcast", t, Args::new().u64("bytes", 64));
    let finish = |t| span_event("exchange", "finish", t, Args::new());
    let waiting = |t| span_event("exchange", "waiting for pieces", t, Args::new());
    #[rustfmt::skip]
    let cases: Vec<Case<'_>> = vec![
        ("both volumes always reading", &two_volumes,
            vec![read("nvme0n1", "direct", (0, 1000)), read("nvme1n1", "direct", (0, 990))],
            Bound::Storage, Some("--queue-depth"), "reads in flight 100% of the load on 2 of 2 volumes"),
        ("reads, but staging full and copies busy", &two_volumes,
            vec![read("nvme0n1", "direct", (0, 900)), staging(0, 4), host((0, 950))],
            Bound::HostCopy, None, "staging full 100%"),
        ("staging full, the copy engine the busiest", &two_volumes,
            vec![read("nvme0n1", "direct", (0, 900)), staging(0, 2), staging(100, 4),
                 device((0, 1000)), host((0, 100))],
            Bound::DeviceCopy, None, "copy engine of GPU 0 busy 100%"),
        ("warm buffered threads always copying", &warm,
            vec![read("buffered", "buffered", (0, 1000)), read("buffered", "buffered", (0, 1000))],
            Bound::HostCopy, Some("--threads"), "buffered reads (page cache) busy 100% of 2 threads"),
        ("cold buffered threads always reading", &cold,
            vec![read("buffered", "buffered", (0, 1000)), read("buffered", "buffered", (0, 800))],
            Bound::Storage, Some("--threads"), "staging never full"),
        ("GETs always in flight", &objects,
            vec![read("object storage", "object", (0, 1000))],
            Bound::Network, Some("--object-concurrency"), "GETs in flight 100% of the load (0% at 2"),
        ("hashing holds the ring", &cold,
            vec![read("buffered", "buffered", (0, 300)), staging(0, 4), hash((0, 1000))],
            Bound::Hashing, None, "hashing busy 100% of 1 threads"),
        ("nothing busy", &two_volumes,
            vec![read("nvme0n1", "direct", (0, 100)), host((100, 200))],
            Bound::Cpu, None, "no stage busy 50% of the load"),
        ("the exchange at work while the readers wait on it", &two_volumes,
            vec![read("nvme0n1", "direct", (0, 200)), status((100, 600)), broadcast((600, 950))],
            Bound::Exchange, None, "exchange busy 85% (64 bytes broadcast)"),
        ("a busy exchange beside busy readers is the readers' load", &two_volumes,
            vec![read("nvme0n1", "direct", (0, 1000)), read("nvme1n1", "direct", (0, 1000)),
                 status((0, 500)), broadcast((500, 1000))],
            Bound::Storage, Some("--queue-depth"), "exchange busy 100%"),
        ("the exchange's tail after the last read is part of the load", &two_volumes,
            vec![read("nvme0n1", "direct", (0, 1000)), read("nvme1n1", "direct", (0, 1000)),
                 broadcast((900, 1000)), finish((1000, 4000))],
            Bound::Exchange, None, "reads in flight 25% of the load on 0 of 2 volumes"),
        ("an exchanger waiting for its own pieces is not at work", &two_volumes,
            vec![read("nvme0n1", "direct", (0, 100)), waiting((0, 1000)), status((990, 1000))],
            Bound::Cpu, None, "exchange busy 1%"),
        ("a read outside the load counts only inside it", &two_volumes,
            vec![read("nvme0n1", "direct", (900, 5000))],
            Bound::Cpu, None, "reads in flight 5% of the load on 0 of 2 volumes"),
    ];
    for (what, settings, extra, bound, setting, evidence) in cases {
        let usage = measure(&load_of(settings, extra)).expect("a load");
        let v = verdict(&usage);
        assert_eq!((v.bound, v.setting), (bound, setting), "{what}: {v}");
        assert!(v.to_string().contains(evidence), "{what}: {v}");
        assert!(v.to_string().starts_with(&format!("bound by {}: ", bound.name())), "{what}");
    }
    assert!(measure(&[read("a", "direct", (0, 1))]).is_none(), "no load phase, no verdict");
}

/// Two loads in one file read back apart, each under its own name and with its own tracks.
#[test]
fn processes_of_a_merged_file_read_back_apart() {
    let a = vec![span_event("read", "read", (5, 9), Args::new().u64("bytes", 7))];
    let b = vec![span_event("phase", "load", (1, 2), Args::new())];
    let (ta, tb) = (vec!["reader".to_owned()], vec!["main".to_owned(), "x".to_owned()]);
    let text = to_json_processes(&[
        Process { pid: 1, name: "rank 0 (cpu)".into(), events: &a, tracks: &ta },
        Process { pid: 2, name: "rank 1 (cpu)".into(), events: &b, tracks: &tb },
    ]);
    let back = parse_processes(&text).unwrap();
    let names: Vec<(u32, &str)> = back.iter().map(|(p, n, _)| (*p, n.as_str())).collect();
    assert_eq!(names, [(1, "rank 0 (cpu)"), (2, "rank 1 (cpu)")]);
    assert_eq!((back[0].2.tracks.clone(), back[1].2.tracks.clone()), (ta, tb));
    assert_eq!(back[0].2.events.len(), 1);
    assert_eq!(back[0].2.events[0].u64("bytes"), Some(7));
    assert_eq!(back[1].2.events[0].name, "load");
    assert_eq!(parse(&text).unwrap().events.len(), 2, "parse takes every process together");
}
