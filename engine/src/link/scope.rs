//! Completion scopes: asynchronous sends of borrowed segments and receives into borrowed
//! buffers, which cannot outlive the borrow.
//!
//! [`scope`] works as `std::thread::scope` does: the closure gets a [`Scope`]; operations started
//! on it ([`Scope::send`], [`Scope::recv_into`]) run on a thread of their own and borrow their
//! memory for `'env`, the lifetime of everything outside the scope, so the borrow checker
//! refuses to free, move, read or write that memory until `scope` returns; and `scope` does not
//! return, nor unwind, before every operation it started has completed. The scope lives inside
//! `scope`'s own frame, so no safe code can leak it (`mem::forget`) to skip the wait: the pattern
//! "start an asynchronous send, then free the buffer" does not compile.
//!
//! Invariants:
//! - SCOPE-1: when `scope` returns (or a panic leaves it), no operation it started can read or
//!   write the memory it was given: each has completed (its result set, by the operation or, when
//!   the task was dropped unrun or panicked, by the task's guard).
//! - SCOPE-2: no wait is unbounded in the normal course: an operation still pending at the
//!   scope's deadline has its carrier closed (LINK-4 wakes a blocked call, which then fails), and
//!   the scope then waits for it to finish; that wait is the only one without a deadline, as the
//!   memory may still be in use until then (it logs once a second while it lasts).
//! - SCOPE-3: the first error of an operation the closure did not wait for is the scope's error;
//!   an operation's error does not stop the others.
//! - SCOPE-4: operations of one direction on one carrier run in the order they were started (two
//!   sends on a link are never reordered, nor two receives, whose buffers would be swapped).
//!
//! Threads: each operation runs on a short-lived thread, not on a reactor: a send and a receive
//! of one scope must progress together, and a reactor runs its tasks one after the other (a
//! receive waiting for a send queued behind it on the same reactor would wait for its deadline).

use super::Link;
use crate::error::{Error, ErrorKind, Result};
use crate::runtime::{Completion, Deadline};
use crate::value::{DType, Device, Tensor, Value};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Keeps [`Carrier`] to this crate's types: a scope hands a carrier tensors over borrowed memory,
/// which an implementation outside the crate could keep past the scope (unsound).
pub(crate) mod sealed {
    pub trait Sealed {}
}

/// Something a scope can run operations on: a link, or a connection that owns one (sealed: only
/// [`Link`] and [`crate::endpoint::Conn`]).
pub trait Carrier: sealed::Sealed + Send + Sync + 'static {
    /// Sends one message.
    fn send_value(&self, v: &Value, deadline: Deadline) -> Result<()>;
    /// Receives one message, its tensors into `out` in order (LINK-1 when they do not match).
    fn recv_value_into(&self, out: &mut [Tensor], deadline: Deadline) -> Result<Value>;
    /// Closes the carrier, waking a blocked call (LINK-4).
    fn close_now(&self);
}

impl sealed::Sealed for Link {}

impl Carrier for Link {
    fn send_value(&self, v: &Value, deadline: Deadline) -> Result<()> {
        self.send(v, deadline)
    }
    fn recv_value_into(&self, out: &mut [Tensor], deadline: Deadline) -> Result<Value> {
        self.recv(out, deadline)
    }
    fn close_now(&self) {
        self.close()
    }
}

/// One operation in flight: its completion and what to close to interrupt it.
struct Pending {
    done: Completion<()>,
    carrier: Arc<dyn Carrier>,
    /// The closure took the operation's result itself (its error is not the scope's, SCOPE-3).
    observed: Arc<AtomicBool>,
}

/// The direction of an operation on a carrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Send,
    Recv,
}

/// Operations borrowing memory for `'env`, started inside [`scope`].
pub struct Scope<'scope, 'env: 'scope> {
    deadline: Deadline,
    pending: Mutex<Vec<Pending>>,
    /// The last operation started per carrier and direction: the next one starts after it, so
    /// two sends (or two receives) on one link happen in the order they were started (SCOPE-4).
    last: Mutex<Vec<(usize, Dir, Completion<()>)>>,
    // Invariant in both lifetimes, as std::thread::Scope: 'env cannot shrink to let a borrow end
    // early, 'scope cannot grow to let an Op escape.
    _scope: PhantomData<&'scope mut &'scope ()>,
    _env: PhantomData<&'env mut &'env ()>,
}

impl std::fmt::Debug for Scope<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.pending.lock().map(|p| p.len()).unwrap_or(0);
        write!(f, "Scope({n} operations)")
    }
}

/// The handle of one operation of a scope; waiting is optional (the scope waits anyway).
#[derive(Debug)]
pub struct Op<'scope, T> {
    result: Completion<T>,
    observed: Arc<AtomicBool>,
    _scope: PhantomData<&'scope ()>,
}

