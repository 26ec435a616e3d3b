//! An HTTP/1.1 file server on netchannel's user-space stack, or on kernel sockets: the request
//! handling is the same code over either (generic over [`Listener`]), so the two can be
//! compared on equal terms.
//!
//! ```text
//! http_server --root DIR [--upload DIR] [--listen ADDR]... [--socket NEXUS_SOCKET] [--kernel]
//!             [--pool N | --async]
//! ```
//!
//! * Prints `listening on ADDR` for each socket it listens on, then serves `GET` and `HEAD` for
//!   the files under `--root` (no directory listings, nothing outside it), with keep-alive.
//! * Three server styles, as real servers are written: one thread per connection (the
//!   default); `--pool N`, a fixed pool of N threads that take connections from a queue, each
//!   connection answered one request and closed (so that a client's idle keep-alive
//!   connection cannot hold a thread while others wait); `--async`, one thread running a
//!   current-thread tokio runtime with a task per connection (on the user-space stack only;
//!   `GET` and `HEAD` only).
//! * `--upload DIR`: `PUT /NAME` stores the request's body as `DIR/NAME`, atomically (written
//!   to a temporary file in DIR, synced, then renamed over NAME) and answers `201 Created`.
//!   The body is streamed to the file, never held whole in memory; it needs a
//!   `Content-Length` (`411 Length Required` without one, and for chunked bodies), and
//!   `Expect: 100-continue` is answered. NAME is one file name: not empty, no `/` or `\`, no
//!   `..`, no control characters, not starting with `.` (the temporary files' names do), at
//!   most 255 bytes; any other is `400 Bad Request`. Without `--upload`, PUT is
//!   `405 Method Not Allowed`.
//! * `--listen ADDR` (default `0.0.0.0:8080`) may be given more than once. `[::]:PORT` serves
//!   both families: the stack's flows keep IPv4 and IPv6 apart, so the server listens on
//!   `0.0.0.0:PORT` as well (the same port, picked once for port 0); with `--kernel`, the
//!   kernel's `[::]` socket takes IPv4 too (unless `net.ipv6.bindv6only` is set).
//! * `--kernel`: kernel sockets (`std::net`) instead of the user-space stack; no nexus is
//!   needed and `--socket` is ignored. Nagle's algorithm is off on them, as on the stack's.
//!
//! A connection that fails (a reset, a client that goes mid-request, a file that cannot be
//! read or stored) is reported on stderr and closed; the others are served on. A failed
//! `accept` is reported and retried after a backoff. Only a stack that lost its nexus ends
//! the server.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use netchannel::stack::{self, Stack};
use netchannel_examples::{Backoff, Reporter};

/// Longest request head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Longest body of a refused request that is read and dropped so that its connection can
/// serve the next request; a refused request with a longer body has its connection closed.
const MAX_DISCARD: u64 = 1024 * 1024;
/// Longest name of an upload (a file name's limit on Linux).
const MAX_NAME: usize = 255;
/// How many ports `[::]:0` tries for one that both families have free.
const PORT_TRIES: usize = 8;

/// What the connections share.
#[derive(Debug)]
struct Server {
    root: PathBuf,
    upload: Option<PathBuf>,
    report: Reporter,
    /// Each connection is answered one request, then closed (the pool style).
    one_request: bool,
}

/// How connections are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    /// A thread per connection.
    Threads,
    /// A fixed pool of this many threads.
    Pool(usize),
    /// Tasks on one thread's tokio runtime.
    Async,
}

impl Style {
    fn of(args: &[String]) -> Result<Self, String> {
        let pool = netchannel_examples::arg(args, "--pool");
        let is_async = netchannel_examples::flag(args, "--async");
        match (pool, is_async) {
            (Some(_), true) => Err("--pool and --async are two styles: choose one".into()),
            (Some(n), false) => match n.parse::<usize>() {
                Ok(n) if (1..=1024).contains(&n) => Ok(Self::Pool(n)),
                _ => Err(format!("--pool {n}: a number of threads from 1 to 1024")),
            },
            (None, true) => Ok(Self::Async),
            (None, false) => Ok(Self::Threads),
        }
    }
}

/// A listening socket the server takes connections from. The user-space stack's and the
/// kernel's are both one, so the request handling below is the same code over either.
trait Listener: Send + 'static {
    /// A connection.
    type Conn: Read + Write + Send + 'static;
    /// Waits for a connection.
    fn accept(&self) -> io::Result<(Self::Conn, SocketAddr)>;
    /// The address it listens on (with the port picked for port 0).
    fn local_addr(&self) -> io::Result<SocketAddr>;
    /// Whether `e`, from `accept`, means it can serve no more (rather than a failure of one
    /// connection, or a shortage that passes).
    fn fatal(&self, e: &io::Error) -> bool;
}

