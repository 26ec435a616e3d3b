//! TCP bulk transfer on netchannel's user-space stack.
//!
//! ```text
//! tcp_bulk recv [--socket S] [--listen 0.0.0.0:9000]
//!     prints `listening on ADDR`; for one connection, reads to the end and prints
//!     `received BYTES sha256 HEX in SECS s (GBIT/s)`
//! tcp_bulk send --to ADDR --bytes N [--socket S]
//!     connects, sends N pseudo-random bytes, closes, and prints
//!     `sent BYTES sha256 HEX in SECS s (GBIT/s)`
//! ```
//!
//! `recv` is a server until its transfer is done: a connection that fails before its end (its
//! peer reset it, say) is reported on stderr and the next one is awaited. `send` is a client:
//! a failure ends it, with a non-zero exit status.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Instant;

use netchannel::stack::{Stack, TcpListener, TcpStream};
use netchannel_examples::{Backoff, Reporter};
use sha2::{Digest, Sha256};

fn print_report(what: &str, bytes: u64, hash: Sha256, t0: Instant) {
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{what} {bytes} sha256 {} in {secs:.3} s ({:.3} Gbit/s)",
        netchannel_examples::hex(&hash.finalize()),
        bytes as f64 * 8.0 / secs.max(1e-9) / 1e9
    );
}

fn recv(args: &[String]) -> Result<(), String> {
    let stack = Stack::connect(&netchannel_examples::socket(args)).map_err(|e| e.to_string())?;
    let listen = netchannel_examples::addr(args, "--listen", "0.0.0.0:9000")?;
    let listener = TcpListener::bind(&stack, listen).map_err(|e| e.to_string())?;
    println!(
        "listening on {}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let report = Reporter::new("tcp_bulk");
    let mut backoff = Backoff::default();
    // Until one connection has been read to its end: one that fails (reset by its peer, say)
    // is reported, and the next one is awaited.
    loop {
        let (mut conn, peer) = match listener.accept() {
            Ok(c) => {
                backoff.reset();
                c
            }
            Err(e) if netchannel_examples::stack_broken(&stack) => {
                return Err(format!("accept: {e}"));
            }
            Err(e) => {
                report.report(format_args!("accept: {e}; retrying"));
                backoff.wait();
                continue;
            }
        };
        let t0 = Instant::now();
        let (mut hash, mut total) = (Sha256::new(), 0u64);
        let mut buf = vec![0u8; 256 * 1024];
        let ended = loop {
            match conn.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    hash.update(&buf[..n]);
                    total += n as u64;
                }
                Err(e) => break Err(e),
            }
        };
        match ended {
            Ok(()) => {
                print_report("received", total, hash, t0);
                return Ok(());
            }
            Err(e) if netchannel_examples::stack_broken(&stack) => {
                return Err(format!("from {peer}, after {total} bytes: {e}"));
            }
            Err(e) => report.report(format_args!(
                "connection from {peer} failed after {total} bytes: {e}; waiting for another"
            )),
        }
    }
}

fn send(args: &[String]) -> Result<(), String> {
    let stack = Stack::connect(&netchannel_examples::socket(args)).map_err(|e| e.to_string())?;
    if netchannel_examples::arg(args, "--to").is_none() {
        return Err("--to ADDR is required".into());
    }
    let to = netchannel_examples::addr(args, "--to", "")?;
    let bytes: u64 = netchannel_examples::arg(args, "--bytes")
        .ok_or("--bytes N is required")?
        .parse()
        .map_err(|_| "--bytes: not a number")?;
    let mut conn = TcpStream::connect(&stack, to).map_err(|e| format!("connect {to}: {e}"))?;
    let t0 = Instant::now();
    let (mut hash, mut sent) = (Sha256::new(), 0u64);
    let mut buf = vec![0u8; 256 * 1024];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while sent < bytes {
        let n = (bytes - sent).min(buf.len() as u64) as usize;
        for chunk in buf[..n].chunks_mut(8) {
            // xorshift64: cheap bytes that no layer can compress away.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        conn.write_all(&buf[..n])
            .map_err(|e| format!("after {sent} bytes: {e}"))?;
        hash.update(&buf[..n]);
        sent += n as u64;
    }
    conn.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    // Wait for the peer to close too, so every byte was taken before we go.
    let mut rest = [0u8; 64];
    while conn.read(&mut rest).map_err(|e| e.to_string())? > 0 {}
    print_report("sent", sent, hash, t0);
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("recv") => recv(&args),
        Some("send") => send(&args),
        _ => Err("usage: tcp_bulk recv [--listen ADDR] | send --to ADDR --bytes N".into()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcp_bulk: {e}");
            ExitCode::FAILURE
        }
    }
}
