//! The whole GPU pipeline (reader, pinned staging, host-to-device copies into device memory)
//! against the pinned host-to-device ceiling, cold and warm, as GB/s.
//!
//! IDs are `gantry/<path>` (`auto` picks per file; `direct` forces io_uring `O_DIRECT`,
//! `buffered` threads of `pread`) and `pinned-h2d` (64 MiB copies on 4 streams from
//! page-locked memory: what the copies alone can do). `cold` evicts the files before every
//! iteration (outside the timing). Without a GPU the bench prints why and measures nothing.
//! Input: `GANTRY_BENCH_CHECKPOINT`, or a generated 512 MiB checkpoint; device:
//! `GANTRY_BENCH_DEVICE` (an ordinal, default 0); seconds measured per ID:
//! `GANTRY_BENCH_SECONDS` (default 20).

use std::path::Path;
use std::time::{Duration, Instant};

mod common;

use common::checkpoint;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gantry::baseline;
use gantry::{Checkpoint, Config, CudaDevice, Loader, PathChoice};

fn gpu_pipeline(c: &mut Criterion) {
    let ordinal =
        std::env::var("GANTRY_BENCH_DEVICE").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let device = match CudaDevice::open(ordinal) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("gpu benches skipped: no GPU ({e})");
            return;
        }
    };
    let (path, source) = checkpoint();
    eprintln!("input: {source}; device cuda:{ordinal} ({})", device.name());
    let checkpoint = Checkpoint::open(&path).expect("checkpoint");
    let paths: Vec<&Path> = checkpoint.files.iter().map(|f| f.path.as_path()).collect();
    let bytes = checkpoint.total_bytes();
    let seconds =
        std::env::var("GANTRY_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    for cold in [true, false] {
        let mut group = c.benchmark_group(if cold { "gpu-cold" } else { "gpu-warm" });
        group
            .throughput(Throughput::Bytes(bytes))
            .sample_size(10)
            .measurement_time(Duration::from_secs(seconds));
        let prepare = || {
            if cold {
                baseline::evict(&paths).expect("evict");
            } else {
                baseline::warm(&paths).expect("warm");
            }
        };
        for (name, choice) in [
            ("auto", PathChoice::Auto),
            ("direct", PathChoice::Direct),
            ("buffered", PathChoice::Buffered),
        ] {
            let loader = Loader::new(Config::default().path(choice)).expect("config");
            let mut model = loader.load_to_device(&path, &device).expect("load");
            group.bench_function(BenchmarkId::new("gantry", name), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        prepare();
                        let start = Instant::now();
                        loader.reload_device(&mut model).expect("load");
                        total += start.elapsed();
                    }
                    total
                })
            });
        }
        group.bench_function(BenchmarkId::new("pinned-h2d", "64MiB/4"), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        let m = baseline::pinned_h2d(&device, bytes as usize).expect("copy");
                        Duration::from_secs_f64(m.seconds)
                    })
                    .sum()
            })
        });
        group.finish();
    }
}

criterion_group!(benches, gpu_pipeline);
criterion_main!(benches);