/// A listener on the user-space stack.
#[derive(Debug)]
struct StackListener {
    listener: stack::TcpListener,
    stack: Stack,
}

impl StackListener {
    fn bind(stack: &Stack, addr: SocketAddr) -> io::Result<Self> {
        Ok(Self {
            listener: stack::TcpListener::bind(stack, addr)?,
            stack: stack.clone(),
        })
    }
}

impl Listener for StackListener {
    type Conn = stack::TcpStream;
    fn accept(&self) -> io::Result<(Self::Conn, SocketAddr)> {
        self.listener.accept()
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
    fn fatal(&self, _: &io::Error) -> bool {
        netchannel_examples::stack_broken(&self.stack)
    }
}

/// The kernel twin.
impl Listener for std::net::TcpListener {
    type Conn = std::net::TcpStream;
    fn accept(&self) -> io::Result<(Self::Conn, SocketAddr)> {
        // std's own accept (an inherent method comes before the trait's).
        let (conn, peer) = Self::accept(self)?;
        // As the stack's streams: a response's head and body go out at once.
        conn.set_nodelay(true)?;
        Ok((conn, peer))
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Self::local_addr(self)
    }
    fn fatal(&self, _: &io::Error) -> bool {
        // Its failures (out of file descriptors or memory, a connection aborted before it
        // was taken) pass.
        false
    }
}

/// The stack's listeners for `addrs`. `[::]:PORT` is two, `[::]:PORT` and `0.0.0.0:PORT` (the
/// stack's flows keep the families apart), unless `0.0.0.0:PORT` is asked for as well.
fn bind_stack(stack: &Stack, addrs: &[SocketAddr]) -> Result<Vec<StackListener>, String> {
    let mut out = Vec::new();
    for &a in addrs {
        let v4_asked = addrs
            .iter()
            .any(|b| b.ip() == IpAddr::V4(Ipv4Addr::UNSPECIFIED) && b.port() == a.port());
        if a.ip() != IpAddr::V6(Ipv6Addr::UNSPECIFIED) || (a.port() != 0 && v4_asked) {
            out.push(StackListener::bind(stack, a).map_err(|e| format!("listen on {a}: {e}"))?);
            continue;
        }
        let mut tries = 0;
        loop {
            let v6 = StackListener::bind(stack, a).map_err(|e| format!("listen on {a}: {e}"))?;
            let port = v6.local_addr().map_err(|e| e.to_string())?.port();
            let v4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port);
            match StackListener::bind(stack, v4) {
                Ok(l) => {
                    out.extend([v6, l]);
                    break;
                }
                // The port picked for [::]:0 is taken for IPv4: pick another.
                Err(e)
                    if a.port() == 0
                        && e.kind() == io::ErrorKind::AddrInUse
                        && tries < PORT_TRIES =>
                {
                    tries += 1;
                }
                Err(e) => return Err(format!("listen on {v4} (the IPv4 side of {a}): {e}")),
            }
        }
    }
    Ok(out)
}

