//! `gantry serve`: load a checkpoint once, keep it in shared memory, and answer on a Unix
//! socket as a live source (`unix:///path`) until SIGTERM or SIGINT.
//!
//! The signals are blocked before any thread starts and taken by this thread alone, so the
//! end is always the clean one: the socket file removed, the memory of every version no lease
//! holds freed; readers holding a lease keep their memfds (the kernel keeps them alive).

use std::error::Error;
use std::path::PathBuf;

use gantry::live::{Server, ServerOptions, TerminationSignals};

use crate::options::{Device, LoadOptions};
use crate::units;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to serve (any source gantry loads) and how to load it; --device cpu keeps it in
    /// host memory (shared as sealed memfds), --device cuda:N on that GPU too (shared with
    /// readers on this host over CUDA IPC).
    #[command(flatten)]
    pub options: LoadOptions,
    /// The socket to answer on; readers load `unix://` followed by its absolute path.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// The socket file's mode, in octal: who may connect (0600: this user alone).
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = mode)]
    pub socket_mode: u32,
    /// Most connections (leases) one user may hold at once, so that one user cannot take every
    /// connection; more are refused, saying so.
    #[arg(
        long,
        value_name = "N",
        default_value_t = gantry::live::server::CONNECTIONS_PER_USER_DEFAULT,
        value_parser = connections_per_user
    )]
    pub max_connections_per_user: usize,
}

fn connections_per_user(text: &str) -> Result<usize, String> {
    let max = gantry::live::server::CONNECTIONS_MAX;
    match text.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("'{text}' is not a number of connections from 1 to {max}")),
    }
}

fn mode(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("'{text}' is not an octal file mode from 0 to 0777")),
    }
}

pub fn run(args: &Args) -> Result<(), Box<dyn Error>> {
    let device = match args.options.device.one()? {
        Device::Cpu => None,
        Device::Cuda(n) => Some(n),
    };
    let config = args.options.config()?;
    let signals = TerminationSignals::block()?;
    let options = ServerOptions {
        mode: args.socket_mode,
        device,
        max_connections_per_user: args.max_connections_per_user,
        ..ServerOptions::default()
    };
    let server = Server::start(&args.socket, &options)?;
    server.publish(&args.options.path, &config)?;
    let (version, tensors, bytes) = server.current().ok_or("nothing was published")?;
    let on = server.device().map_or(String::new(), |d| format!(" (and on cuda:{})", d.ordinal()));
    println!(
        "serving {tensors} tensors, {} ({bytes} bytes), version {version} on {}{on}",
        units::bytes(bytes),
        server.url()
    );
    let signal = signals.wait();
    log::info!("signal {signal}: closing {}", server.url());
    server.close();
    Ok(())
}
