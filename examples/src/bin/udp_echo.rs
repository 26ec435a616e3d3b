//! A UDP echo server on netchannel's user-space stack.
//!
//! `udp_echo [--socket NEXUS_SOCKET] [--listen 0.0.0.0:7]`: prints `listening on ADDR`, then
//! sends every datagram back to where it came from, until killed.

use std::process::ExitCode;

use netchannel::stack::{Stack, UdpSocket};

fn run(args: &[String]) -> Result<(), String> {
    let stack = Stack::connect(&netchannel_examples::socket(args)).map_err(|e| e.to_string())?;
    let listen = netchannel_examples::addr(args, "--listen", "0.0.0.0:7")?;
    let sock = UdpSocket::bind(&stack, listen).map_err(|e| format!("bind {listen}: {e}"))?;
    println!(
        "listening on {}",
        sock.local_addr().map_err(|e| e.to_string())?
    );
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = sock.recv_from(&mut buf).map_err(|e| e.to_string())?;
        sock.send_to(&buf[..n], from).map_err(|e| e.to_string())?;
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