impl<T> Op<'_, T> {
    /// Waits for the operation (at most until the scope's deadline) and takes its result.
    pub fn wait(self, deadline: Deadline) -> Result<T> {
        let r = self.result.wait(deadline, "scope");
        if self.result.done() {
            self.observed.store(true, Ordering::SeqCst);
        }
        r
    }
    /// True when the operation has completed.
    pub fn done(&self) -> bool {
        self.result.done()
    }
}

/// Runs `f` with a [`Scope`]; returns once every operation started in it completed (SCOPE-1),
/// with `f`'s value, or the first error of an operation `f` did not wait for (SCOPE-3).
/// `deadline` bounds every operation of the scope (SCOPE-2).
///
/// ```no_run
/// # use parallel_engine::link::{self, Link};
/// # use parallel_engine::runtime::Deadline;
/// # use std::{sync::Arc, time::Duration};
/// # fn f(a: Arc<Link>, b: Arc<Link>) -> parallel_engine::Result<()> {
/// let data = vec![1u8; 1 << 20];
/// let mut got = vec![0u8; 1 << 20];
/// link::scope(Deadline::after(Duration::from_secs(10)), |s| {
///     s.recv_into(&b, vec![&mut got[..]]);
///     s.send(&a, &[&data[..]]);
/// })?;
/// assert_eq!(got, data); // every operation has completed: the buffers are ours again
/// # Ok(()) }
/// ```
///
/// Freeing (or reusing) a buffer while an operation of the scope may still read it does not
/// compile:
///
/// ```compile_fail
/// # use parallel_engine::link::{self, Link};
/// # use parallel_engine::runtime::Deadline;
/// # use std::{sync::Arc, time::Duration};
/// # fn f(a: Arc<Link>) {
/// let data = vec![1u8; 1 << 20];
/// let _ = link::scope(Deadline::after(Duration::from_secs(10)), |s| {
///     s.send(&a, &[&data[..]]);
///     drop(data); // error: `data` is borrowed by the send until the scope ends
/// });
/// # }
/// ```
///
/// nor does letting an operation escape its scope:
///
/// ```compile_fail
/// # use parallel_engine::link::{self, Link};
/// # use parallel_engine::runtime::Deadline;
/// # use std::{sync::Arc, time::Duration};
/// # fn f(a: Arc<Link>) {
/// let data = vec![1u8; 1 << 20];
/// let op = link::scope(Deadline::after(Duration::from_secs(10)), |s| s.send(&a, &[&data[..]]));
/// # }
/// ```
pub fn scope<'env, T>(
    deadline: Deadline,
    f: impl for<'scope> FnOnce(&'scope Scope<'scope, 'env>) -> T,
) -> Result<T> {
    let s = Scope {
        deadline,
        pending: Mutex::new(Vec::new()),
        last: Mutex::new(Vec::new()),
        _scope: PhantomData,
        _env: PhantomData,
    };
    // Waits on every path out of this frame, unwinding included (SCOPE-1).
    struct Guard<'a, 'b>(&'a Scope<'a, 'b>);
    impl Drop for Guard<'_, '_> {
        fn drop(&mut self) {
            self.0.finish();
        }
    }
    let guard = Guard(&s);
    let v = f(&s);
    let first = s.finish();
    drop(guard);
    first.map_or(Ok(v), Err)
}

/// A u8 tensor over borrowed memory, for an operation of a scope.
///
/// # Safety
/// The memory must stay valid (and, when `write`, exclusively the tensor's) until the operation
/// using the tensor has completed: a scope guarantees this (SCOPE-1).
unsafe fn borrowed(ptr: *mut u8, len: usize) -> Tensor {
    // SAFETY: delegated to the caller.
    unsafe {
        Tensor::from_raw(
            DType::U8,
            vec![len],
            None,
            Device::Cpu,
            ptr,
            len,
            Arc::new(()),
        )
    }
}

/// Sets an operation's completion when its task ends without doing so (dropped unrun by a
/// reactor that is gone, or panicking): SCOPE-1 must not wait forever for it.
struct Finally<T>(Completion<T>);

impl<T> Drop for Finally<T> {
    fn drop(&mut self) {
        self.0.complete(Err(Error::new(
            ErrorKind::Cancelled,
            "scope",
            "the operation ended without a result (its reactor is gone, or it panicked)",
        )));
    }
}

impl<'scope, 'env> Scope<'scope, 'env> {
    /// Sends one message made of `segs` (a list of u8 tensors, one per segment) to `to`; the
    /// segments stay borrowed until the scope ends.
    pub fn send<C: Carrier>(&'scope self, to: &Arc<C>, segs: &[&'env [u8]]) -> Op<'scope, ()> {
        // SAFETY: each segment is borrowed for 'env, which outlives this scope, and the scope
        // does not end before this send completed (SCOPE-1); shared borrows: nobody writes them.
        let v = Value::List(
            segs.iter()
                .map(|b| Value::Tensor(unsafe { borrowed(b.as_ptr() as *mut u8, b.len()) }))
                .collect(),
        );
        let to = to.clone();
        self.start(to.clone(), Dir::Send, move |deadline| {
            to.send_value(&v, deadline)
        })
    }

    /// Receives one message from `from`, its tensors into `bufs` in order (each must
    /// match: a u8 tensor of the buffer's length, else `Mismatch` and the link stays usable,
    /// LINK-1); the value comes back with `Value::Out(i)` where each tensor was. The buffers stay
    /// borrowed until the scope ends: read them after `scope` returned.
    pub fn recv_into<C: Carrier>(
        &'scope self,
        from: &Arc<C>,
        bufs: Vec<&'env mut [u8]>,
    ) -> Op<'scope, Value> {
        // SAFETY: each buffer is mutably borrowed for 'env, which outlives this scope, and the
        // scope does not end before this receive completed (SCOPE-1): nothing else touches it.
        let mut out: Vec<Tensor> = bufs
            .into_iter()
            .map(|b| unsafe { borrowed(b.as_mut_ptr(), b.len()) })
            .collect();
        let from = from.clone();
        self.start(from.clone(), Dir::Recv, move |deadline| {
            from.recv_value_into(&mut out, deadline)
        })
    }

    fn start<T: Send + 'static>(
        &'scope self,
        carrier: Arc<dyn Carrier>,
        dir: Dir,
        op: impl FnOnce(Deadline) -> Result<T> + Send + 'static,
    ) -> Op<'scope, T> {
        let result = Completion::<T>::default();
        let done = Completion::<()>::default();
        let observed = Arc::new(AtomicBool::new(false));
        // SCOPE-4: after the previous operation of this carrier and direction, whose `ended`
        // this one alone waits for (a completion's result is taken by one wait).
        let ended = Completion::<()>::default();
        let key = Arc::as_ptr(&carrier) as *const () as usize;
        let before = {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            match last.iter_mut().find(|(k, d, _)| *k == key && *d == dir) {
                Some(slot) => Some(std::mem::replace(&mut slot.2, ended.clone())),
                None => {
                    last.push((key, dir, ended.clone()));
                    None
                }
            }
        };
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Pending {
                done: done.clone(),
                carrier,
                observed: observed.clone(),
            });
        let (r, deadline) = (result.clone(), self.deadline);
        // Ends this operation's turn on its carrier however the task ends, also when it is
        // dropped unrun (SCOPE-4).
        let turn = Finally(ended);
        let task = move || {
            let _turn = turn;
            let (guard_r, guard_d) = (Finally(r.clone()), Finally(done.clone()));
            if let Some(b) = before {
                // Its outcome is its own; this one only starts after it ended (wait_done is
                // bounded by the scope: at its deadline the carrier is closed, which ends it).
                let _ = b.wait(deadline, "scope");
            }
            let out = op(deadline);
            let status = match &out {
                Ok(_) => Ok(()),
                Err(e) => Err(e.clone()),
            };
            r.complete(out);
            done.complete(status);
            drop((guard_r, guard_d));
        };
        // A thread that cannot be started drops `task` unrun: its guards report it (SCOPE-1).
        if let Err(e) = std::thread::Builder::new()
            .name("parallel-scope".into())
            .spawn(task)
        {
            tracing::warn!("a scope could not start a thread for an operation: {e}");
        }
        Op {
            result,
            observed,
            _scope: PhantomData,
        }
    }

    /// Waits for every operation started so far (SCOPE-1, SCOPE-2); the first error (SCOPE-3).
    fn finish(&self) -> Option<Error> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let mut first = None;
        for p in pending {
            let r = match p.done.wait(self.deadline, "scope") {
                Err(e) if !p.done.done() => {
                    // Still reading or writing the memory: interrupt it, then wait for it.
                    p.carrier.close_now();
                    wait_done(&p.done);
                    Err(e)
                }
                r => r,
            };
            if let Err(e) = r
                && !p.observed.load(Ordering::SeqCst)
            {
                first.get_or_insert(e);
            }
        }
        first
    }
}

/// Waits until `c` completed, however long it takes (SCOPE-2): returning earlier would let the
/// borrowed memory go while the operation may still touch it.
fn wait_done(c: &Completion<()>) {
    let mut waited = 0u64;
    while !c.done() {
        if c.wait(Deadline::after(Duration::from_secs(1)), "scope")
            .is_ok()
            || c.done()
        {
            return;
        }
        waited += 1;
        tracing::warn!(
            "a scope's operation has not finished {waited} s after its link was closed; still waiting (its memory is in use)"
        );
    }
}
