fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (url, staging_mib) = (&args[1], args[2].parse::<usize>().unwrap());
    let mut config = gantry::Config::default().staging_bytes(staging_mib << 20);
    if let Some(c) = args.get(3) {
        config = config.object_concurrency(c.parse().unwrap());
    }
    let checkpoint = gantry::open_with(url, &config).unwrap();
    let loader = gantry::Loader::new(config).unwrap();
    let mut params: Vec<Vec<u8>> =
        checkpoint.tensors.iter().map(|t| vec![1u8; t.len as usize]).collect();
    let mut slots = params.iter_mut();
    let t = std::time::Instant::now();
    let r = loader.load_into(&checkpoint, |_| slots.next().map(|p| &mut p[..]), |_| {}).unwrap();
    let s = t.elapsed().as_secs_f64();
    println!(
        "{:.3} GB/s staged {} MB {:?}",
        r.tensor_bytes as f64 / s / 1e9,
        r.staging_bytes >> 20,
        r.object
    );
}
