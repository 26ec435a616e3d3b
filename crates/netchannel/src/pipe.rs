//! User pipes: two processes joined back to back over one shared arena.
//!
//! A user pipe is a channel with no nexus in the middle: the process that listens plays the
//! server end, the process that connects the app end, so the connector's TX ring *is* the
//! listener's RX ring and the reverse. Buffers change hands without the payload being copied:
//! each end owns half of the pool's segments, sends packets in its own or received buffers, and
//! returns the peer's buffers on the FREE/ALLOC rings once done with them.
//!
//! The two processes do not trust each other. Each maps the other's ring region read-only,
//! validates every descriptor against its private ledger, and learns of the other's death from
//! the Unix socket that carried the set-up (it is watched during waits).
//!
//! ```no_run
//! use netchannel::pipe::{PipeListener, UserPipe};
//! use netchannel::{Geometry, Packet};
//!
//! # fn main() -> Result<(), netchannel::Error> {
//! // Process A
//! let listener = PipeListener::bind("@example-pipe")?;
//! let mut a = listener.accept(Geometry::default())?;
//! let buf = a.alloc().expect("a fresh pipe has buffers");
//! a.buffer_mut(buf).expect("we hold it")[..5].copy_from_slice(b"hello");
//! a.send(&[Packet { buf, offset: 0, len: 5 }]).expect("room in a fresh ring");
//!
//! // Process B
//! let mut b = UserPipe::connect("@example-pipe")?;
//! let mut got = Vec::new();
//! b.wait(netchannel::Interest::Readable, None)?;
//! b.recv(&mut got, 32)?;
//! assert_eq!(b.payload(&got[0]), b"hello");
//! b.free(got.iter().map(|p| p.buf)).expect("we hold them");
//! # Ok(()) }
//! ```

use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use netchannel_shm::endpoint::{Home, ServerSetup};
use netchannel_shm::fdpass::{recv_exact, send_with_fds};
use netchannel_shm::{Endpoint, Error, Geometry};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

/// The greeting each side sends with its fds: a tag and the layout version.
const SERVER_HELLO: &[u8; 8] = b"NCPIPES\x01";
const APP_HELLO: &[u8; 8] = b"NCPIPEA\x01";
/// A peer that does not finish the hand-shake in this time is given up on.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

