use super::*;
use crate::error::Error;
use std::sync::{Arc, Mutex};

fn socket_pair() -> [RawFd; 2] {
    let mut fds = [0; 2];
    // SAFETY: creating a socket pair into a valid array.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) };
    assert_eq!(rc, 0);
    fds
}

/// RT-2/RT-4: a large receive that fails (deadline, then the peer's death) leaves no ring
/// entry behind: the bytes the peer sends afterwards are neither written into the released
/// buffer (whose memory is reused at once) nor consumed from the socket.
#[test]
fn rt_4_no_transfer_outlives_its_buffer() {
    const N: usize = 1 << 20; // above the 64 KiB where receives go through the ring
    // (Through io_uring where it can run, as here; through epoll elsewhere: both must hold.)
    let [a, b] = socket_pair();
    // 1. A receive that times out with nothing sent (cancel on the deadline path).
    let mut buf = vec![0u8; N];
    let e = recv_exact(
        a,
        &mut buf,
        Deadline::after(Duration::from_millis(300)),
        Duration::ZERO,
        "t",
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    drop(buf);
    let reused = vec![0xAAu8; N]; // most likely the same memory
    let sent: Vec<u8> = (0..256 << 10).map(|i| (i % 251) as u8).collect();
    let writer = {
        let sent = sent.clone();
        std::thread::spawn(move || {
            send_all(b, &[&sent], Deadline::after(Duration::from_secs(10)), "t").unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        reused.iter().all(|x| *x == 0xAA),
        "a cancelled receive wrote freed memory"
    );
    let mut got = vec![0u8; sent.len()];
    assert!(
        recv_exact(
            a,
            &mut got,
            Deadline::after(Duration::from_secs(10)),
            Duration::ZERO,
            "t"
        )
        .unwrap()
    );
    assert!(
        got == sent,
        "bytes after a cancelled receive were lost or reordered"
    );
    writer.join().unwrap();
    // 2. The peer dies in the middle of a receive (the entry completes short, then EOF).
    let part = vec![7u8; 100 << 10];
    let writer = std::thread::spawn(move || {
        send_all(b, &[&part], Deadline::after(Duration::from_secs(10)), "t").unwrap();
        // SAFETY: we own b; closing it is the peer's death.
        unsafe { libc::close(b) };
    });
    let mut buf = vec![0u8; N];
    let e = recv_exact(
        a,
        &mut buf,
        Deadline::after(Duration::from_secs(10)),
        Duration::ZERO,
        "t",
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PeerLost, "{e}");
    assert!(
        buf[..100 << 10].iter().all(|x| *x == 7),
        "the bytes that did arrive"
    );
    drop(buf);
    let reused = vec![0x55u8; N];
    writer.join().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(reused.iter().all(|x| *x == 0x55));
    // SAFETY: we own a.
    unsafe { libc::close(a) };
}

#[test]
fn rt_1_waits_end_at_their_deadline() {
    let mut fds = [0; 2];
    // SAFETY: creating a socket pair into a valid array.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) };
    assert_eq!(rc, 0);
    let t = Instant::now();
    let mut buf = [0u8; 4];
    let e = recv_exact(
        fds[0],
        &mut buf,
        Deadline::after(Duration::from_millis(150)),
        Duration::ZERO,
        "a test frame",
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert!(t.elapsed() >= Duration::from_millis(150));
    send_all(
        fds[1],
        &[b"ab", b"cd"],
        Deadline::after(Duration::from_secs(5)),
        "x",
    )
    .unwrap();
    assert!(
        recv_exact(
            fds[0],
            &mut buf,
            Deadline::after(Duration::from_secs(5)),
            Duration::ZERO,
            "x"
        )
        .unwrap()
    );
    assert_eq!(&buf, b"abcd");
    // SAFETY: closing our own fds.
    unsafe { libc::close(fds[1]) };
    assert!(
        !recv_exact(
            fds[0],
            &mut buf,
            Deadline::after(Duration::from_secs(5)),
            Duration::ZERO,
            "x"
        )
        .unwrap()
    );
    // SAFETY: closing our own fd.
    unsafe { libc::close(fds[0]) };
}

#[test]
fn large_transfer_through_backend() {
    let mut fds = [0; 2];
    // SAFETY: creating a socket pair into a valid array.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) };
    assert_eq!(rc, 0);
    let data: Vec<u8> = (0..(3 << 20)).map(|i| (i % 251) as u8).collect();
    let d2 = data.clone();
    let w = fds[1];
    let t = std::thread::spawn(move || {
        send_all(w, &[&d2], Deadline::after(Duration::from_secs(10)), "big").unwrap()
    });
    let mut got = vec![0u8; data.len()];
    assert!(
        recv_exact(
            fds[0],
            &mut got,
            Deadline::after(Duration::from_secs(10)),
            Duration::ZERO,
            "big"
        )
        .unwrap()
    );
    t.join().unwrap();
    assert!(got == data);
    // SAFETY: closing our own fds.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1])
    };
}

#[test]
fn completion_wait_times_out_and_delivers() {
    let c: Completion<u32> = Completion::default();
    assert_eq!(
        c.wait(Deadline::after(Duration::from_millis(20)), "t")
            .unwrap_err()
            .kind(),
        ErrorKind::Timeout
    );
    let c2 = c.clone();
    Runtime::get().spawn(move || c2.complete(Ok(5)));
    assert_eq!(
        c.wait(Deadline::after(Duration::from_secs(5)), "t")
            .unwrap(),
        5
    );
    assert!(c.done());
}

#[test]
fn exec_4_callbacks_run_once_after_the_result_is_visible() {
    use std::sync::mpsc;
    let c: Completion<u32> = Completion::default();
    let (tx, rx) = mpsc::channel::<(u32, bool)>();
    for i in 0..3 {
        let (tx, seen) = (tx.clone(), c.clone());
        // The result is visible to a waiter when the callback runs (done(), not yet taken).
        c.on_done(move || tx.send((i, seen.done())).unwrap());
    }
    assert!(rx.try_recv().is_err(), "a callback ran before completion");
    let c2 = c.clone();
    Runtime::get().spawn(move || {
        c2.complete(Ok(7));
        c2.complete(Ok(8)); // ignored: the first result stands, callbacks do not run again
    });
    let mut got: Vec<(u32, bool)> = (0..3)
        .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
        .collect();
    got.sort();
    assert_eq!(got, vec![(0, true), (1, true), (2, true)]);
    assert_eq!(
        c.wait(Deadline::after(Duration::from_secs(5)), "t")
            .unwrap(),
        7
    );
    // Registered after completion (and after the result was taken): runs at once, here.
    let (tx2, rx2) = mpsc::channel::<()>();
    c.on_done(move || tx2.send(()).unwrap());
    assert!(rx2.try_recv().is_ok());
    assert!(
        rx.recv_timeout(Duration::from_millis(50)).is_err(),
        "a callback ran twice"
    );
    // A panicking callback is contained; the next one still runs.
    let c3: Completion<()> = Completion::default();
    let (tx3, rx3) = mpsc::channel::<()>();
    c3.on_done(|| panic!("callback panics (expected in this test)"));
    c3.on_done(move || tx3.send(()).unwrap());
    c3.complete(Ok(()));
    assert!(rx3.try_recv().is_ok());
}

/// CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    // SAFETY: timespec is plain data; clock_gettime fills it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Receives 4 bytes that a peer sends after `delay`, with a spin cap of `cap`; returns the
/// receiver's CPU time.
fn wait_for_late_bytes(cap: Duration, delay: Duration) -> Duration {
    let [a, b] = socket_pair();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(delay);
        send_all(b, &[b"late"], Deadline::after(Duration::from_secs(10)), "t").unwrap();
    });
    let cpu = thread_cpu();
    let mut buf = [0u8; 4];
    let got = recv_exact(
        a,
        &mut buf,
        Deadline::after(Duration::from_secs(10)),
        cap,
        "t",
    );
    let used = thread_cpu() - cpu;
    writer.join().unwrap();
    assert!(got.unwrap(), "EOF instead of the bytes");
    assert_eq!(&buf, b"late");
    // SAFETY: closing our own fds.
    unsafe {
        libc::close(a);
        libc::close(b);
    }
    used
}

/// SPIN-1: with spinning off (cap 0) a waiter sleeps in the kernel and still wakes for bytes
/// that come later; it uses next to no CPU while it waits.
#[test]
fn spin_1_waiter_wakes_through_the_kernel_when_spinning_is_off() {
    let used = wait_for_late_bytes(Duration::ZERO, Duration::from_millis(300));
    assert!(
        used < Duration::from_millis(50),
        "waiter used {used:?} of CPU"
    );
}

/// SPIN-2: on saturated cores a waiter allowed to spin for a whole second does not: it sleeps
/// in the kernel, leaving the cores to the busy threads, and wakes when the bytes come.
#[test]
fn spin_2_waiter_on_saturated_cores_sleeps_in_the_kernel() {
    let busy = spin::tests::Saturate::new();
    let used = wait_for_late_bytes(Duration::from_secs(1), Duration::from_millis(300));
    drop(busy);
    assert!(
        used < Duration::from_millis(50),
        "waiter used {used:?} of CPU"
    );
}

/// EXEC-2: a lane runs its jobs one at a time in submission order, holds no thread while empty,
/// and a panicking job fails its own handle only.
#[test]
fn exec_2_lane_runs_jobs_in_order_and_survives_a_panic() {
    let lane = Lane::new();
    let log = Arc::new(Mutex::new(Vec::new()));
    let handles: Vec<Completion<usize>> = (0..20)
        .map(|i| {
            let log = log.clone();
            lane.submit(move || {
                if i == 7 {
                    panic!("job 7");
                }
                std::thread::sleep(Duration::from_micros(200));
                log.lock().unwrap().push(i);
                Ok(i)
            })
        })
        .collect();
    for (i, h) in handles.iter().enumerate() {
        let r = h.wait(Deadline::after(Duration::from_secs(10)), "t");
        if i == 7 {
            assert_eq!(r.unwrap_err().kind(), ErrorKind::Resource);
        } else {
            assert_eq!(r.unwrap(), i);
        }
    }
    let want: Vec<usize> = (0..20).filter(|i| *i != 7).collect();
    assert_eq!(*log.lock().unwrap(), want);
    assert_eq!(lane.pending(), 0);
}

/// EXEC-2: two lanes run side by side (a collective blocking one lane never stalls another).
#[test]
fn exec_2_lanes_do_not_wait_for_each_other() {
    let (a, b) = (Lane::new(), Lane::new());
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let blocked = a.submit(move || {
        rx.recv_timeout(Duration::from_secs(10))
            .map_err(|_| Error::new(ErrorKind::Timeout, "t", "never released"))
    });
    let other = b.submit(|| Ok(5));
    assert_eq!(
        other
            .wait(Deadline::after(Duration::from_secs(10)), "t")
            .unwrap(),
        5
    );
    assert_eq!(a.pending(), 1);
    tx.send(()).unwrap();
    blocked
        .wait(Deadline::after(Duration::from_secs(10)), "t")
        .unwrap();
}
