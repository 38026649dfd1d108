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

    /// Writes `items` in order (owner: questions; worker: answers), waiting for room up to
    /// `timeout` (HQ-7): up to `capacity` items land whole and adjacent; more are placed in
    /// pieces of at most half the capacity as readers make room. On failure the items not
    /// written are given back and the error says how many went in. Tensors stay by reference
    /// while the item stays in-process.
    pub fn write(
        &self,
        items: Vec<Value>,
        timeout: Option<Duration>,
    ) -> Result<(), Rejected<Vec<Value>>> {
        if let Err(error) = self.check_open() {
            return Err(Rejected { error, item: items });
        }
        let deadline = Deadline::or_default(timeout);
        let (total, cap) = (items.len(), self.capacity());
        if total <= cap {
            return self
                .write_piece(items, deadline)
                .map_err(|r| self.explain_rejected(r, 0, total));
        }
        let piece = cap.div_ceil(2);
        let (mut rest, mut done) = (items, 0);
        while !rest.is_empty() {
            let tail = rest.split_off(piece.min(rest.len()));
            let n = rest.len();
            if let Err(Rejected { error, mut item }) = self.write_piece(rest, deadline) {
                item.extend(tail);
                return Err(self.explain_rejected(Rejected { error, item }, done, total));
            }
            done += n;
            rest = tail;
        }
        Ok(())
    }

    /// One piece of a write (at most `capacity` items, adjacent).
    fn write_piece(
        &self,
        items: Vec<Value>,
        deadline: Deadline,
    ) -> Result<(), Rejected<Vec<Value>>> {
        let n = items.len() as u64;
        let dir = if self.role == Role::Owner {
            QUESTIONS
        } else {
            ANSWERS
        };
        match (&self.inner.local, self.role) {
            (Some(l), Role::Worker) => l.answers.push_all(items, deadline),
            (Some(l), Role::Owner) => self.write_question(l, items, deadline),
            (None, _) => match self.inner.seg.push(dir, &items, deadline) {
                Ok(()) => Ok(()),
                Err(error) => Err(Rejected { error, item: items }),
            },
        }?;
        self.inner.seg.count_written(dir, n);
        if self.role == Role::Worker {
            self.settle(n);
        }
        Ok(())
    }

    /// A worker handle settles up to `n` of the questions it holds (WQA-2).
    fn settle(&self, n: u64) {
        let mut credit = 0;
        let _ = self
            .held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| {
                credit = h.min(n);
                Some(h - credit)
            });
        if credit > 0 {
            if self.inner.local.is_some() {
                self.inner.local_held.fetch_sub(credit, Ordering::SeqCst);
            }
            self.inner.seg.settle(credit, self.inner.local.is_none());
        }
    }

    /// A worker handle took a question (WQA-1).
    fn took(&self) {
        self.held.fetch_add(1, Ordering::SeqCst);
        if self.inner.local.is_some() {
            self.inner.local_held.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn explain_rejected(
        &self,
        r: Rejected<Vec<Value>>,
        done: usize,
        total: usize,
    ) -> Rejected<Vec<Value>> {
        let Rejected { error, item } = r;
        let error = if total > 1 || done > 0 {
            Error::new(
                error.kind(),
                error.op(),
                format!(
                    "{done} of the {total} items were written (in order); the other {} were not: {}",
                    item.len(),
                    error.message()
                ),
            )
        } else {
            error
        };
        Rejected {
            error: self.explain(error, None),
            item,
        }
    }

    /// Adds the queue's state to a timeout: what was queued, held and outstanding.
    fn explain(&self, e: Error, drain_target: Option<u64>) -> Error {
        if e.kind() != ErrorKind::Timeout {
            return e;
        }
        let seg = &self.inner.seg;
        let local_q = self.inner.local.as_ref().map_or(0, |l| l.questions.len());
        let local_a = self.inner.local.as_ref().map_or(0, |l| l.answers.len());
        let mut state = format!(
            "queue {:?} (capacity {}): {} questions queued, {} answers queued, questions {}",
            self.inner.name,
            self.capacity(),
            local_q + seg.len(QUESTIONS),
            local_a + seg.len(ANSWERS),
            if seg.closed() { "closed" } else { "open" },
        );
        if self.role == Role::Owner {
            let holders: Vec<String> = seg
                .holders()
                .into_iter()
                .map(|(pid, held, attaching)| {
                    if attaching {
                        format!("process {pid} attaching")
                    } else {
                        format!("process {pid} holds {held}")
                    }
                })
                .collect();
            state.push_str(&format!(
                "; questions held unanswered: {} by {} worker handle(s) of this process{}{}",
                self.inner.local_held.load(Ordering::SeqCst),
                self.inner.local_workers.load(Ordering::SeqCst),
                if holders.is_empty() { "" } else { ", " },
                holders.join(", ")
            ));
            if let Some(target) = drain_target {
                let settled = seg.settled();
                state.push_str(&format!(
                    "; {} of the {target} questions written before drain() are still unanswered",
                    target.saturating_sub(settled)
                ));
            }
        }
        Error::new(e.kind(), e.op(), format!("{} [{state}]", e.message()))
    }

    /// The owner's question write: in-process or shared, never both (HQ-2).
    fn write_question(
        &self,
        l: &Local,
        items: Vec<Value>,
        deadline: Deadline,
    ) -> Result<(), Rejected<Vec<Value>>> {
        let mut slot = Some(items);
        let r = l.questions.writable.wait_until(
            deadline,
            Duration::ZERO,
            "write",
            "room in the queue for the questions (workers are slower than the owner; raise PARALLEL_WORKQUEUE_CAPACITY or read faster)",
            || {
                let _g = l.switch.lock().unwrap_or_else(|e| e.into_inner());
                let items = slot.take().expect("present until written");
                if self.inner.seg.shm_mode() {
                    // Shared memory waits for room itself; the items are encoded, so keep a copy-free
                    // handle on failure by re-raising with the original values.
                    return match self.inner.seg.push(QUESTIONS, &items, deadline) {
                        Ok(()) => Ok(true),
                        Err(e) => {
                            slot = Some(items);
                            Err(e)
                        }
                    };
                }
                match l.questions.try_push_all(items) {
                    Ok(()) => Ok(true),
                    Err(back) => {
                        slot = Some(back);
                        Ok(false)
                    }
                }
            },
        );
        match r {
            Ok(()) => Ok(()),
            Err(error) => Err(Rejected {
                error,
                item: slot.unwrap_or_default(),
            }),
        }
    }

    /// Moves queued in-process questions to shared memory, in order, and sends later ones there
    /// (HQ-2). Runs on the listener thread when another process connects.
    fn switch_to_shared(inner: &Inner) -> Result<()> {
        let Some(l) = &inner.local else { return Ok(()) };
        if inner.seg.shm_mode() {
            return Ok(()); // never switches back; no need to wait behind a blocked owner write
        }
        let _g = l.switch.lock().unwrap_or_else(|e| e.into_inner());
        if inner.seg.shm_mode() {
            return Ok(());
        }
        let mut moved = Vec::new();
        while let Some(v) = l.questions.try_pop() {
            moved.push(v);
        }
        if !moved.is_empty() {
            inner
                .seg
                .push(QUESTIONS, &moved, Deadline::or_default(None))?;
        }
        inner.seg.set_shm_mode();
        Ok(())
    }

    /// Reads the next item, waiting up to `timeout` (default `PARALLEL_TIMEOUT`). `Closed` means
    /// end of queue (HQ-3); `PeerLost` that the owner's process died with nothing left to read.
    pub fn read(&self, timeout: Option<Duration>) -> Result<Value> {
        let deadline = Deadline::or_default(timeout);
        let ev = self.inner.seg.events[self.incoming()].clone();
        let mut got = None;
        ev.wait_until(
            deadline,
            config().spin.min(Duration::from_micros(20)),
            "read",
            match self.role {
                Role::Owner => "an answer in the work queue",
                Role::Worker => "a question in the work queue",
            },
            || {
                got = self.try_read_until(deadline)?;
                Ok(got.is_some())
            },
        )
        .map_err(|e| self.explain(e, None))?;
        Ok(got.expect("ready means an item"))
    }

    /// Reads an item if one is queued: `Ok(None)` when empty, `Closed` at end of queue.
    pub fn try_read(&self) -> Result<Option<Value>> {
        self.try_read_until(Deadline::or_default(None))
    }

    fn try_read_until(&self, deadline: Deadline) -> Result<Option<Value>> {
        let dir = self.incoming();
        if let Some(v) = self.pop_once(dir, deadline)? {
            return Ok(Some(v));
        }
        if self.role == Role::Owner {
            self.reap(deadline)?;
            self.report_lost("read")?;
        }
        if self.ended(deadline)? {
            self.report_lost("read")?;
            return match self.pop_once(dir, deadline)? {
                Some(v) => Ok(Some(v)),
                None => Err(end_of_queue(
                    "read",
                    match self.role {
                        Role::Worker => "the owner closed the queue and every question was read",
                        Role::Owner => {
                            "the queue was closed, every question was taken, no worker is left and every answer was read"
                        }
                    },
                )),
            };
        }
        if self.role == Role::Worker && self.inner.local.is_none() {
            let (pid, start) = self.inner.seg.owner();
            if !alive(pid, start) && self.inner.seg.len(QUESTIONS) == 0 {
                return Err(Error::new(
                    ErrorKind::PeerLost,
                    "read",
                    format!(
                        "the owner of queue {:?} (pid {pid}) died and no question is left",
                        self.inner.name
                    ),
                ));
            }
        }
        Ok(None)
    }

    fn pop_once(&self, dir: usize, deadline: Deadline) -> Result<Option<Value>> {
        let v = self.pop_either(dir, deadline)?;
        if v.is_some() && dir == QUESTIONS {
            self.took();
        }
        Ok(v)
    }

    fn pop_either(&self, dir: usize, deadline: Deadline) -> Result<Option<Value>> {
        if let Some(l) = &self.inner.local {
            let ch = if dir == QUESTIONS {
                &l.questions
            } else {
                &l.answers
            };
            if let Some(v) = ch.try_pop() {
                return Ok(Some(v));
            }
        }
        self.inner.seg.try_pop(dir, deadline)
    }

    /// True when the questions are closed and none is left in either tier (HQ-6: seen under
    /// the switch lock, so a question on its way to shared memory counts).
    fn questions_done(&self) -> bool {
        let seg = &self.inner.seg;
        if !seg.closed() {
            return false;
        }
        match &self.inner.local {
            None => seg.len(QUESTIONS) == 0,
            // After the switch nothing is ever queued in-process again.
            Some(l) if seg.shm_mode() => l.questions.is_empty() && seg.len(QUESTIONS) == 0,
            Some(l) => match l.switch.try_lock() {
                Ok(_g) => l.questions.is_empty() && seg.len(QUESTIONS) == 0,
                Err(std::sync::TryLockError::Poisoned(g)) => {
                    let _g = g.into_inner();
                    l.questions.is_empty() && seg.len(QUESTIONS) == 0
                }
                Err(std::sync::TryLockError::WouldBlock) => false, // busy: look again later
            },
        }
    }

    /// Owner: looks for dead worker processes, at most once per wait slice (WQA-3).
    fn reap(&self, deadline: Deadline) -> Result<()> {
        let now = self.inner.born.elapsed().as_millis() as u64;
        let last = self.inner.last_reap_ms.load(Ordering::SeqCst);
        if now.saturating_sub(last) < parallel_engine::runtime::SLICE.as_millis() as u64
            || self
                .inner
                .last_reap_ms
                .compare_exchange(last, now, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
        {
            return Ok(());
        }
        self.inner.seg.remote_workers(deadline).map(|_| ())
    }

    /// Owner: raises, once, the loss of a worker process that died holding questions (WQA-3).
    fn report_lost(&self, op: &'static str) -> Result<()> {
        let (n, pid, held) = self.inner.seg.lost();
        let seen = self.inner.reported_lost.load(Ordering::SeqCst);
        if n <= seen
            || self
                .inner
                .reported_lost
                .compare_exchange(seen, n, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
        {
            return Ok(());
        }
        let more = if n - seen > 1 {
            format!(
                " ({} worker processes died holding questions since the last report)",
                n - seen
            )
        } else {
            String::new()
        };
        Err(Error::new(
            ErrorKind::Worker,
            op,
            format!(
                "worker process {pid} of queue {:?} died (killed, or exited without closing the queue) holding {held} unanswered question(s): their answers will never come{more}. The queue stays usable: the other answers can still be read",
                self.inner.name
            ),
        )
        .with_peer(format!("pid {pid}")))
    }

    /// True when nothing more can arrive for this handle's reads (HQ-3).
    pub fn ended(&self, deadline: Deadline) -> Result<bool> {
        if !self.questions_done() {
            return Ok(false);
        }
        if self.role == Role::Worker {
            return Ok(true);
        }
        let answers_empty = self
            .inner
            .local
            .as_ref()
            .is_none_or(|l| l.answers.is_empty())
            && self.inner.seg.len(ANSWERS) == 0;
        Ok(answers_empty
            && self.inner.local_workers.load(Ordering::SeqCst) == 0
            && self.inner.seg.remote_workers(deadline)? == 0)
    }

    /// Owner: waits until every question written before the call is settled (WQA-2): answered,
    /// or taken by a worker handle that closed (or a process that died) without answering it.
    /// A worker process that died holding questions is a `Worker` error naming it (WQA-3).
    pub fn drain(&self, timeout: Option<Duration>) -> Result<()> {
        if self.role != Role::Owner {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "drain",
                "drain() is for the owner's handle",
            ));
        }
        let deadline = Deadline::or_default(timeout);
        let target = self.inner.seg.written(QUESTIONS);
        let seg = &self.inner.seg;
        seg.events[ANSWERS]
            .wait_until(
                deadline,
                Duration::ZERO,
                "drain",
                "an answer to every question written before drain()",
                || {
                    self.report_lost("drain")?;
                    if seg.settled() >= target {
                        return Ok(true);
                    }
                    self.reap(deadline)?;
                    self.report_lost("drain")?;
                    Ok(seg.settled() >= target || self.ended(deadline)?)
                },
            )
            .map_err(|e| self.explain(e, Some(target)))
    }

    /// Closes this handle for writing: the owner's close ends the questions (workers read what is
    /// queued, then end of queue); a worker's close tells the owner it sends nothing more.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        match (self.role, &self.inner.local) {
            (Role::Owner, local) => {
                if let Some(l) = local {
                    l.questions.close();
                }
                self.inner.seg.close();
            }
            (Role::Worker, Some(_)) => {
                self.settle(u64::MAX); // what it holds will never be answered (WQA-2)
                self.inner.local_workers.fetch_sub(1, Ordering::SeqCst);
                self.inner.seg.events[ANSWERS].notify();
            }
            (Role::Worker, None) => {
                self.settle(u64::MAX);
                self.inner.seg.detach()
            }
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Test hook for SHQ-2: kills this process with SIGKILL while it holds the queue's lock.
    #[doc(hidden)]
    pub fn die_holding_lock(&self) -> ! {
        self.inner.seg.die_holding_lock()
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

/// The creator's listener: hands the memfd to every same-user process that connects (HQ-1).
fn serve(listener: OwnedFd, stop: RawFd, inner: Weak<Inner>) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds; a bounded wait so a vanished queue is noticed.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, 500) };
        if fds[1].revents != 0 {
            return;
        }
        let Some(inner) = inner.upgrade() else { return };
        if inner.owner_dropped.load(Ordering::SeqCst) {
            return;
        }
        // SAFETY: accepting on our listening socket; the new fd is owned below.
        let c = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if c < 0 {
            continue;
        }
        // SAFETY: a fresh fd from accept4.
        let conn = unsafe { OwnedFd::from_raw_fd(c) };
        let cred = crate::sys::peer_cred(conn.as_raw_fd()).ok();
        if cred.map(|c| c.uid) != Some(my_uid()) {
            tracing::warn!(
                "refused a process of another user that tried to open work queue {:?}",
                inner.name
            );
            continue;
        }
        // HQ-6: it counts as a worker from now on, until it attaches and closes, or dies.
        if let Some(c) = cred
            && let Err(e) = inner
                .seg
                .reserve(c.pid as u32, Deadline::after(Duration::from_secs(5)))
        {
            tracing::warn!(
                "work queue {:?}: could not reserve an entry for process {}: {e}",
                inner.name,
                c.pid
            );
        }
        if let Err(e) = HostQueue::switch_to_shared(&inner) {
            tracing::error!(
                "work queue {:?}: moving questions to shared memory failed: {e}",
                inner.name
            );
            continue;
        }
        if let Err(e) = sys::send_fds(
            conn.as_raw_fd(),
            b"PRLWQ\x01\0\0",
            &[inner.seg.fd.as_raw_fd()],
        ) {
            tracing::warn!(
                "work queue {:?}: handing the queue to a process failed: {e}",
                inner.name
            );
        }
    }
}