fn sys(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> Error {
    move |source| Error::Sys { op, source }
}

/// A Unix address: a path, or an abstract name written `@name`.
fn address(addr: &str) -> Result<SocketAddrUnix, Error> {
    match addr.strip_prefix('@') {
        Some(name) => SocketAddrUnix::new_abstract_name(name.as_bytes()),
        None => SocketAddrUnix::new(addr),
    }
    .map_err(sys("building the Unix socket address"))
}

fn seqpacket() -> Result<OwnedFd, Error> {
    rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(sys("socket(AF_UNIX, SOCK_SEQPACKET)"))
}

fn handshake_timeout(sock: &OwnedFd, t: Option<Duration>) -> Result<(), Error> {
    use rustix::net::sockopt::{Timeout, set_socket_timeout};
    set_socket_timeout(sock, Timeout::Recv, t).map_err(sys("SO_RCVTIMEO"))?;
    set_socket_timeout(sock, Timeout::Send, t).map_err(sys("SO_SNDTIMEO"))
}

/// Accepts user-pipe connections on a Unix SOCK_SEQPACKET socket.
#[derive(Debug)]
pub struct PipeListener {
    fd: OwnedFd,
}

impl PipeListener {
    /// Listens on `addr`: a filesystem path, or `@name` for Linux's abstract namespace.
    pub fn bind(addr: &str) -> Result<Self, Error> {
        let fd = seqpacket()?;
        rustix::net::bind(&fd, &address(addr)?).map_err(sys("bind"))?;
        rustix::net::listen(&fd, 16).map_err(sys("listen"))?;
        Ok(Self { fd })
    }

    /// Accepts one connection and builds the pipe: this process becomes the serving end, builds
    /// the schema and the pool with `geometry`, and owns the lower half of the pool.
    pub fn accept(&self, geometry: Geometry) -> Result<UserPipe, Error> {
        let sock =
            rustix::net::accept_with(&self.fd, SocketFlags::CLOEXEC).map_err(sys("accept"))?;
        handshake_timeout(&sock, Some(HANDSHAKE_TIMEOUT))?;
        let setup = ServerSetup::new(geometry)?;
        let f = setup.fds()?;
        send_with_fds(sock.as_fd(), SERVER_HELLO, &[f.region, f.pool, f.bell])?;
        let fds = recv_exact(sock.as_fd(), APP_HELLO, 1)?;
        let [region]: [OwnedFd; 1] = fds
            .try_into()
            .map_err(|_| Error::Handshake("the peer must send exactly its region"))?;
        let mut ep = setup.finish(region, Home::LowerHalf)?;
        handshake_timeout(&sock, None)?;
        ep.watch(sock);
        Ok(UserPipe { ep })
    }
}

/// One end of a user pipe. Dereferences to the channel [`Endpoint`] for the packet API
/// (`alloc`, `buffer_mut`, `send`, `recv`, `payload`, `free`, `wait`).
#[derive(Debug)]
pub struct UserPipe {
    ep: Endpoint,
}

impl UserPipe {
    /// Connects to a listening [`PipeListener`] at `addr`; this process becomes the app end and
    /// owns the upper half of the pool.
    pub fn connect(addr: &str) -> Result<Self, Error> {
        let sock = seqpacket()?;
        rustix::net::connect(&sock, &address(addr)?).map_err(sys("connect"))?;
        handshake_timeout(&sock, Some(HANDSHAKE_TIMEOUT))?;
        let fds = recv_exact(sock.as_fd(), SERVER_HELLO, 3)?;
        let [region, pool, bell]: [OwnedFd; 3] = fds.try_into().map_err(|_| {
            Error::Handshake("the listener must send its region, pool and doorbell")
        })?;
        let mut ep = Endpoint::attach_app(region, pool, bell, Home::UpperHalf)?;
        send_with_fds(sock.as_fd(), APP_HELLO, &[ep.region_fd()?])?;
        handshake_timeout(&sock, None)?;
        ep.watch(sock);
        Ok(Self { ep })
    }

    /// Gives up the pipe wrapper and returns the channel end.
    pub fn into_endpoint(self) -> Endpoint {
        self.ep
    }
}

impl Deref for UserPipe {
    type Target = Endpoint;
    fn deref(&self) -> &Endpoint {
        &self.ep
    }
}

impl DerefMut for UserPipe {
    fn deref_mut(&mut self) -> &mut Endpoint {
        &mut self.ep
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netchannel_shm::{Interest, Packet};

    #[test]
    fn threads_can_use_a_pipe_too() {
        let name = format!("@netchannel-test-{}", std::process::id());
        let listener = PipeListener::bind(&name).unwrap();
        let n2 = name.clone();
        let t = std::thread::spawn(move || {
            let mut b = UserPipe::connect(&n2).unwrap();
            let mut got = Vec::new();
            while got.is_empty() {
                b.wait(Interest::Readable, Some(Duration::from_secs(5)))
                    .unwrap();
                b.recv(&mut got, 8).unwrap();
            }
            b.payload(&got[0]).to_vec()
        });
        let mut a = listener.accept(Geometry::default()).unwrap();
        let buf = a.alloc().unwrap();
        a.buffer_mut(buf).unwrap()[..3].copy_from_slice(b"abc");
        a.send(&[Packet {
            buf,
            offset: 0,
            len: 3,
        }])
        .unwrap();
        assert_eq!(t.join().unwrap(), b"abc");
        // The other end is gone: a wait notices instead of hanging.
        let err = a
            .wait(Interest::Readable, Some(Duration::from_secs(5)))
            .unwrap_err();
        assert!(matches!(err, Error::PeerGone), "{err}");
    }

    #[test]
    fn a_stranger_on_the_socket_is_refused() {
        let name = format!("@netchannel-test-stranger-{}", std::process::id());
        let listener = PipeListener::bind(&name).unwrap();
        let n2 = name.clone();
        let t = std::thread::spawn(move || {
            let sock = seqpacket().unwrap();
            rustix::net::connect(&sock, &address(&n2).unwrap()).unwrap();
            let mut buf = [0u8; 64];
            let _ = netchannel_shm::fdpass::recv_with_fds(sock.as_fd(), &mut buf, false);
            rustix::net::send(&sock, b"GARBAGE!", rustix::net::SendFlags::empty()).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        });
        assert!(matches!(
            listener.accept(Geometry::default()),
            Err(Error::Handshake(_))
        ));
        t.join().unwrap();
    }
}
