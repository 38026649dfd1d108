//! [`HostQueue`]: a named owner <-> workers queue of [`Value`]s that every process of this host
//! (same user) can open by name.
//!
//! The creating process owns the name: it binds the abstract Unix socket
//! `parallel-wq/<uid>/<name>` (no file; it vanishes with the process) and a small thread hands
//! the queue's memfd ([`super::shared`]) to every process that connects. Inside the creating
//! process the queue also has an in-process tier: two lock-free [`Channel`]s, where tensors move
//! between threads by reference. Items cross the shared segment when they must:
//!
//! - answers written by threads of the owner's process stay in-process; answers from other
//!   processes go through shared memory; the owner reads both;
//! - questions stay in-process until another process opens the queue; from then on (and for
//!   every question still queued at that moment, moved in order) they go through shared memory,
//!   where any process, the owner's included, can take them.
//!
//! Invariants:
//! - HQ-1: one name, one queue per host and user: binding the abstract socket elects the creator
//!   atomically; another process's open connects to it. A peer of another uid is refused
//!   (SO_PEERCRED).
//! - HQ-2: a question is in exactly one tier; the switch to shared memory moves the queued
//!   in-process questions in order while the owner's writes wait on the switch lock.
//! - HQ-3 (end of queue, WQ-1 across processes): a worker's read ends when the owner closed the
//!   queue (or its process died) and no question is left in either tier; the owner's read ends
//!   when, in addition, no worker handle is open in its process, no other live process has the
//!   queue open, and no answer is left.
//! - HQ-4: every wait has a deadline, and a waiter in another process notices the owner's death
//!   within one wait slice (`PeerLost` naming the owner's pid) instead of hanging.
//! - HQ-5: the waits of both tiers share the segment's parking words, so a reader waiting on
//!   both wakes for an item in either.
//! - HQ-6 (no early end while a process attaches): the listener reserves a worker entry for a
//!   connecting process before it hands over the memfd, and the owner's end-of-queue check sees
//!   the in-process questions and the shared ones under the switch lock, so a question being
//!   moved to shared memory is never "in neither tier". A process that is opening the queue
//!   therefore holds the owner's end of queue off until it attaches and closes, or dies.
//! - HQ-7 (write back-pressure): a write of up to `capacity` items lands whole and adjacent; a
//!   larger one is placed in order, in pieces of at most half the capacity, as readers make
//!   room. The deadline bounds the whole call; a failure says how many items went in and gives
//!   back the rest.
//!
//! Question accounting (drain and lost workers):
//! - WQA-1: each worker handle counts the questions it took and has not answered (`held`);
//!   for processes other than the owner's, the queue's header keeps the same count per process
//!   (taken under the queue's lock, so a process killed after taking a question is known to
//!   hold it).
//! - WQA-2: an answer settles one question its writer holds (answers beyond that settle
//!   nothing); closing a handle settles everything it holds (those answers will never come).
//!   `drain()` waits until the questions settled reach the number written before the call,
//!   so an unanswered sentinel taken by a worker that then closed does not hold up any drain.
//! - WQA-3: a worker process found dead while holding questions settles them and is recorded
//!   as lost; the owner's next read or drain that would wait (or reach end of queue) raises a
//!   `Worker` error naming its pid, once. The queue stays usable.
//!
//! Files: this one (the queue, opening and creating it), `ops.rs` (write, read, end of queue,
//! drain, close), `serve.rs` (the creator's listener thread).

mod ops;
mod serve;

use serve::serve;

use super::queue::{Channel, Rejected, Role, end_of_queue};
use super::shared::{ANSWERS, EV_SPACE, QUESTIONS, Segment, alive};
use crate::sys;
use parallel_engine::config::config;
use parallel_engine::error::{Error, ErrorKind, Result};
use parallel_engine::runtime::{Deadline, Interest, wait_once};
use parallel_engine::value::Value;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// The in-process tier (owner's process only).
struct Local {
    questions: Channel<Value>,
    answers: Channel<Value>,
    /// Serialises the owner's question writes with the switch to shared memory (HQ-2).
    switch: Mutex<()>,
}

