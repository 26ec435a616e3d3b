//! Closing fds that apps handed the nexus, off the datapath thread.
//!
//! The last `close` of a file runs its release, and some releases block: a TCP socket with
//! `SO_LINGER` and unsent data waits up to its linger time. An app chooses what it sends with
//! `SCM_RIGHTS`, so every fd the nexus refuses (unasked, surplus, of the wrong kind) goes to
//! this thread to be closed; a stuck close then stalls only this thread.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

/// The closing thread's inbox.
#[derive(Debug)]
pub(crate) struct Closer {
    tx: mpsc::Sender<Vec<OwnedFd>>,
    /// Fds handed over and not closed yet.
    pending: Arc<AtomicU64>,
}

impl Closer {
    /// Starts the closing thread.
    pub(crate) fn start() -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Vec<OwnedFd>>();
        let pending = Arc::new(AtomicU64::new(0));
        let p = pending.clone();
        std::thread::Builder::new()
            .name("nexus-closer".into())
            .spawn(move || {
                for batch in rx {
                    let n = batch.len() as u64;
                    drop(batch);
                    p.fetch_sub(n, Ordering::Relaxed);
                }
            })?;
        Ok(Self { tx, pending })
    }

    /// Closes `fds` on the closing thread (never here).
    pub(crate) fn close(&self, fds: Vec<OwnedFd>) {
        if fds.is_empty() {
            return;
        }
        self.pending.fetch_add(fds.len() as u64, Ordering::Relaxed);
        if let Err(mpsc::SendError(fds)) = self.tx.send(fds) {
            // The thread is gone (it cannot panic: it only drops fds); keep them open rather
            // than risk a blocking close on the datapath.
            std::mem::forget(fds);
        }
    }

    /// Fds handed over and not closed yet (a close that blocks keeps this up).
    pub(crate) fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fds_are_closed_on_the_thread() {
        let c = Closer::start().unwrap();
        let (r, w) = std::os::unix::net::UnixStream::pair().unwrap();
        c.close(vec![w.into()]);
        // The other end's close shows as end-of-file here.
        let mut b = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &r, &mut b).unwrap(), 0);
        for _ in 0..1000 {
            if c.pending() == 0 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("pending never came back to 0");
    }
}
