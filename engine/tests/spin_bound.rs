//! SPIN-4/5 in a process of its own: the process's CPUs, as the wait policy counts them, follow a
//! binding made after its first wait (OpenMP's at its first parallel region, the
//! application's). Alone in this binary because it narrows the process's main thread, which
//! every thread the test harness starts afterwards would inherit.

use parallel_engine::runtime::{Spin, refresh_load};
use std::time::Duration;

/// The main thread's mask (the process's), set back when dropped.
struct MainMask(libc::cpu_set_t);

impl MainMask {
    fn get() -> MainMask {
        // SAFETY: plain data filled by the call.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            let size = std::mem::size_of::<libc::cpu_set_t>();
            assert_eq!(libc::sched_getaffinity(libc::getpid(), size, &mut set), 0);
            MainMask(set)
        }
    }

    fn set(set: &libc::cpu_set_t) {
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: a valid set of its size, for this process's main thread.
        let rc = unsafe { libc::sched_setaffinity(libc::getpid(), size, set) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }

    fn cpus(&self) -> Vec<usize> {
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: reading an initialised set.
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &self.0) })
            .collect()
    }
}

impl Drop for MainMask {
    fn drop(&mut self) {
        MainMask::set(&self.0);
    }
}

/// The first spin the policy starts within 2 s (a busy machine declines them for a while):
/// whether it yields; `None` if every try was declined.
fn first_spin_yields() -> Option<bool> {
    for _ in 0..200 {
        refresh_load();
        let s = Spin::start(Duration::from_millis(1));
        if s.spinning() {
            return Some(s.yielding());
        }
        drop(s);
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

#[test]
#[allow(clippy::print_stderr)] // why the test is skipped
fn spin_5_a_binding_made_after_the_first_wait_is_seen() {
    // SAFETY: sysconf has no memory effects.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let saved = MainMask::get();
    let cpus = saved.cpus();
    if online < 2 || cpus.len() < 2 {
        eprintln!("skipped: one CPU, nothing to narrow");
        return;
    }
    let unbound = first_spin_yields();
    // Bound to one CPU after that first wait.
    // SAFETY: plain data.
    let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: cpus[0] < CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpus[0], &mut one) };
    MainMask::set(&one);
    let bound = first_spin_yields();
    drop(saved); // the mask set back
    let again = first_spin_yields();
    let (Some(unbound), Some(bound), Some(again)) = (unbound, bound, again) else {
        eprintln!("skipped: the cores stayed busy ({unbound:?}, {bound:?}, {again:?})");
        return;
    };
    assert!(!unbound, "spun yielding with {} CPUs", cpus.len());
    assert!(
        bound,
        "the binding to one CPU was not seen: the spin did not yield"
    );
    assert!(
        !again,
        "the mask set back was not seen: the spin still yields"
    );
}