fn run(args: &[String]) -> Result<(), String> {
    let dir = |name: &str| -> Result<Option<PathBuf>, String> {
        let Some(d) = netchannel_examples::arg(args, name) else {
            return Ok(None);
        };
        let d = PathBuf::from(d);
        if !d.is_dir() {
            return Err(format!("{name}: {} is not a directory", d.display()));
        }
        Ok(Some(d))
    };
    let style = Style::of(args)?;
    let kernel = netchannel_examples::flag(args, "--kernel");
    if kernel && style == Style::Async {
        return Err("--async serves the user-space stack only (not with --kernel)".into());
    }
    let server = Arc::new(Server {
        root: dir("--root")?.ok_or("--root DIR is required")?,
        upload: dir("--upload")?,
        report: Reporter::new("http_server"),
        one_request: matches!(style, Style::Pool(_)),
    });
    let listen = netchannel_examples::addrs(args, "--listen", "0.0.0.0:8080")?;
    if kernel {
        let listeners = listen
            .iter()
            .map(|&a| std::net::TcpListener::bind(a).map_err(|e| format!("listen on {a}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        serve_all(listeners, &server, style)
    } else {
        let stack =
            Stack::connect(&netchannel_examples::socket(args)).map_err(|e| e.to_string())?;
        let listeners = bind_stack(&stack, &listen)?;
        if style == Style::Async {
            return asynchronous::serve_all(listeners, &server);
        }
        serve_all(listeners, &server, style)
    }
}

/// Serves every listener, each from a thread of its own, in `style` (threads or a pool);
/// returns when one can serve no more.
fn serve_all<L: Listener>(
    listeners: Vec<L>,
    server: &Arc<Server>,
    style: Style,
) -> Result<(), String> {
    for l in &listeners {
        println!(
            "listening on {}",
            l.local_addr().map_err(|e| e.to_string())?
        );
    }
    // The pool's queue: connections of every listener, taken by whichever thread is free.
    let pool = match style {
        Style::Pool(n) => Some(start_pool::<L::Conn>(n, server)?),
        Style::Threads | Style::Async => None,
    };
    let (ended, end) = mpsc::channel();
    for l in listeners {
        let (ended, server, pool) = (ended.clone(), server.clone(), pool.clone());
        std::thread::Builder::new()
            .name("http accept".into())
            .spawn(move || {
                let _ = ended.send(accept_loop(&l, &server, pool.as_ref()));
            })
            .map_err(|e| format!("starting a thread: {e}"))?;
    }
    drop(ended);
    Err(end
        .recv()
        .unwrap_or_else(|_| "every listener is gone".into()))
}

/// Connections queued for the pool.
type Queue<C> = mpsc::SyncSender<(C, SocketAddr)>;

/// Starts `n` threads that serve the connections sent to the queue returned.
fn start_pool<C: Read + Write + Send + 'static>(
    n: usize,
    server: &Arc<Server>,
) -> Result<Queue<C>, String> {
    // Room for a burst of connections (a listener's backlog's worth) while all threads work.
    let (queue, taken) = mpsc::sync_channel::<(C, SocketAddr)>(1024);
    let taken = Arc::new(std::sync::Mutex::new(taken));
    for _ in 0..n {
        let (taken, s) = (taken.clone(), server.clone());
        std::thread::Builder::new()
            .name("http pool".into())
            .spawn(move || {
                loop {
                    // One thread waits on the queue at a time; the lock is held only for that.
                    let next = taken.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok((conn, peer)) = next else { return };
                    if let Err(e) = serve(conn, &s) {
                        s.report.report(format_args!("connection from {peer}: {e}"));
                    }
                }
            })
            .map_err(|e| format!("starting a thread: {e}"))?;
    }
    Ok(queue)
}

/// Takes connections and serves each from a thread of its own (or hands it to the pool),
/// until the listener can serve no more; returns why.
fn accept_loop<L: Listener>(
    listener: &L,
    server: &Arc<Server>,
    pool: Option<&Queue<L::Conn>>,
) -> String {
    let at = listener
        .local_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string());
    let mut backoff = Backoff::default();
    loop {
        let (conn, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if listener.fatal(&e) => return format!("accept on {at}: {e}"),
            Err(e) => {
                server
                    .report
                    .report(format_args!("accept on {at}: {e}; retrying"));
                backoff.wait();
                continue;
            }
        };
        if let Some(queue) = pool {
            if queue.send((conn, peer)).is_err() {
                return "the pool's threads are gone".into();
            }
            backoff.reset();
            continue;
        }
        let s = server.clone();
        let spawned = std::thread::Builder::new()
            .name("http conn".into())
            .spawn(move || {
                if let Err(e) = serve(conn, &s) {
                    s.report.report(format_args!("connection from {peer}: {e}"));
                }
            });
        match spawned {
            Ok(_) => backoff.reset(),
            Err(e) => {
                // The connection went with the closure: it is closed.
                server.report.report(format_args!(
                    "no thread for the connection from {peer} ({e}): closed"
                ));
                backoff.wait();
            }
        }
    }
}

/// A request's head, as far as this server cares.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: String,
    target: String,
    /// The connection ends after this request (`Connection: close`, or HTTP/1.0 without
    /// `Connection: keep-alive`).
    close: bool,
    /// `Content-Length`.
    length: Option<u64>,
    /// Any `Transfer-Encoding` (chunked): a body of a length not known beforehand.
    chunked: bool,
    /// `Expect: 100-continue`: the client waits for a go-ahead before it sends the body.
    expect_continue: bool,
}

