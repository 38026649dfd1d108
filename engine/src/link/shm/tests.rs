//! Unit tests of the shared-memory rings (SHM-2..7) on two ends mapped in one process.

use super::*;
use std::os::fd::FromRawFd;

const CAP: usize = 64 << 10;

/// One end of `map` with its own doorbells, side `side`, never spinning; `live` is a
/// liveness fd that never becomes readable (the "peer" stays alive).
fn end_of(map: Mapping, side: usize, live: &OwnedFd) -> ShmEnd {
    let bells = || Bells {
        data: sys::eventfd().unwrap(),
        space: sys::eventfd().unwrap(),
    };
    ShmEnd::new(
        map,
        side,
        [bells(), bells()],
        live.as_raw_fd(),
        0,
        Duration::ZERO,
    )
}

fn end(cap: usize) -> (ShmEnd, OwnedFd) {
    let map = Mapping::map(sys::memfd("t", Mapping::total_len(cap)).unwrap(), cap).unwrap();
    ShmEnd::init(&map);
    let live = sys::eventfd().unwrap();
    (end_of(map, 1, &live), live)
}

fn dl() -> Deadline {
    Deadline::after(Duration::from_secs(5))
}

/// The two ends of one segment: `a` writes the ring that `b` reads.
fn two_ends() -> (ShmEnd, ShmEnd, OwnedFd) {
    let fd = sys::memfd("t", Mapping::total_len(CAP)).unwrap();
    let dup = fd.try_clone().unwrap();
    let (ma, mb) = (
        Mapping::map(fd, CAP).unwrap(),
        Mapping::map(dup, CAP).unwrap(),
    );
    ShmEnd::init(&ma);
    let live = sys::eventfd().unwrap();
    let (a, b) = (end_of(ma, 1, &live), end_of(mb, 0, &live));
    assert_eq!(b.rx(), a.tx);
    (a, b, live)
}

#[test]
fn shm_7_a_failed_send_cancels_an_unclaimed_frame_and_the_receiver_refuses_it() {
    let (a, b, _live) = two_ends();
    let n = a.note_cma_sent();
    assert!(a.abandon_cma(n, Duration::from_secs(5)));
    let e = b.claim_cma().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PeerLost, "{e}");
}

#[test]
fn shm_7_a_claim_outliving_the_grace_is_revoked_and_the_read_frame_never_delivered() {
    let (a, b, _live) = two_ends();
    // Frame 1 goes through normally.
    let n = a.note_cma_sent();
    b.claim_cma().unwrap();
    b.check_claim().unwrap();
    b.ack_cma();
    a.wait_cma_ack(n, dl()).unwrap();
    // Frame 2: claimed, and the reader is still reading when the sender's grace ends.
    let n = a.note_cma_sent();
    b.claim_cma().unwrap();
    let t0 = Instant::now();
    assert!(a.abandon_cma(n, Duration::from_millis(50)));
    assert!(t0.elapsed() >= Duration::from_millis(50));
    let e = b.check_claim().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PeerLost, "{e}");
    assert!(e.message().contains("discarded"), "{e}");
}

#[test]
fn shm_7_a_claimed_frame_read_within_the_grace_is_delivered_and_frees_the_sender() {
    let (a, b, _live) = two_ends();
    let n = a.note_cma_sent();
    b.claim_cma().unwrap();
    std::thread::scope(|s| {
        let sender = s.spawn(|| a.abandon_cma(n, Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(20));
        b.check_claim().unwrap();
        b.ack_cma();
        assert!(sender.join().unwrap());
    });
}

#[test]
fn shm_2_head_beyond_capacity_or_behind_tail_is_a_protocol_error() {
    let (e, _live) = end(CAP);
    let c = e.map.ctrl(e.rx());
    for head in [CAP as u64 + 1, 10 * CAP as u64, u64::MAX, u64::MAX / 2] {
        c.head.store(head, Ordering::SeqCst);
        assert!(e.has_data());
        let mut buf = [0u8; 16];
        let err = e.read_exact(&mut buf, dl(), "a test frame").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Protocol, "{err}");
        assert!(err.message().contains("corrupted"), "{err}");
    }
}

