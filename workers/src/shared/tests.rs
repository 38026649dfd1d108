//! Unit tests of the shared segment: layout, allocation, crash repair, untrusted contents.

use super::*;

fn dl(s: u64) -> Deadline {
    Deadline::after(Duration::from_secs(s))
}

#[test]
fn shq_classes_cover_sizes_with_bounded_slack() {
    for bytes in [1u64, 4096, 4097, 5000, 1 << 20, (64 << 20) + 4096, 3 << 30] {
        let c = class_for(bytes).unwrap();
        assert!(class_size(c) >= bytes);
        assert!(
            class_size(c) as f64 <= (bytes.max(4096) as f64) * 1.26,
            "{bytes}"
        );
    }
}

#[test]
fn shq_4_items_round_trip_and_tensors_view_the_block() {
    let seg = Segment::create("t", 4, 16 << 20).unwrap();
    let t =
        Tensor::from_bytes(parallel_engine::DType::I32, vec![2, 2], (0..16u8).collect()).unwrap();
    let v = Value::List(vec![
        Value::str("a"),
        Value::Tensor(t),
        Value::bytes(*b"xyz"),
    ]);
    seg.push(QUESTIONS, &[v, Value::Int(7)], dl(5)).unwrap();
    assert_eq!(seg.len(QUESTIONS), 2);
    let got = seg.try_pop(QUESTIONS, dl(5)).unwrap().unwrap();
    let Value::List(items) = &got else { panic!() };
    let tt = items[1].as_tensor().unwrap();
    assert!(matches!(
        tt.storage(),
        parallel_engine::value::Storage::Foreign { .. }
    ));
    assert_eq!(tt.bytes().unwrap(), &(0..16u8).collect::<Vec<_>>()[..]);
    let arena = seg.base as usize + seg.arena_off as usize;
    assert!(
        (tt.data_ptr() as usize) > arena,
        "the tensor views the arena"
    );
    assert_eq!(
        seg.try_pop(QUESTIONS, dl(5)).unwrap().unwrap().as_int(),
        Some(7)
    );
    assert!(seg.try_pop(QUESTIONS, dl(5)).unwrap().is_none());
    // The tensor's block returns to the free list once the value is dropped, and is reused.
    let first = tt.data_ptr();
    drop(got);
    let t2 = Tensor::from_bytes(parallel_engine::DType::I32, vec![2, 2], vec![1; 16]).unwrap();
    seg.push(
        ANSWERS,
        &[Value::List(vec![
            Value::str("b"),
            Value::Tensor(t2),
            Value::bytes(*b"q"),
        ])],
        dl(5),
    )
    .unwrap();
    let again = seg.try_pop(ANSWERS, dl(5)).unwrap().unwrap();
    let Value::List(items) = &again else { panic!() };
    assert_eq!(
        items[1].as_tensor().unwrap().data_ptr(),
        first,
        "block reused"
    );
}

