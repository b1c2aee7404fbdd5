//! A host load through the staging ring, from any source: every tensor into memory of the
//! caller's (`Loader::load_into`), so that extents holding several tensors land in staging
//! buffers first, as a device load's do. What the object reader's GETs measured and chose is
//! printed beside the rate: how a small ring fares far from a store, on a machine without a
//! GPU (`benches/README.md`).
//!
//!     cargo run --release -p gantry --example staged_probe -- SOURCE STAGING_MIB [CAP]
//!
//! SOURCE is a checkpoint (a path or an `s3://`, `gs://`, `az://` URL, with the store's usual
//! environment), STAGING_MIB the ring's size and CAP the most GETs in flight
//! (`--object-concurrency`).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: staged_probe SOURCE STAGING_MIB [CAP]";
    let (Some(source), Some(Ok(staging_mib))) = (args.first(), args.get(1).map(|a| a.parse()))
    else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let mut config =
        gantry::Config::default().staging_bytes(usize::saturating_mul(staging_mib, 1 << 20));
    match args.get(2).map(|a| a.parse()) {
        Some(Ok(cap)) => config = config.object_concurrency(cap),
        Some(Err(_)) => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
        None => {}
    }
    if let Err(e) = run(source, config) {
        eprintln!("staged_probe: {e}");
        std::process::exit(1);
    }
}

fn run(source: &str, config: gantry::Config) -> gantry::Result<()> {
    let checkpoint = gantry::open_with(source, &config)?;
    let loader = gantry::Loader::new(config)?;
    // Written before the load (its pages faulted in): the load's rate is the ring's.
    let mut params: Vec<Vec<u8>> =
        checkpoint.tensors.iter().map(|t| vec![1u8; t.len as usize]).collect();
    let mut slots = params.iter_mut();
    let start = std::time::Instant::now();
    let report = loader.load_into(&checkpoint, |_| slots.next().map(|p| &mut p[..]), |_| {})?;
    let seconds = start.elapsed().as_secs_f64();
    let rate = report.tensor_bytes as f64 / seconds / 1e9;
    println!("{rate:.3} GB/s, {} MiB of staging", report.staging_bytes >> 20);
    if let Some(net) = report.object {
        println!("{net:?}");
    }
    Ok(())
}