#[test]
fn shm_2_tail_ahead_of_head_is_a_protocol_error_for_the_writer() {
    let (e, _live) = end(CAP);
    let c = e.map.ctrl(e.tx);
    for tail in [1, CAP as u64 * 3, u64::MAX] {
        c.tail.store(tail, Ordering::SeqCst);
        // The writer reads the reader's word when the room it last saw is too small; here it
        // saw none (its cached reader position is one no writer can be behind).
        e.tail_seen.store(u64::MAX, Ordering::Relaxed);
        let err = e.write_all(&[&[1u8; 100]], dl(), "room").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Protocol, "{err}");
    }
}

#[test]
fn shm_2_valid_indices_within_capacity_still_deliver_the_bytes() {
    // The check refuses only what is impossible: a full ring that wraps reads back intact.
    let (e, _live) = end(CAP);
    let c = e.map.ctrl(e.rx());
    let start = 7 * CAP as u64 + 12_345; // the ring turned over 7 times, data wraps its end
    c.head.store(start, Ordering::SeqCst);
    c.tail.store(start, Ordering::SeqCst);
    e.tail.store(start, Ordering::SeqCst);
    let bytes: Vec<u8> = (0..CAP).map(|i| (i * 7 % 251) as u8).collect();
    let data = e.map.data(e.rx());
    for (i, b) in bytes.iter().enumerate() {
        // SAFETY: index modulo the capacity lies inside the data area.
        unsafe { *data.add((start.wrapping_add(i as u64) % CAP as u64) as usize) = *b };
    }
    c.head
        .store(start.wrapping_add(CAP as u64), Ordering::SeqCst);
    let mut got = vec![0u8; CAP];
    e.read_exact(&mut got, dl(), "a full ring").unwrap();
    assert_eq!(got, bytes);
}

#[test]
fn shm_5_ring_sizes_round_up_to_whole_pages() {
    assert_eq!(Mapping::ring_bytes(64 << 10), 64 << 10);
    assert_eq!(Mapping::ring_bytes(4_000_000), 4_001_792); // "4MB"
    assert_eq!(Mapping::ring_bytes(65_537), 69_632);
    for cap in [65_537, 1_000_001, 4_000_000] {
        let r = Mapping::ring_bytes(cap);
        assert!(r >= cap && r % 4096 == 0 && r - cap < 4096);
    }
    let (e, _live) = end(Mapping::ring_bytes(100_001));
    assert_eq!(e.map.ctrl(1) as *const Ctrl as usize % 4096, 0);
}

#[test]
fn shm_5_a_capacity_that_misaligns_the_control_words_is_refused() {
    let cap = (64 << 10) + 1;
    let fd = sys::memfd("odd", Mapping::total_len(cap)).unwrap();
    let Err(e) = Mapping::map(fd, cap) else {
        panic!("an odd ring was mapped")
    };
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
    assert!(e.message().contains("multiple of 4096"), "{e}");
}

#[test]
fn shm_6_segment_size_is_sealed_against_shrinking_and_growing() {
    let fd = sys::memfd("sealed", Mapping::total_len(CAP)).unwrap();
    for size in [0, 4096, (4 * CAP) as libc::off_t] {
        // SAFETY: plain syscall on our own fd.
        let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), size) };
        let err = std::io::Error::last_os_error();
        assert_eq!(rc, -1, "resizing to {size} succeeded");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    }
    // SAFETY: plain fcntl; F_SEAL_SEAL forbids removing or adding seals.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE) };
    assert_eq!(rc, -1);
    Mapping::map(fd, CAP).unwrap();
}

