//! What recording a timeline costs: the same warm load untraced and with `Config::trace`
//! (events into per-thread buffers, written as JSON after the load), as GB/s. The untraced figure is the one the
//! `readers` bench's `warm` group shows: the untraced path looks up one thread-local per hook
//! and records nothing.

use std::time::{Duration, Instant};

mod common;

use common::checkpoint;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gantry::{Checkpoint, Config, Loader};

fn tracing(c: &mut Criterion) {
    let (path, source) = checkpoint();
    eprintln!("input: {source}");
    let bytes = Checkpoint::open(&path).expect("checkpoint").total_bytes();
    let dir = std::env::temp_dir().join(format!("gantry-bench-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let mut group = c.benchmark_group("trace");
    group
        .throughput(Throughput::Bytes(bytes))
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));
    let settings = [
        ("untraced", Config::default()),
        ("trace-file", Config::default().trace(dir.join("load.json"))),
    ];
    for (name, config) in settings {
        let loader = Loader::new(config).expect("config");
        let mut model = loader.load(&path).expect("load"); // and warms the page cache
        group.bench_function(BenchmarkId::new(name, "warm"), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        let start = Instant::now();
                        loader.reload(&mut model).expect("load");
                        start.elapsed()
                    })
                    .sum()
            })
        });
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, tracing);
criterion_main!(benches);