struct Inner {
    name: String,
    /// Declared before `seg`: its events point into the segment, so it must drop first.
    local: Option<Local>,
    seg: Arc<Segment>,
    local_workers: AtomicUsize,
    /// Questions held by this process's worker handles (WQA-1).
    local_held: AtomicU64,
    /// Lost worker processes already reported to the owner (WQA-3).
    reported_lost: AtomicU64,
    /// When the owner last looked for dead worker processes (ms since `born`).
    last_reap_ms: AtomicU64,
    born: Instant,
    owner_dropped: AtomicBool,
    stop: Option<OwnedFd>,
    listener: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Inner {
    fn new(name: &str, local: Option<Local>, seg: Arc<Segment>, stop: Option<OwnedFd>) -> Inner {
        Inner {
            name: name.to_string(),
            local,
            seg,
            local_workers: AtomicUsize::new(0),
            local_held: AtomicU64::new(0),
            reported_lost: AtomicU64::new(0),
            last_reap_ms: AtomicU64::new(0),
            born: Instant::now(),
            owner_dropped: AtomicBool::new(false),
            stop,
            listener: Mutex::new(None),
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(stop) = &self.stop {
            sys::eventfd_signal(stop.as_raw_fd());
        }
        let t = self
            .listener
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(t) = t
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }
}

/// A handle on a host-wide named work queue.
pub struct HostQueue {
    inner: Arc<Inner>,
    role: Role,
    closed: AtomicBool,
    /// Questions this (worker) handle took and has not answered (WQA-1).
    held: AtomicU64,
}

impl std::fmt::Debug for HostQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HostQueue({:?}, {:?}, {})",
            self.inner.name,
            self.role,
            if self.inner.local.is_some() {
                "owner's process"
            } else {
                "opened from another process"
            }
        )
    }
}

static OPEN: Mutex<Option<HashMap<String, Weak<Inner>>>> = Mutex::new(None);

fn socket_name(name: &str) -> Vec<u8> {
    // SAFETY: plain syscall.
    let uid = unsafe { libc::getuid() };
    let full = format!("parallel-wq/{uid}/{name}");
    if full.len() <= 100 {
        return full.into_bytes();
    }
    // Long names: keep a readable start and a hash of the whole name.
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    format!("parallel-wq/{uid}/{}#{:016x}", prefix(name, 60), h.finish()).into_bytes()
}

/// The longest start of `s` of at most `n` bytes that ends on a character boundary.
fn prefix(s: &str, n: usize) -> &str {
    let mut i = n.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    &s[..i]
}

fn peer_uid(fd: RawFd) -> Option<u32> {
    crate::sys::peer_cred(fd).ok().map(|c| c.uid)
}

fn errno(e: &Error) -> Option<i32> {
    std::error::Error::source(e)?
        .downcast_ref::<std::io::Error>()?
        .raw_os_error()
}

fn my_uid() -> u32 {
    // SAFETY: plain syscall.
    unsafe { libc::getuid() }
}

impl HostQueue {
    /// Creates the queue `name` (this handle is its owner) or opens it (a worker handle), from
    /// any process of this host (HQ-1). `timeout` bounds the hand-shake with the creator.
    pub fn open(name: &str, timeout: Option<Duration>) -> Result<HostQueue> {
        parallel_engine::config::try_config()?; // CONFIG-4
        if name.is_empty() || name.contains('\0') {
            return Err(Error::new(
                ErrorKind::Config,
                "workqueue",
                "a queue name must be non-empty text without NUL",
            ));
        }
        let deadline = Deadline::or_default(timeout.or(Some(config().connect_timeout)));
        let mut g = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        let reg = g.get_or_insert_with(HashMap::new);
        if let Some(inner) = reg.get(name).and_then(Weak::upgrade)
            && !inner.owner_dropped.load(Ordering::SeqCst)
        {
            return HostQueue::worker_of(inner, deadline);
        }
        let sock = socket_name(name);
        loop {
            match sys::unix_listen_abstract(&sock) {
                Ok(listener) => {
                    let q = HostQueue::create(name, listener)?;
                    reg.insert(name.to_string(), Arc::downgrade(&q.inner));
                    return Ok(q);
                }
                Err(e) if errno(&e) == Some(libc::EADDRINUSE) => {}
                Err(e) => return Err(e.with_op("workqueue")),
            }
            match HostQueue::connect(name, &sock, deadline) {
                Ok(seg) => {
                    let inner = Arc::new(Inner::new(name, None, seg, None));
                    reg.insert(name.to_string(), Arc::downgrade(&inner));
                    return HostQueue::worker_of(inner, deadline);
                }
                // The creator went away between our bind and connect: try to become it.
                Err(e) if e.kind() == ErrorKind::PeerLost => {
                    deadline.slice("workqueue", "the queue's creator")?
                }
                Err(e) => return Err(e),
            };
        }
    }

    fn worker_of(inner: Arc<Inner>, deadline: Deadline) -> Result<HostQueue> {
        if inner.local.is_some() {
            inner.local_workers.fetch_add(1, Ordering::SeqCst);
        } else {
            inner.seg.attach(deadline)?;
        }
        Ok(HostQueue {
            inner,
            role: Role::Worker,
            closed: AtomicBool::new(false),
            held: AtomicU64::new(0),
        })
    }