impl Request {
    /// Parses a head (request line and header lines); `Err` with the status to answer.
    fn parse(head: &str) -> Result<Self, &'static str> {
        const BAD: &str = "400 Bad Request";
        let mut lines = head.lines();
        let mut words = lines.next().unwrap_or_default().split_whitespace();
        let (Some(method), Some(target), version) = (words.next(), words.next(), words.next())
        else {
            return Err(BAD);
        };
        let mut r = Self {
            method: method.to_owned(),
            target: target.to_owned(),
            close: false,
            length: None,
            chunked: false,
            expect_continue: false,
        };
        let (mut close, mut keep_alive) = (false, false);
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "connection" => {
                    for token in value.split(',').map(str::trim) {
                        close |= token.eq_ignore_ascii_case("close");
                        keep_alive |= token.eq_ignore_ascii_case("keep-alive");
                    }
                }
                "content-length" => {
                    let n: u64 = value.parse().map_err(|_| BAD)?;
                    if r.length.is_some_and(|m| m != n) {
                        return Err(BAD);
                    }
                    r.length = Some(n);
                }
                "transfer-encoding" => r.chunked = true,
                "expect" => r.expect_continue = value.eq_ignore_ascii_case("100-continue"),
                _ => {}
            }
        }
        r.close = close || (version == Some("HTTP/1.0") && !keep_alive);
        Ok(r)
    }
}

/// What reading a request's head found.
enum Head {
    /// The client closed the connection between requests.
    Closed,
    /// A head longer than [`MAX_HEAD`].
    TooBig,
    /// The head, up to and with its blank line.
    Complete(Vec<u8>),
}

/// Reads a request's head, never more than [`MAX_HEAD`] (and one) bytes of it.
fn read_head(r: &mut impl BufRead) -> io::Result<Head> {
    let mut head = Vec::new();
    loop {
        let start = head.len();
        let room = (MAX_HEAD + 1 - start) as u64;
        if r.take(room).read_until(b'\n', &mut head)? == 0 {
            if start == 0 {
                return Ok(Head::Closed);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the client closed the connection in the middle of a request's head",
            ));
        }
        if head.len() > MAX_HEAD {
            return Ok(Head::TooBig);
        }
        let line = &head[start..];
        if line == b"\r\n" || line == b"\n" {
            return Ok(Head::Complete(head));
        }
    }
}

/// Serves requests on one connection until the client closes it or asks to, or a request
/// cannot be answered on it.
fn serve<C: Read + Write>(conn: C, server: &Server) -> io::Result<()> {
    let mut conn = BufReader::with_capacity(64 * 1024, conn);
    loop {
        let head = match read_head(&mut conn)? {
            Head::Closed => return Ok(()),
            Head::TooBig => {
                return respond(
                    conn.get_mut(),
                    "431 Request Header Fields Too Large",
                    "",
                    b"",
                    true,
                );
            }
            Head::Complete(h) => h,
        };
        let mut req = match Request::parse(&String::from_utf8_lossy(&head)) {
            Ok(r) => r,
            Err(status) => return respond(conn.get_mut(), status, "", b"bad request\n", true),
        };
        req.close |= server.one_request;
        let keep = match req.method.as_str() {
            "GET" | "HEAD" => get(&mut conn, &req, server)?,
            "PUT" => put(&mut conn, &req, server)?,
            _ => {
                let allow = if server.upload.is_some() {
                    "allow: GET, HEAD, PUT\r\n"
                } else {
                    "allow: GET, HEAD\r\n"
                };
                refuse(&mut conn, &req, "405 Method Not Allowed", allow, b"")?
            }
        };
        if !keep {
            return Ok(());
        }
    }
}

/// Answers `GET` and `HEAD`; returns whether the connection goes on.
fn get<C: Read + Write>(
    conn: &mut BufReader<C>,
    req: &Request,
    server: &Server,
) -> io::Result<bool> {
    let keep = !req.close && skip_body(conn, req)?;
    let Some((mut file, len)) = open_file(&server.root, &req.target) else {
        respond(conn.get_mut(), "404 Not Found", "", b"not found\n", !keep)?;
        return Ok(keep);
    };
    let w = conn.get_mut();
    let head = ok_head(len, keep);
    if req.method != "GET" {
        w.write_all(head.as_bytes())?;
        return Ok(keep);
    }
    // The head goes out with the file's first bytes, in one write (one segment for a small
    // file, not two). No bigger than the file: a buffer is zeroed at each request.
    let size = usize::try_from(len)
        .unwrap_or(usize::MAX)
        .clamp(1, 256 * 1024);
    let mut buf = vec![0u8; head.len() + size];
    buf[..head.len()].copy_from_slice(head.as_bytes());
    let mut at = head.len();
    let mut sent = 0u64;
    while sent < len {
        let n = file.read(&mut buf[at..])?;
        if n == 0 {
            // The file shrank while being sent: the promised length cannot be kept.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: shorter than its {len} bytes", req.target),
            ));
        }
        let n = n.min(usize::try_from(len - sent).unwrap_or(usize::MAX));
        w.write_all(&buf[..at + n])?;
        sent += n as u64;
        at = 0;
    }
    if len == 0 {
        w.write_all(head.as_bytes())?;
    }
    Ok(keep)
}

