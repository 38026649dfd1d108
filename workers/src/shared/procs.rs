//! Processes attached to the queue and question accounting: attaching, detaching, retiring
//! dead holders, and the counts end of queue and drain rely on (SHQ-3, WQA-*).

use super::*;

impl Segment {
    /// Registers one more handle of this process on the queue (for end-of-queue accounting).
    pub(crate) fn attach(&self, deadline: Deadline) -> Result<()> {
        let _g = self.lock(deadline)?;
        let i = self.proc_slot_locked(self.pid, my_start())?;
        let a = &self.hdr().acct;
        if a.pending[i].load(Ordering::Relaxed) > 0 {
            a.pending[i].fetch_sub(1, Ordering::Relaxed); // the listener's reservation (HQ-6)
        }
        self.hdr().procs[i].handles.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The `procs` slot of process `pid` (started at `start`), taking a free or dead one (whose
    /// questions are settled first, WQA-3) when it has none. Under the lock.
    pub(super) fn proc_slot_locked(&self, pid: u32, start: u64) -> Result<usize> {
        let h = self.hdr();
        if let Some(i) = h
            .procs
            .iter()
            .position(|p| p.pid.load(Ordering::Relaxed) == pid)
        {
            return Ok(i);
        }
        for (i, p) in h.procs.iter().enumerate() {
            self.retire_if_dead_locked(i);
            if p.pid.load(Ordering::Relaxed) == 0 {
                p.handles.store(0, Ordering::Relaxed);
                h.acct.pending[i].store(0, Ordering::Relaxed);
                h.acct.held[i].store(0, Ordering::Relaxed);
                p.start.store(start, Ordering::Relaxed);
                p.pid.store(pid, Ordering::Relaxed);
                return Ok(i);
            }
        }
        Err(Error::new(
            ErrorKind::Resource,
            "workqueue",
            format!("more than {MAX_PROCS} processes have this queue open"),
        ))
    }

    pub(crate) fn detach(&self) {
        if let Ok(_g) = self.lock(Deadline::after(Duration::from_secs(30))) {
            let h = self.hdr();
            for (i, p) in h.procs.iter().enumerate() {
                if p.pid.load(Ordering::Relaxed) == self.pid {
                    if p.handles.fetch_sub(1, Ordering::Relaxed) <= 1
                        && h.acct.pending[i].load(Ordering::Relaxed) == 0
                    {
                        // Its handles settled what they held on close (WQA-2); any rest too.
                        let held = h.acct.held[i].swap(0, Ordering::Relaxed);
                        h.acct.settled.fetch_add(held, Ordering::SeqCst);
                        p.pid.store(0, Ordering::Relaxed);
                    }
                    break;
                }
            }
        }
        self.events[ANSWERS].notify();
    }

    /// Processes other than the owner's that have the queue open and are alive.
    pub(crate) fn remote_workers(&self, deadline: Deadline) -> Result<usize> {
        let _g = self.lock(deadline)?;
        let mut n = 0;
        for (i, p) in self.hdr().procs.iter().enumerate() {
            self.retire_if_dead_locked(i);
            if p.pid.load(Ordering::Relaxed) != 0 {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Test hook for SHQ-2: takes the lock and kills this process with SIGKILL while holding it.
    /// Only with the feature `test-hooks` (tests; never in wheels).
    #[cfg(feature = "test-hooks")]
    pub(crate) fn die_holding_lock(&self) -> ! {
        let g = self.lock(Deadline::after(Duration::from_secs(30)));
        std::mem::forget(g);
        // SAFETY: plain syscalls; SIGKILL cannot be caught, so the process ends here.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        std::process::abort()
    }
}

/// Question accounting (WQA-*, see host.rs): who holds which questions, settled questions, and
/// worker processes that died holding some.
impl Segment {
    /// A process is being handed the memfd: it counts as an attached worker until it attaches
    /// or dies, so the owner's end of queue cannot pass it by (HQ-6).
    pub(crate) fn reserve(&self, pid: u32, deadline: Deadline) -> Result<()> {
        let Some(start) = start_time(pid) else {
            return Ok(()); // already gone: nothing to wait for
        };
        let _g = self.lock(deadline)?;
        let i = self.proc_slot_locked(pid, start)?;
        self.hdr().acct.pending[i].fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Under the lock: this process took one question (WQA-1).
    pub(super) fn count_taken_locked(&self) {
        let h = self.hdr();
        if let Some(i) = h
            .procs
            .iter()
            .position(|p| p.pid.load(Ordering::Relaxed) == self.pid)
        {
            h.acct.held[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `n` questions are settled (answered, or abandoned by a closing handle); `remote`: they
    /// were held by this process's entry (a process other than the owner's) (WQA-2).
    pub(crate) fn settle(&self, n: u64, remote: bool) {
        if n == 0 {
            return;
        }
        let h = self.hdr();
        if remote
            && let Some(i) = h
                .procs
                .iter()
                .position(|p| p.pid.load(Ordering::Relaxed) == self.pid)
        {
            let _ = h.acct.held[i].fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                Some(v.saturating_sub(n))
            });
        }
        h.acct.settled.fetch_add(n, Ordering::SeqCst);
        self.events[ANSWERS].notify();
    }

    /// Questions answered or abandoned so far (WQA-2).
    pub(crate) fn settled(&self) -> u64 {
        self.hdr().acct.settled.load(Ordering::SeqCst)
    }

    /// Under the lock: frees slot `i` if its process died, settling the questions it held and
    /// recording it as lost when it held any (WQA-3).
    pub(super) fn retire_if_dead_locked(&self, i: usize) {
        let h = self.hdr();
        let p = &h.procs[i];
        let pid = p.pid.load(Ordering::Relaxed);
        if pid == 0 || alive(pid, p.start.load(Ordering::Relaxed)) {
            return;
        }
        let held = h.acct.held[i].swap(0, Ordering::Relaxed);
        h.acct.pending[i].store(0, Ordering::Relaxed);
        p.handles.store(0, Ordering::Relaxed);
        p.pid.store(0, Ordering::Relaxed);
        if held > 0 {
            h.acct.last_lost_pid.store(pid, Ordering::Relaxed);
            h.acct
                .last_lost_held
                .store(held.min(u32::MAX as u64) as u32, Ordering::Relaxed);
            h.acct.lost_questions.fetch_add(held, Ordering::Relaxed);
            h.acct.settled.fetch_add(held, Ordering::SeqCst);
            h.acct.lost_procs.fetch_add(1, Ordering::SeqCst);
            tracing::warn!(
                "work queue: worker process {pid} died holding {held} unanswered question(s)"
            );
        }
        self.events[ANSWERS].notify();
    }

    /// Worker processes lost so far, and the last one's pid and held questions (WQA-3).
    pub(crate) fn lost(&self) -> (u64, u32, u32) {
        let a = &self.hdr().acct;
        (
            a.lost_procs.load(Ordering::SeqCst),
            a.last_lost_pid.load(Ordering::SeqCst),
            a.last_lost_held.load(Ordering::SeqCst),
        )
    }

    /// Live worker processes with questions in hand: (pid, held, attaching), for error messages.
    pub(crate) fn holders(&self) -> Vec<(u32, u64, bool)> {
        let h = self.hdr();
        h.procs
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let pid = p.pid.load(Ordering::Relaxed);
                let held = h.acct.held[i].load(Ordering::Relaxed);
                let attaching = p.handles.load(Ordering::Relaxed) == 0
                    && h.acct.pending[i].load(Ordering::Relaxed) > 0;
                (pid != 0).then_some((pid, held, attaching))
            })
            .collect()
    }
}
