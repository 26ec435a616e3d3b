//! Targeted wake-ups for blocking calls: a thread waiting on one socket sleeps until that
//! socket changes, not until anything in the stack does.
//!
//! Before, every blocked call slept on one condition variable that every poll which changed
//! anything notified: with a hundred connections, each served by its own thread, each
//! packet woke a hundred threads to find ninety-nine of them had nothing to do (half of a
//! server's CPU went to futexes and context switches). Now a call that waits for one socket
//! registers a [`Waker`] with that socket in smoltcp (its receive or send waker, which
//! smoltcp wakes when data arrives, room frees up, or the state changes) and parks its
//! thread. The waker unparks every thread parked on that socket and direction (smoltcp keeps
//! one waker per direction; several threads may read one stream).
//!
//! A wake-up may be spurious, and a thread may be woken for a change that another thread
//! takes first: the waiter checks again, as with any condition variable. Parks are bounded
//! (the caller's `MAX_SLEEP`), so a stack that breaks, or a wake-up that never comes, costs
//! a bounded delay, never a hang.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Wake, Waker};
use std::thread::Thread;

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};

/// What a blocking call waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Interest {
    /// Any change of the stack (accepting, connecting: several sockets at once).
    Any,
    /// Something to read on a TCP socket (data, FIN, a state change).
    TcpRecv(SocketHandle),
    /// Room to write on a TCP socket (or a state change).
    TcpSend(SocketHandle),
    /// A datagram to receive on a UDP socket.
    UdpRecv(SocketHandle),
    /// Room to queue a datagram on a UDP socket.
    UdpSend(SocketHandle),
}

impl Interest {
    fn handle(self) -> Option<SocketHandle> {
        match self {
            Self::Any => None,
            Self::TcpRecv(h) | Self::TcpSend(h) | Self::UdpRecv(h) | Self::UdpSend(h) => Some(h),
        }
    }
}

/// The threads parked on one socket and direction; as a [`Waker`], it unparks them all.
#[derive(Debug, Default)]
struct Parked(Mutex<Vec<Thread>>);

impl Wake for Parked {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        let threads = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            t.unpark();
        }
    }
}

/// The parking lots of a stack's sockets (kept under the stack's lock).
#[derive(Debug, Default)]
pub(crate) struct Parks {
    lots: HashMap<Interest, (Arc<Parked>, Waker)>,
}

impl Parks {
    /// Registers the calling thread to be unparked when `interest`'s socket changes, and
    /// returns true; false for [`Interest::Any`] (the caller waits on the stack's condition
    /// variable instead). The caller then releases the stack's lock and parks.
    pub(crate) fn register(
        &mut self,
        sockets: &mut SocketSet<'static>,
        interest: Interest,
    ) -> bool {
        if interest == Interest::Any {
            return false;
        }
        let (parked, waker) = self.lots.entry(interest).or_insert_with(|| {
            let p = Arc::new(Parked::default());
            let w = Waker::from(p.clone());
            (p, w)
        });
        {
            let me = std::thread::current();
            let mut threads = parked.0.lock().unwrap_or_else(|p| p.into_inner());
            if !threads.iter().any(|t| t.id() == me.id()) {
                threads.push(me);
            }
        }
        // (smoltcp keeps the waker until it wakes it, then forgets it: registered each time.)
        match interest {
            Interest::TcpRecv(h) => sockets.get_mut::<tcp::Socket>(h).register_recv_waker(waker),
            Interest::TcpSend(h) => sockets.get_mut::<tcp::Socket>(h).register_send_waker(waker),
            Interest::UdpRecv(h) => sockets.get_mut::<udp::Socket>(h).register_recv_waker(waker),
            Interest::UdpSend(h) => sockets.get_mut::<udp::Socket>(h).register_send_waker(waker),
            Interest::Any => {}
        }
        true
    }

    /// Forgets a socket that is gone (its parked threads, if any, are woken).
    pub(crate) fn forget(&mut self, handle: SocketHandle) {
        self.lots.retain(|i, (_, w)| {
            let gone = i.handle() == Some(handle);
            if gone {
                w.wake_by_ref();
            }
            !gone
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_parked_thread_is_woken_by_its_sockets_waker_and_not_by_anothers() {
        let mut sockets = SocketSet::new(Vec::new());
        let buf = || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0u8; 64]);
        let a = sockets.add(udp::Socket::new(buf(), buf()));
        let b = sockets.add(udp::Socket::new(buf(), buf()));
        let mut parks = Parks::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let _ = tx.send(std::thread::current());
            let t0 = Instant::now();
            std::thread::park_timeout(Duration::from_secs(5));
            t0.elapsed()
        });
        let thread = rx.recv().expect("the thread");
        // Register that thread by hand (register() registers the caller).
        let (p, w) = parks
            .lots
            .entry(Interest::UdpRecv(a))
            .or_insert_with(|| {
                let p = Arc::new(Parked::default());
                let w = Waker::from(p.clone());
                (p, w)
            })
            .clone();
        p.0.lock().unwrap().push(thread);
        sockets.get_mut::<udp::Socket>(a).register_recv_waker(&w);
        assert!(parks.register(&mut sockets, Interest::UdpRecv(b)));
        assert!(!parks.register(&mut sockets, Interest::Any));
        // Forgetting b wakes nothing of a's; forgetting a wakes its thread.
        std::thread::sleep(Duration::from_millis(50));
        parks.forget(b);
        parks.forget(a);
        let slept = t.join().expect("joined");
        assert!(
            slept >= Duration::from_millis(40) && slept < Duration::from_secs(4),
            "{slept:?}"
        );
        assert!(parks.lots.is_empty());
    }
}