/// Answers `PUT`; returns whether the connection goes on.
fn put<C: Read + Write>(
    conn: &mut BufReader<C>,
    req: &Request,
    server: &Server,
) -> io::Result<bool> {
    let Some(dir) = &server.upload else {
        let why = b"uploads are off (the server was started without --upload DIR)\n";
        return refuse(
            conn,
            req,
            "405 Method Not Allowed",
            "allow: GET, HEAD\r\n",
            why,
        );
    };
    let Some(name) = upload_name(&req.target) else {
        let why = b"PUT /NAME: NAME is one file name, without '/', '..' or a leading '.'\n";
        return refuse(conn, req, "400 Bad Request", "", why);
    };
    let Some(len) = req.length.filter(|_| !req.chunked) else {
        let why = b"a PUT needs a content-length (chunked bodies are not taken)\n";
        return refuse(conn, req, "411 Length Required", "", why);
    };
    let mut part = match Part::create(dir) {
        Ok(p) => p,
        Err(e) => {
            server.report.report(format_args!(
                "PUT /{name}: a temporary file in {}: {e}",
                dir.display()
            ));
            let why = b"the upload could not be stored\n";
            return refuse(conn, req, "500 Internal Server Error", "", why);
        }
    };
    if req.expect_continue && len > 0 {
        conn.get_mut().write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    // Straight from the reader's buffer to the file: never more than the buffer in memory.
    let mut left = len;
    while left > 0 {
        let chunk = conn.fill_buf()?;
        if chunk.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "PUT /{name}: the client sent {} of its {len} bytes",
                    len - left
                ),
            ));
        }
        let n = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if let Err(e) = part.file.write_all(&chunk[..n]) {
            server
                .report
                .report(format_args!("PUT /{name}: writing: {e}"));
            // The rest of the body was not read: the connection cannot go on.
            let why = b"the upload could not be stored\n";
            respond(conn.get_mut(), "500 Internal Server Error", "", why, true)?;
            return Ok(false);
        }
        conn.consume(n);
        left -= n as u64;
    }
    let keep = !req.close;
    match part.commit(dir, name) {
        Ok(()) => {
            let location = format!("location: /{name}\r\n");
            respond(
                conn.get_mut(),
                "201 Created",
                &location,
                b"created\n",
                !keep,
            )?;
        }
        Err(e) => {
            server
                .report
                .report(format_args!("PUT /{name}: storing: {e}"));
            let why = b"the upload could not be stored\n";
            respond(conn.get_mut(), "500 Internal Server Error", "", why, !keep)?;
        }
    }
    Ok(keep)
}

/// The name a `PUT` target asks to store under, if it is one plain file name.
fn upload_name(target: &str) -> Option<&str> {
    let name = target.split(['?', '#']).next()?.strip_prefix('/')?;
    let plain = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && !name.contains("..")
        && !name.contains(['/', '\\'])
        && !name.chars().any(char::is_control);
    plain.then_some(name)
}

/// An upload being written: a temporary file in the upload directory, removed unless
/// committed. So a name holds its old file or the whole new one, never part of one.
#[derive(Debug)]
struct Part {
    path: PathBuf,
    file: File,
    committed: bool,
}