#[test]
fn shq_2_back_pressure_on_a_full_arena_times_out() {
    let seg = Segment::create("full", 8, 1 << 20).unwrap();
    let big =
        Tensor::from_bytes(parallel_engine::DType::U8, vec![600_000], vec![0; 600_000]).unwrap();
    seg.push(ANSWERS, &[Value::Tensor(big)], dl(5)).unwrap();
    let held = seg.try_pop(ANSWERS, dl(5)).unwrap().unwrap();
    let big =
        Tensor::from_bytes(parallel_engine::DType::U8, vec![600_000], vec![0; 600_000]).unwrap();
    let e = seg
        .push(
            ANSWERS,
            &[Value::Tensor(big)],
            Deadline::after(Duration::from_millis(200)),
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    drop(held);
    let big =
        Tensor::from_bytes(parallel_engine::DType::U8, vec![600_000], vec![0; 600_000]).unwrap();
    seg.push(ANSWERS, &[Value::Tensor(big)], dl(5)).unwrap();
}

#[test]
fn shq_3_repair_reclaims_blocks_of_dead_holders() {
    let seg = Segment::create("repair", 4, 1 << 20).unwrap();
    let off = {
        let _g = seg.lock(dl(5)).unwrap();
        seg.alloc_locked(100_000).unwrap().unwrap()
    };
    // Pretend a process that no longer exists holds it.
    let b = seg.block(off).unwrap();
    b.holders[0].pid.store(u32::MAX - 1, Ordering::Relaxed);
    let g = seg.lock(dl(5)).unwrap();
    seg.repair(&g);
    let again = seg.alloc_locked(100_000).unwrap().unwrap();
    assert_eq!(again, off, "the dead holder's block was reclaimed");
}

#[test]
fn shq_arena_tensors_travel_by_reference_and_live_while_needed() {
    let seg = Segment::create("byref", 4, 8 << 20).unwrap();
    let mut t = seg
        .empty_tensor(parallel_engine::DType::U8, vec![1 << 20], dl(5))
        .unwrap();
    let ptr = t.data_mut_ptr();
    // SAFETY: the tensor owns 1 MiB at ptr.
    unsafe { std::ptr::write_bytes(ptr, 7, 1 << 20) };
    seg.push(QUESTIONS, &[Value::Tensor(t)], dl(5)).unwrap();
    // The writer dropped its tensor; the queued item keeps the block.
    let got = seg.try_pop(QUESTIONS, dl(5)).unwrap().unwrap();
    let gt = got.as_tensor().unwrap();
    assert_eq!(
        gt.data_ptr(),
        ptr as *const u8,
        "no copy: the reader views the same block"
    );
    assert!(gt.bytes().unwrap().iter().all(|b| *b == 7));
    // Forwarding a received tensor is by reference too.
    seg.push(ANSWERS, &[got], dl(5)).unwrap();
    let back = seg.try_pop(ANSWERS, dl(5)).unwrap().unwrap();
    assert_eq!(back.as_tensor().unwrap().data_ptr(), ptr as *const u8);
    drop(back);
    // Everything released: the 1 MiB block is reused by the next allocation of its class.
    let t2 = seg
        .empty_tensor(parallel_engine::DType::U8, vec![1 << 20], dl(5))
        .unwrap();
    assert_eq!(t2.data_ptr(), ptr as *const u8);
}

#[test]
fn shq_6_corrupt_ring_counters_are_a_protocol_error_not_a_crash() {
    let seg = Segment::create("corrupt", 4, 1 << 20).unwrap();
    seg.push(QUESTIONS, &[Value::Int(1), Value::Int(2)], dl(5))
        .unwrap();
    let h = seg.hdr();
    // A peer moves the tail past the capacity, then behind the head (wrapping), then to the
    // top of the counter range: every reader and writer gets the error, nothing panics.
    for (head, tail) in [(0, 4 + 1), (5, 3), (0, u64::MAX), (7, u64::MAX / 2)] {
        h.dirs[QUESTIONS][0].store(head, Ordering::Relaxed);
        h.dirs[QUESTIONS][1].store(tail, Ordering::Relaxed);
        let e = seg.try_pop(QUESTIONS, dl(5)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
        assert!(e.message().contains("corrupted"), "{e}");
        let e = seg.push(QUESTIONS, &[Value::Int(3)], dl(5)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
        assert!(seg.len(QUESTIONS) <= 4);
    }
    // Counters at the very top of their range but consistent wrap around without overflow.
    h.dirs[QUESTIONS][0].store(u64::MAX, Ordering::Relaxed);
    h.dirs[QUESTIONS][1].store(u64::MAX, Ordering::Relaxed);
    seg.push(QUESTIONS, &[Value::Int(9)], dl(5)).unwrap();
    assert_eq!(h.dirs[QUESTIONS][1].load(Ordering::Relaxed), 0);
    let v = seg.try_pop(QUESTIONS, dl(5)).unwrap().unwrap();
    assert_eq!(v.as_int(), Some(9));
    // The other direction was never touched and still works.
    seg.push(ANSWERS, &[Value::Int(4)], dl(5)).unwrap();
    assert_eq!(
        seg.try_pop(ANSWERS, dl(5)).unwrap().unwrap().as_int(),
        Some(4)
    );
}

#[test]
fn shq_6_segment_size_is_sealed_and_open_refuses_unsealed_memory() {
    let seg = Segment::create("sealed", 4, 1 << 20).unwrap();
    // SAFETY: plain syscalls on our own fd.
    let (shrink, grow) = unsafe {
        (
            libc::ftruncate(seg.fd.as_raw_fd(), 4096),
            libc::ftruncate(seg.fd.as_raw_fd(), 1 << 30),
        )
    };
    assert_eq!(
        (shrink, grow),
        (-1, -1),
        "resizing a sealed segment must fail"
    );
    // A process handing out an unsealed memfd (whatever its header says) is refused.
    // SAFETY: plain syscalls; the fd is owned at once.
    let fd = unsafe {
        let fd = libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0);
        assert_eq!(libc::ftruncate(fd, seg.len as libc::off_t), 0);
        <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
    };
    let e = Segment::open(fd).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
    assert!(e.message().contains("not sealed"), "{e}");
}

#[test]
fn shq_7_garbage_in_the_lock_word_is_a_take_over_or_a_timeout_never_a_crash() {
    let seg = Segment::create("lockword", 4, 1 << 20).unwrap();
    seg.push(QUESTIONS, &[Value::Int(5)], dl(5)).unwrap();
    let w = &seg.hdr().lock;
    // A dead (or made-up) holder: taken over and repaired within a few slices.
    for junk in [u32::MAX - 2, CONTENDED | 4_000_000, 4_194_000] {
        w.store(junk, Ordering::SeqCst);
        let t = std::time::Instant::now();
        drop(seg.lock(dl(5)).unwrap());
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(w.load(Ordering::SeqCst), 0, "unlocked");
    }
    // A live holder that never unlocks (pid 1 exists everywhere): the deadline's timeout.
    w.store(1, Ordering::SeqCst);
    let e = seg
        .try_pop(QUESTIONS, Deadline::after(Duration::from_millis(100)))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    w.store(0, Ordering::SeqCst);
    assert_eq!(
        seg.try_pop(QUESTIONS, dl(5)).unwrap().unwrap().as_int(),
        Some(5),
        "the item survived"
    );
}
