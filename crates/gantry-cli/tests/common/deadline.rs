//! A child process run to completion within a deadline, its output read while it runs (a full
//! pipe would stall it): a command that hangs fails the test instead of the suite.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Runs `cmd` to completion within 60 s; kills it and fails the test past that.
pub fn run_with_deadline(mut cmd: Command) -> Output {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: kill has no memory preconditions; `pid` is our unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("gantry hangs: {cmd:?}");
        }
    }
}
