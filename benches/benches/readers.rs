//! gantry's readers against plain baselines, in one group per cache state, as GB/s.
//!
//! IDs are `<reader>/<chunk>/<qd>`: `direct` (io_uring `O_DIRECT`), `buffered` (threads of
//! `pread`); the baselines are `pread-odirect` (64 MiB requests, 8 threads) and
//! `read-buffered` (16 threads of `pread` into a pre-faulted buffer). `cold` evicts the files
//! from the page cache before every iteration (outside the timing).

use std::path::Path;
use std::time::{Duration, Instant};

mod common;

use common::checkpoint;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gantry::baseline::{self, Prefaulted};
use gantry::{Checkpoint, Config, Loader, PathChoice};

fn readers(c: &mut Criterion) {
    let (path, source) = checkpoint();
    eprintln!("input: {source}");
    let checkpoint = Checkpoint::open(&path).expect("checkpoint");
    let paths: Vec<&Path> = checkpoint.files.iter().map(|f| f.path.as_path()).collect();
    let bytes = checkpoint.total_bytes();
    for cold in [true, false] {
        let mut group = c.benchmark_group(if cold { "cold" } else { "warm" });
        group
            .throughput(Throughput::Bytes(bytes))
            .sample_size(10)
            .measurement_time(Duration::from_secs(20));
        let evict = || {
            if cold {
                baseline::evict(&paths).expect("evict");
            }
        };
        for (reader, chunk_mib, qd) in [
            (PathChoice::Direct, 16, 8),
            (PathChoice::Direct, 64, 8),
            (PathChoice::Direct, 64, 4),
            (PathChoice::Buffered, 16, 0),
        ] {
            let config =
                Config::default().path(reader).chunk_bytes(chunk_mib << 20).queue_depth(qd.max(1));
            let loader = Loader::new(config).expect("config");
            let name = if reader == PathChoice::Direct { "direct" } else { "buffered" };
            let id = BenchmarkId::new(name, format!("{chunk_mib}MiB/{qd}"));
            let mut model = loader.load(&path).expect("load");
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        evict();
                        let start = Instant::now();
                        loader.reload(&mut model).expect("load");
                        total += start.elapsed();
                    }
                    total
                })
            });
        }
        group.bench_function(BenchmarkId::new("pread-odirect", "64MiB/8"), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        evict();
                        let start = Instant::now();
                        baseline::read_direct(&paths, 64 << 20, 8).expect("read");
                        start.elapsed()
                    })
                    .sum()
            })
        });
        let mut target = Prefaulted::new(&paths).expect("buffers");
        group.bench_function(BenchmarkId::new("read-buffered", "16MiB/16"), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        evict();
                        let start = Instant::now();
                        target.read(16, 16 << 20).expect("read");
                        start.elapsed()
                    })
                    .sum()
            })
        });
        group.finish();
    }
}

criterion_group!(benches, readers);
criterion_main!(benches);
