//! An HTTP/1.1 static file server on netchannel's user-space stack.
//!
//! `http_server --root DIR [--socket NEXUS_SOCKET] [--listen 0.0.0.0:8080]`: prints
//! `listening on ADDR`, then serves `GET` and `HEAD` for the files under DIR (no directory
//! listings, nothing outside DIR), one thread per connection, with keep-alive.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

use netchannel::stack::{Stack, TcpListener, TcpStream};

/// Longest request head accepted.
const MAX_HEAD: usize = 16 * 1024;

fn run(args: &[String]) -> Result<(), String> {
    let root =
        PathBuf::from(netchannel_examples::arg(args, "--root").ok_or("--root DIR is required")?);
    if !root.is_dir() {
        return Err(format!("{} is not a directory", root.display()));
    }
    let stack = Stack::connect(&netchannel_examples::socket(args)).map_err(|e| e.to_string())?;
    let listen = netchannel_examples::addr(args, "--listen", "0.0.0.0:8080")?;
    let listener =
        TcpListener::bind(&stack, listen).map_err(|e| format!("listen on {listen}: {e}"))?;
    println!(
        "listening on {}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    loop {
        let (conn, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        let root = root.clone();
        std::thread::spawn(move || {
            if let Err(e) = serve(conn, &root) {
                eprintln!("http_server: connection: {e}");
            }
        });
    }
}

/// Serves requests on one connection until the client closes it or asks to.
fn serve(conn: TcpStream, root: &Path) -> std::io::Result<()> {
    let mut reader = BufReader::with_capacity(64 * 1024, &conn);
    loop {
        let mut head = Vec::new();
        // Read the head, line by line, up to the blank line.
        loop {
            let mut line = Vec::new();
            if reader.read_until(b'\n', &mut line)? == 0 {
                return Ok(());
            }
            let blank = line == b"\r\n" || line == b"\n";
            head.extend_from_slice(&line);
            if head.len() > MAX_HEAD {
                return respond(&conn, "431 Request Header Fields Too Large", b"", true);
            }
            if blank {
                break;
            }
        }
        let head = String::from_utf8_lossy(&head);
        let mut words = head.lines().next().unwrap_or_default().split_whitespace();
        let (method, target) = (
            words.next().unwrap_or_default(),
            words.next().unwrap_or("/"),
        );
        let close = head.lines().any(|l| {
            l.to_ascii_lowercase().starts_with("connection:")
                && l.to_ascii_lowercase().contains("close")
        });
        if method != "GET" && method != "HEAD" {
            respond(&conn, "405 Method Not Allowed", b"", true)?;
            return Ok(());
        }
        let Some(path) = resolve(root, target) else {
            respond(&conn, "404 Not Found", b"not found\n", close)?;
            if close {
                return Ok(());
            }
            continue;
        };
        let Ok(mut file) = std::fs::File::open(&path) else {
            respond(&conn, "404 Not Found", b"not found\n", close)?;
            if close {
                return Ok(());
            }
            continue;
        };
        let len = file.metadata()?.len();
        let mut w = &conn;
        write!(
            w,
            "HTTP/1.1 200 OK\r\ncontent-length: {len}\r\ncontent-type: application/octet-stream\r\n{}\r\n",
            if close { "connection: close\r\n" } else { "" }
        )?;
        if method == "GET" {
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                w.write_all(&buf[..n])?;
            }
        }
        if close {
            return Ok(());
        }
    }
}

/// The file under `root` that `target` names, if it is a plain relative path to a file.
fn resolve(root: &Path, target: &str) -> Option<PathBuf> {
    let path = target.split(['?', '#']).next()?.trim_start_matches('/');
    let rel = Path::new(path);
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    let full = root.join(rel);
    full.is_file().then_some(full)
}

fn respond(conn: &TcpStream, status: &str, body: &[u8], close: bool) -> std::io::Result<()> {
    let mut w = conn;
    write!(
        w,
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\n{}\r\n",
        body.len(),
        if close { "connection: close\r\n" } else { "" }
    )?;
    w.write_all(body)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("http_server: {e}");
            ExitCode::FAILURE
        }
    }
}
