//! Loads a checkpoint onto a GPU (host memory without one) and prints its tensor table.
//!
//!     cargo run --release -p gantry --example load_gpu -- CHECKPOINT [cuda:N]

use gantry::{Checkpoint, Config, CudaDevice, Loader};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: load_gpu CHECKPOINT [cuda:N]")?;
    let ordinal: u32 = args.next().and_then(|d| d.strip_prefix("cuda:")?.parse().ok()).unwrap_or(0);
    let loader = Loader::new(Config::default())?;
    let checkpoint = Checkpoint::open(&path)?;
    match CudaDevice::open(ordinal) {
        Ok(gpu) => {
            let model = loader.load_to_device_with(checkpoint, &gpu, |_| true, |_| {})?;
            println!(
                "{:<60} {:<6} {:<20} {:>14}  device address",
                "name", "dtype", "shape", "bytes"
            );
            for t in model.tensors() {
                let shape = format!("{:?}", t.entry.shape);
                println!(
                    "{:<60} {:<6} {shape:<20} {:>14}  {:#x}",
                    t.entry.name,
                    t.entry.dtype.to_string(),
                    t.entry.len,
                    t.ptr
                );
            }
            let r = model.report();
            println!(
                "{} tensors on cuda:{ordinal} ({}): {:.2} GB/s",
                model.tensors().count(),
                gpu.name(),
                r.gb_per_s()
            );
        }
        Err(e) => {
            eprintln!("no GPU ({e}); loading into host memory");
            let model = loader.load(&path)?;
            for t in model.tensors() {
                println!(
                    "{:<60} {:<6} {:?} {}",
                    t.entry.name,
                    t.entry.dtype.to_string(),
                    t.entry.shape,
                    t.entry.len
                );
            }
            println!("{:.2} GB/s into host memory", model.report().gb_per_s());
        }
    }
    Ok(())
}