    fn create(name: &str, listener: OwnedFd) -> Result<HostQueue> {
        let cfg = config();
        let seg = Segment::create(name, cfg.workqueue_capacity, cfg.workqueue_arena)?;
        let ev = &seg.events;
        let local = Local {
            questions: Channel::with_events(
                cfg.workqueue_capacity,
                ev[QUESTIONS].clone(),
                ev[EV_SPACE].clone(),
            ),
            answers: Channel::with_events(
                cfg.workqueue_capacity,
                ev[ANSWERS].clone(),
                ev[EV_SPACE].clone(),
            ),
            switch: Mutex::new(()),
        };
        let stop = sys::eventfd()?;
        let stop_fd = stop.as_raw_fd();
        let inner = Arc::new(Inner::new(name, Some(local), seg, Some(stop)));
        let weak = Arc::downgrade(&inner);
        let t = std::thread::Builder::new()
            .name(format!("parallel-wq-{}", prefix(name, 10)))
            .spawn(move || serve(listener, stop_fd, weak))
            .map_err(|e| Error::os("workqueue", "starting the queue's listener thread", e))?;
        *inner.listener.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
        Ok(HostQueue {
            inner,
            role: Role::Owner,
            closed: AtomicBool::new(false),
            held: AtomicU64::new(0),
        })
    }

    /// Asks the creator for the queue's memfd (HQ-1).
    fn connect(name: &str, sock: &[u8], deadline: Deadline) -> Result<Arc<Segment>> {
        let fd = sys::socket(libc::AF_UNIX, libc::SOCK_STREAM)?;
        let (addr, len) = sys::abstract_addr(sock);
        // SAFETY: valid sockaddr_un of `len` bytes.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &addr as *const _ as *const libc::sockaddr,
                len,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::ECONNREFUSED | libc::ENOENT)) {
                return Err(Error::new(
                    ErrorKind::PeerLost,
                    "workqueue",
                    format!("the creator of queue {name:?} is gone"),
                ));
            }
            if e.raw_os_error() != Some(libc::EAGAIN) {
                return Err(Error::os(
                    "workqueue",
                    "connecting to the queue's creator",
                    e,
                ));
            }
        }
        if peer_uid(fd.as_raw_fd()).is_some_and(|u| u != my_uid()) {
            return Err(Error::new(
                ErrorKind::Auth,
                "workqueue",
                format!("queue {name:?} belongs to another user"),
            ));
        }
        let mut buf = [0u8; 8];
        loop {
            let slice =
                deadline.slice("workqueue", "the queue's creator to hand over its memory")?;
            wait_once(&[(fd.as_raw_fd(), Interest::Read)], slice)?;
            match sys::recv_fds(fd.as_raw_fd(), &mut buf, 1) {
                Ok((8, mut fds)) if &buf == b"PRLWQ\x01\0\0" => {
                    return Segment::open(fds.remove(0));
                }
                Ok(_) => {
                    return Err(Error::new(
                        ErrorKind::PeerLost,
                        "workqueue",
                        format!("the creator of queue {name:?} refused or went away"),
                    ));
                }
                Err(e) if errno(&e) == Some(libc::EAGAIN) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }
    pub fn role(&self) -> Role {
        self.role
    }
    pub fn is_owner(&self) -> bool {
        self.role == Role::Owner
    }
    pub fn capacity(&self) -> usize {
        self.inner.seg.capacity()
    }
    /// True when questions go through shared memory (another process opened the queue).
    pub fn is_shared(&self) -> bool {
        self.inner.local.is_none() || self.inner.seg.shm_mode()
    }

    /// A new worker handle on the same queue.
    pub fn worker(&self) -> Result<HostQueue> {
        HostQueue::worker_of(self.inner.clone(), Deadline::or_default(None))
    }

    /// Items waiting in the direction this handle reads.
    pub fn len(&self) -> usize {
        let dir = self.incoming();
        let local = self.inner.local.as_ref().map_or(0, |l| {
            if dir == QUESTIONS {
                l.questions.len()
            } else {
                l.answers.len()
            }
        });
        local + self.inner.seg.len(dir)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A contiguous CPU tensor allocated in the queue's shared arena. Writing it passes it by
    /// reference, without a copy, to readers in any process (who view the same memory). It
    /// holds arena space until every copy of it (yours and the readers') is dropped.
    pub fn empty_tensor(
        &self,
        dtype: parallel_engine::DType,
        shape: Vec<usize>,
        timeout: Option<Duration>,
    ) -> Result<parallel_engine::Tensor> {
        self.inner
            .seg
            .empty_tensor(dtype, shape, Deadline::or_default(timeout))
    }

    /// Questions not taken yet (both tiers).
    pub fn questions(&self) -> usize {
        self.inner.local.as_ref().map_or(0, |l| l.questions.len()) + self.inner.seg.len(QUESTIONS)
    }

    fn incoming(&self) -> usize {
        if self.role == Role::Owner {
            ANSWERS
        } else {
            QUESTIONS
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::Closed,
                "write",
                "this queue handle was closed",
            ));
        }
        if self.role == Role::Owner && self.inner.seg.closed() {
            return Err(Error::new(
                ErrorKind::Closed,
                "write",
                "the queue is closed for writing",
            ));
        }
        Ok(())
    }
}

impl Drop for HostQueue {
    fn drop(&mut self) {
        if self.role == Role::Owner {
            self.inner.owner_dropped.store(true, Ordering::SeqCst);
        }
        self.close();
    }
}
