//! A UDP echo server on netchannel's user-space stack.
//!
//! `udp_echo [--socket NEXUS_SOCKET] [--listen 0.0.0.0:7]`: prints `listening on ADDR`, then
//! sends every datagram back to where it came from, until killed.
//!
//! A datagram that cannot be echoed (one from source port 0, which has nowhere to go back to;
//! one too big for the path back; any other failed send) is reported on stderr and skipped:
//! the next one is echoed as usual. Only a stack that lost its nexus ends the server.

use std::process::ExitCode;

use netchannel::stack::{Stack, UdpSocket};
use netchannel_examples::{Backoff, Reporter};

fn run(args: &[String]) -> Result<(), String> {
    let stack = Stack::connect(&netchannel_examples::socket(args)).map_err(|e| e.to_string())?;
    let listen = netchannel_examples::addr(args, "--listen", "0.0.0.0:7")?;
    let sock = UdpSocket::bind(&stack, listen).map_err(|e| format!("bind {listen}: {e}"))?;
    println!(
        "listening on {}",
        sock.local_addr().map_err(|e| e.to_string())?
    );
    let report = Reporter::new("udp_echo");
    let mut backoff = Backoff::default();
    // Room for the largest datagram (a longer one would be cut to fit, as std's recv_from does).
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(got) => {
                backoff.reset();
                got
            }
            Err(e) if netchannel_examples::stack_broken(&stack) => {
                return Err(format!("receive: {e}"));
            }
            Err(e) => {
                report.report(format_args!("receive: {e}; retrying"));
                backoff.wait();
                continue;
            }
        };
        // The failure of one echo is that datagram's: say so and serve the next one.
        if let Err(e) = sock.send_to(&buf[..n], from) {
            report.report(format_args!("echo of {n} bytes to {from}: {e}; skipped"));
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("udp_echo: {e}");
            ExitCode::FAILURE
        }
    }
}