impl Part {
    fn create(dir: &Path) -> io::Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        // A leading '.': no upload can be named so (see `upload_name`).
        let path = dir.join(format!(
            ".upload-{}-{}.part",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(Self {
            path,
            file,
            committed: false,
        })
    }

    /// Makes it `dir/name`: its bytes are on the disk first, then the name points at them.
    fn commit(mut self, dir: &Path, name: &str) -> io::Result<()> {
        self.file.sync_all()?;
        std::fs::rename(&self.path, dir.join(name))?;
        self.committed = true;
        // And the rename itself, so the name survives a crash too (best effort: the upload is
        // in place either way).
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Reads and drops the body of a request that is refused, if that is cheap, so that the
/// connection can serve the next request; returns whether it can. It cannot when the body's
/// length is not known, when it is longer than [`MAX_DISCARD`], or when the client waits for
/// a go-ahead before sending it (which a refusal is not).
fn skip_body<C: Read>(conn: &mut BufReader<C>, req: &Request) -> io::Result<bool> {
    if req.chunked {
        return Ok(false);
    }
    match req.length {
        None | Some(0) => Ok(true),
        Some(_) if req.expect_continue => Ok(false),
        Some(n) if n <= MAX_DISCARD => Ok(io::copy(&mut conn.take(n), &mut io::sink())? == n),
        Some(_) => Ok(false),
    }
}

/// Answers with an error `status` (and `extra` header lines), after dropping the request's
/// body if that is cheap; returns whether the connection goes on.
fn refuse<C: Read + Write>(
    conn: &mut BufReader<C>,
    req: &Request,
    status: &str,
    extra: &str,
    body: &[u8],
) -> io::Result<bool> {
    let keep = !req.close && skip_body(conn, req)?;
    respond(conn.get_mut(), status, extra, body, !keep)?;
    Ok(keep)
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

/// Writes a whole response: status line, `extra` header lines (each ending in CRLF), and a
/// short body, in one write.
fn respond(
    w: &mut impl Write,
    status: &str,
    extra: &str,
    body: &[u8],
    close: bool,
) -> io::Result<()> {
    w.write_all(&response(status, extra, body, close))
}

/// A whole response's bytes (see [`respond`]).
fn response(status: &str, extra: &str, body: &[u8], close: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\n{extra}{}\r\n",
        body.len(),
        if close { "connection: close\r\n" } else { "" }
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// The file `target` names under `root`, open, and its length.
fn open_file(root: &Path, target: &str) -> Option<(File, u64)> {
    let file = File::open(resolve(root, target)?).ok()?;
    let len = file.metadata().ok()?.len();
    Some((file, len))
}

/// The head of a `200 OK` for a file of `len` bytes.
fn ok_head(len: u64, keep: bool) -> String {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {len}\r\ncontent-type: application/octet-stream\r\n{}\r\n",
        if keep { "" } else { "connection: close\r\n" }
    )
}

/// The async style: one thread, a current-thread tokio runtime, a task per connection, on the
/// user-space stack's async sockets.
mod asynchronous {
    use std::io::{self, Read};
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::{Listener, MAX_HEAD, Request, Server, StackListener, ok_head, open_file, response};
    use netchannel::stack::TcpStream;

    /// Serves every listener; returns when one can serve no more.
    pub(super) fn serve_all(
        listeners: Vec<StackListener>,
        server: &Arc<Server>,
    ) -> Result<(), String> {
        for l in &listeners {
            println!(
                "listening on {}",
                l.local_addr().map_err(|e| e.to_string())?
            );
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| format!("starting a tokio runtime: {e}"))?;
        rt.block_on(async {
            let mut accepting = tokio::task::JoinSet::new();
            for l in listeners {
                accepting.spawn(accept_loop(l, server.clone()));
            }
            Err(match accepting.join_next().await {
                Some(Ok(why)) => why,
                Some(Err(e)) => format!("an accepting task failed: {e}"),
                None => "every listener is gone".into(),
            })
        })
    }

    /// Takes connections and serves each from a task of its own; returns why it stopped.
    async fn accept_loop(l: StackListener, server: Arc<Server>) -> String {
        let at = l
            .local_addr()
            .map_or_else(|e| e.to_string(), |a| a.to_string());
        loop {
            match l.listener.accept_async().await {
                Ok((conn, peer)) => {
                    let s = server.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve(conn, &s).await {
                            s.report.report(format_args!("connection from {peer}: {e}"));
                        }
                    });
                }
                Err(e) if l.fatal(&e) => return format!("accept on {at}: {e}"),
                Err(e) => {
                    server
                        .report
                        .report(format_args!("accept on {at}: {e}; retrying"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    /// Serves `GET` and `HEAD` on one connection until the client closes it or asks to.
    async fn serve(mut conn: TcpStream, server: &Server) -> io::Result<()> {
        // Bytes read and not used yet: the next request's head may come with the last.
        let mut pending: Vec<u8> = Vec::with_capacity(4096);
        let mut chunk = vec![0u8; 16 * 1024];
        let mut file_buf = vec![0u8; 256 * 1024];
        loop {
            let end = loop {
                if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                if pending.len() > MAX_HEAD {
                    let r = response("431 Request Header Fields Too Large", "", b"", true);
                    return conn.write_all(&r).await;
                }
                let n = AsyncReadExt::read(&mut conn, &mut chunk).await?;
                if n == 0 {
                    if pending.is_empty() {
                        return Ok(());
                    }
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the client closed the connection in the middle of a request's head",
                    ));
                }
                pending.extend_from_slice(&chunk[..n]);
            };
            let head: Vec<u8> = pending.drain(..end).collect();
            let req = match Request::parse(&String::from_utf8_lossy(&head)) {
                Ok(r) => r,
                Err(status) => {
                    return conn
                        .write_all(&response(status, "", b"bad request\n", true))
                        .await;
                }
            };
            if req.method != "GET" && req.method != "HEAD" {
                // Its body, if any, is not read: the connection ends with the answer.
                let r = response("405 Method Not Allowed", "allow: GET, HEAD\r\n", b"", true);
                return conn.write_all(&r).await;
            }
            // A body on a GET is not read either: answer, then close.
            let keep = !req.close && req.length.unwrap_or(0) == 0 && !req.chunked;
            match open_file(&server.root, &req.target) {
                None => {
                    conn.write_all(&response("404 Not Found", "", b"not found\n", !keep))
                        .await?;
                }
                Some((mut file, len)) => {
                    conn.write_all(ok_head(len, keep).as_bytes()).await?;
                    if req.method == "GET" {
                        let mut sent = 0u64;
                        while sent < len {
                            // A local file read blocks briefly; the runtime has one thread.
                            let n = file.read(&mut file_buf)?;
                            if n == 0 {
                                return Err(io::Error::new(
                                    io::ErrorKind::UnexpectedEof,
                                    format!("{}: shorter than its {len} bytes", req.target),
                                ));
                            }
                            let n = n.min(usize::try_from(len - sent).unwrap_or(usize::MAX));
                            conn.write_all(&file_buf[..n]).await?;
                            sent += n as u64;
                        }
                    }
                }
            }
            conn.flush().await?;
            if !keep {
                return AsyncWriteExt::shutdown(&mut conn).await;
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection whose client sent `input` and then closed its side.
    struct Mock {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Mock {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Mock {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A scratch directory with `root/` (holding `hello`) and `up/`, removed on drop.
    struct Dirs(PathBuf);

    impl Dirs {
        fn new(tag: &str) -> Self {
            let d = std::env::temp_dir()
                .join(format!("netchannel-http-unit-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(d.join("root")).expect("root");
            std::fs::create_dir_all(d.join("up")).expect("up");
            std::fs::write(d.join("root/hello"), b"hello\n").expect("a file");
            Self(d)
        }

        fn server(&self, upload: bool) -> Server {
            Server {
                root: self.0.join("root"),
                upload: upload.then(|| self.0.join("up")),
                report: Reporter::new("http_server test"),
                one_request: false,
            }
        }

        /// What the upload directory holds, by name.
        fn uploads(&self) -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(self.0.join("up"))
                .expect("the upload directory")
                .map(|e| {
                    e.expect("an entry")
                        .file_name()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            names.sort();
            names
        }
    }

    impl Drop for Dirs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Serves `input` as one connection; returns what the server said and how it ended.
    fn exchange(server: &Server, input: &[u8]) -> (String, io::Result<()>) {
        let mut m = Mock {
            input: io::Cursor::new(input.to_vec()),
            output: Vec::new(),
        };
        let r = serve(&mut m, server);
        (String::from_utf8_lossy(&m.output).into_owned(), r)
    }

    /// The status codes of the responses in `out`.
    fn statuses(out: &str) -> Vec<&str> {
        out.split("HTTP/1.1 ")
            .skip(1)
            .map(|r| r.get(..3).unwrap_or(r))
            .collect()
    }

    #[test]
    fn put_stores_the_body_and_the_connection_goes_on() {
        let d = Dirs::new("put");
        let s = d.server(true);
        let (out, r) = exchange(
            &s,
            b"PUT /a.bin HTTP/1.1\r\ncontent-length: 5\r\n\r\nab\ncdPUT /empty HTTP/1.1\r\n\
              Content-Length: 0\r\n\r\nGET /hello HTTP/1.1\r\n\r\n",
        );
        r.expect("served");
        assert_eq!(statuses(&out), ["201", "201", "200"], "{out}");
        assert!(out.contains("location: /a.bin\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nhello\n"), "{out}");
        assert_eq!(
            std::fs::read(d.0.join("up/a.bin")).expect("stored"),
            b"ab\ncd"
        );
        assert_eq!(std::fs::read(d.0.join("up/empty")).expect("stored"), b"");
        assert_eq!(d.uploads(), ["a.bin", "empty"], "no temporary file left");
    }

    #[test]
    fn put_answers_100_continue_before_the_body() {
        let d = Dirs::new("continue");
        let (out, r) = exchange(
            &d.server(true),
            b"PUT /x HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nxyz",
        );
        r.expect("served");
        assert_eq!(statuses(&out), ["100", "201"], "{out}");
        assert_eq!(std::fs::read(d.0.join("up/x")).expect("stored"), b"xyz");
    }

    #[test]
    fn bad_names_are_refused_and_nothing_is_written_anywhere() {
        let d = Dirs::new("names");
        let s = d.server(true);
        for target in [
            "/",
            "/..",
            "/../x",
            "/a/b",
            "/a\\b",
            "/.hidden",
            "/a..b",
            "//x",
            "x",
            "/%00\u{1}",
        ] {
            let req = format!("PUT {target} HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi");
            let (out, r) = exchange(&s, req.as_bytes());
            r.expect("served");
            assert_eq!(statuses(&out), ["400"], "{target}: {out}");
        }
        let long = format!("/{}", "n".repeat(MAX_NAME + 1));
        assert_eq!(upload_name(&long), None);
        assert_eq!(upload_name("/ok-name.txt?v=1"), Some("ok-name.txt"));
        assert_eq!(
            upload_name("/%2e%2e"),
            Some("%2e%2e"),
            "not decoded: a plain name"
        );
        assert!(d.uploads().is_empty());
        assert!(!d.0.join("x").exists() && !d.0.join("root/x").exists());
    }

    #[test]
    fn refused_puts_keep_the_connection_when_the_body_was_read() {
        let d = Dirs::new("refused");
        let (out, r) = exchange(
            &d.server(false),
            b"PUT /x HTTP/1.1\r\ncontent-length: 2\r\n\r\nhiGET /hello HTTP/1.1\r\n\r\n",
        );
        r.expect("served");
        assert_eq!(statuses(&out), ["405", "200"], "{out}");
        let s = d.server(true);
        let (out, _) = exchange(&s, b"PUT /x HTTP/1.1\r\n\r\nGET /hello HTTP/1.1\r\n\r\n");
        assert_eq!(statuses(&out), ["411", "200"], "no length, no body: {out}");
        let (out, _) = exchange(
            &s,
            b"PUT /x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        );
        assert_eq!(statuses(&out), ["411"], "{out}");
        assert!(
            out.contains("connection: close"),
            "a body of unknown length: {out}"
        );
        let (out, _) = exchange(
            &s,
            b"PUT /../x HTTP/1.1\r\ncontent-length: 9\r\nexpect: 100-continue\r\n\r\n",
        );
        assert_eq!(statuses(&out), ["400"], "refused without a go-ahead: {out}");
        assert!(out.contains("connection: close"), "{out}");
        assert!(d.uploads().is_empty());
    }

    #[test]
    fn a_client_that_goes_mid_body_leaves_no_file() {
        let d = Dirs::new("short");
        let (out, r) = exchange(
            &d.server(true),
            b"PUT /x HTTP/1.1\r\ncontent-length: 100\r\n\r\nonly this",
        );
        assert_eq!(
            r.expect_err("a short body fails the connection").kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert!(out.is_empty(), "{out}");
        assert!(d.uploads().is_empty(), "the temporary file is gone");
    }

    #[test]
    fn heads_that_are_too_long_or_malformed_are_answered_and_closed() {
        let d = Dirs::new("heads");
        let s = d.server(true);
        let mut long = b"GET /hello HTTP/1.1\r\nx: ".to_vec();
        long.resize(MAX_HEAD * 4, b'a');
        let (out, r) = exchange(&s, &long);
        r.expect("served");
        assert_eq!(statuses(&out), ["431"], "{out}");
        let (out, _) = exchange(&s, b"GET\r\n\r\n");
        assert_eq!(statuses(&out), ["400"], "{out}");
        let (out, _) = exchange(&s, b"PUT /x HTTP/1.1\r\ncontent-length: nine\r\n\r\n");
        assert_eq!(statuses(&out), ["400"], "{out}");
        let (out, _) = exchange(&s, b"DELETE /hello HTTP/1.1\r\n\r\n");
        assert_eq!(statuses(&out), ["405"], "{out}");
        assert!(out.contains("allow: GET, HEAD, PUT"), "{out}");
        let (out, _) = exchange(&s, b"GET /../etc/passwd HTTP/1.1\r\n\r\n");
        assert_eq!(statuses(&out), ["404"], "{out}");
    }

    #[test]
    fn http_1_0_closes_unless_kept_alive() {
        let r = Request::parse("GET / HTTP/1.0\r\n\r\n").expect("a request");
        assert!(r.close);
        let r = Request::parse("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").expect("ok");
        assert!(!r.close);
        let r = Request::parse("GET / HTTP/1.1\r\nconnection: keep-alive, close\r\n\r\n");
        assert!(r.expect("a request").close);
        assert!(
            Request::parse("PUT /x HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n")
                .is_err()
        );
    }
}