#[test]
fn shm_6_unsealed_or_wrongly_sized_segments_are_refused_before_mapping() {
    // SAFETY: plain syscalls; the fd is owned at once.
    let unsealed = unsafe {
        let fd = libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0);
        assert_eq!(
            libc::ftruncate(fd, Mapping::total_len(CAP) as libc::off_t),
            0
        );
        OwnedFd::from_raw_fd(fd)
    };
    let Err(e) = Mapping::map(unsealed, CAP) else {
        panic!("an unsealed segment was mapped")
    };
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
    assert!(e.message().contains("not sealed"), "{e}");
    let big = sys::memfd("big", Mapping::total_len(CAP) + 4096).unwrap();
    let Err(e) = Mapping::map(big, CAP) else {
        panic!("a wrongly sized segment was mapped")
    };
    assert!(e.message().contains("expected"), "{e}");
    // Not a memfd at all (a regular file cannot carry seals the same way).
    let f = std::fs::File::open("/proc/self/exe").unwrap();
    let Err(e) = Mapping::map(f.into(), CAP) else {
        panic!("a regular file was mapped")
    };
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
}

#[test]
fn reads_give_their_room_back_once_per_receive_and_before_any_wait() {
    let (a, b, _live) = two_ends();
    let shared_tail = || b.map.ctrl(b.rx()).tail.load(Ordering::SeqCst);
    a.write_all(&[&[7u8; 100]], dl(), "a frame").unwrap();
    let mut got = [0u8; 60];
    b.read_exact(&mut got[..32], dl(), "a header").unwrap();
    b.read_exact(&mut got[32..], dl(), "a descriptor").unwrap();
    // The pieces of one frame are not given back one by one...
    assert_eq!(shared_tail(), 0);
    // ...but when the receive ends (the link's receive lock does this when released).
    b.publish_reads();
    assert_eq!(shared_tail(), 60);
    // A read that must wait gives back what it read first, so a writer waiting for room
    // is never held up by a reader that waits for it in turn.
    let mut rest = [0u8; 41];
    let e = b
        .read_exact(
            &mut rest,
            Deadline::after(Duration::from_millis(20)),
            "the rest",
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert_eq!(shared_tail(), 100);
    // A writer that saw the ring full learns of the room given back.
    let (a, b, _live) = two_ends();
    let ring = vec![1u8; CAP];
    a.write_all(&[&ring], dl(), "a full ring").unwrap();
    assert!(!a.has_room(1));
    let mut first = vec![0u8; 4096];
    b.read_exact(&mut first, dl(), "a page").unwrap();
    b.publish_reads();
    assert!(a.has_room(4096) && !a.has_room(4097));
    a.write_all(&[&[2u8; 4096]], dl(), "a page more").unwrap();
    assert!(!a.has_room(1));
}

/// SHM-8 (SPREAD-1): a writer's publish carries its CPU to the reader, and the reader's given-back
/// room carries the reader's CPU to the writer; an end that never wrote reads as unknown (0).
#[test]
fn shm_8_each_side_publishes_its_cpu_with_its_index() {
    let (a, b, _live) = two_ends();
    assert_eq!(b.writer_cpu(), 0, "nothing written yet");
    std::thread::spawn(move || {
        let cpu = crate::runtime::spread::cpu_word();
        // Pinned where it runs, so the word cannot change under the test.
        assert!(core_affinity::set_for_current(core_affinity::CoreId {
            id: cpu as usize - 1
        }));
        a.write_all(&[b"twelve bytes"], dl(), "a test frame")
            .unwrap();
        assert_eq!(b.writer_cpu(), cpu);
        let mut got = [0u8; 12];
        b.read_exact(&mut got, dl(), "a test frame").unwrap();
        b.publish_reads();
        assert_eq!(&got, b"twelve bytes");
        let room = a.map.ctrl(a.tx).reader_cpu.load(Ordering::Relaxed);
        assert_eq!(room, cpu);
    })
    .join()
    .unwrap();
}
