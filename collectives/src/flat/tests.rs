//! The fast path's region in one process: FLAT-4's liveness check against a real ended process.
use super::*;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

/// Waits until `pid`'s process has ended (a zombie, not reaped: its pidfd reads as ended).
fn wait_ended(pid: u32) {
    let fd = pidfd(pid).unwrap();
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, 10_000) };
    assert_eq!(n, 1, "the child did not end within 10 s");
}

/// FLAT-4: a rank that published its slot of a collective and then ended (its last collective)
/// is not lost: the waiter its publish woke finds the slot before it trusts the pidfd. Rank 1 is
/// played by a thread of this process whose pid, as rank 0 knows it, is a child that has ended.
#[test]
fn flat_4_a_rank_that_published_then_ended_is_not_lost() {
    let lay = Layout::new(2, 4096);
    let fd = create(&lay).unwrap();
    let mut child = Command::new("true").spawn().unwrap();
    let me = std::process::id();
    let r0 = Region::map(fd.try_clone().unwrap(), lay, 0, &[me, child.id()]).unwrap();
    let r1 = Arc::new(Region::map(fd, lay, 1, &[me, me]).unwrap());
    wait_ended(child.id());
    let mut w: Words = [0; WORDS];
    w[0] = 1;
    let data = vec![7u8; 64];
    let mut verdicts = Vec::new();
    // Rank 1 publishes while rank 0 sleeps on the futex (after its spin, within one SLICE);
    // a publish that comes after the slice is judged as the ended rank it is, so a few tries.
    for seq in [1u64, 3, 5, 7, 9] {
        r0.publish(seq, &w, Some(&data));
        let r1c = r1.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(3));
            r1c.publish(seq, &w, Some(&[8u8; 64]));
            Instant::now()
        });
        let d = r0.decide(seq, &w, Deadline::after(Duration::from_secs(10)), "test");
        let (at, published) = (Instant::now(), t.join().unwrap());
        if let Err(e) = &d {
            assert_eq!(e.kind(), ErrorKind::PeerLost, "{e}");
            assert!(e.to_string().contains("rank 1"), "{e}");
            // Lost before rank 1 published is right (an ended rank with no slot); after, not.
            assert!(
                at < published,
                "rank 1's slot was there and rank 0 still called it lost: {e}"
            );
        }
        verdicts.push(d.is_ok());
        if let Ok(fast) = d {
            assert!(fast, "the slots agree: the fast path");
            break;
        }
    }
    assert!(
        verdicts.contains(&true),
        "no try published within the slice: {verdicts:?}"
    );
    child.wait().unwrap();
}

/// SPREAD-1: a slot carries the CPU its writer published from, in both buffers, and a rank
/// that never published reads as unknown (0).
#[test]
fn spread_1_a_slot_carries_its_writers_cpu() {
    let lay = Layout::new(2, 4096);
    let fd = create(&lay).unwrap();
    let me = std::process::id();
    let r0 = Region::map(fd.try_clone().unwrap(), lay, 0, &[me, me]).unwrap();
    let r1 = Region::map(fd, lay, 1, &[me, me]).unwrap();
    assert_eq!(r0.cpu_word(1, 1), 0, "nothing published yet");
    std::thread::spawn(move || {
        let cpu = spread::cpu_word();
        // Pinned where it runs, so the word cannot change under the test.
        assert!(core_affinity::set_for_current(core_affinity::CoreId {
            id: cpu as usize - 1
        }));
        let w: Words = [0; WORDS];
        for seq in [1u64, 2] {
            r1.publish(seq, &w, Some(&[1u8; 64]));
            assert_eq!(r0.cpu_word(1, seq), cpu, "collective {seq}");
        }
    })
    .join()
    .unwrap();
}
