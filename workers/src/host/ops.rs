//! Writing, reading, end of queue, drain and close of a [`HostQueue`] (HQ-2..HQ-7, WQA-*).

use super::*;

impl HostQueue {
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
    pub(super) fn write_piece(
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
    pub(super) fn settle(&self, n: u64) {
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
    pub(super) fn took(&self) {
        self.held.fetch_add(1, Ordering::SeqCst);
        if self.inner.local.is_some() {
            self.inner.local_held.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub(super) fn explain_rejected(
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
    pub(super) fn explain(&self, e: Error, drain_target: Option<u64>) -> Error {
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
    pub(super) fn write_question(
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
    pub(super) fn switch_to_shared(inner: &Inner) -> Result<()> {
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

    pub(super) fn try_read_until(&self, deadline: Deadline) -> Result<Option<Value>> {
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

    pub(super) fn pop_once(&self, dir: usize, deadline: Deadline) -> Result<Option<Value>> {
        let v = self.pop_either(dir, deadline)?;
        if v.is_some() && dir == QUESTIONS {
            self.took();
        }
        Ok(v)
    }

    pub(super) fn pop_either(&self, dir: usize, deadline: Deadline) -> Result<Option<Value>> {
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
    pub(super) fn questions_done(&self) -> bool {
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
    pub(super) fn reap(&self, deadline: Deadline) -> Result<()> {
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
    pub(super) fn report_lost(&self, op: &'static str) -> Result<()> {
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
    /// Only with the feature `test-hooks` (tests; never in wheels).
    #[cfg(feature = "test-hooks")]
    pub fn die_holding_lock(&self) -> ! {
        self.inner.seg.die_holding_lock()
    }
}
