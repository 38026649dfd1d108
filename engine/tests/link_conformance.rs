//! The link conformance suite: one set of cases, written once, that every link kind must pass.
//! Over 600 lines on purpose: the suite is one list of cases that every kind instantiates;
//! split across files, a new case could be added to one file and missed by a kind.
//!
//! A kind is a [`Kind`] value: how to make a connected pair of [`Link`]s of that kind in this
//! process, and where its tensors live; the kind a pair must be is what the registry
//! (`link::choose`) picks for it. [`conformance!`] instantiates every case for a kind, as a
//! module of tests named `<kind>::<case>`, and `every_registered_link_kind_runs_the_suite` fails
//! for a kind in `link::kinds()` that the suite does not run: adding a kind (RDMA, say) means
//! implementing `link::Kind`, one more line in `conformance!`, and passing. Cases that need a property only some kinds have (a TCP
//! stream a proxy can cut, a shared ring a test can corrupt) are written per kind below the
//! suite. docs/architecture.md ("Link conformance suite") says what is checked and why.
//!
//! Kinds: `tcp` (a TCP stream), `shm` (shared-memory rings over a TCP liveness socket, large
//! segments by cross-memory attach), `cuda_ipc` (the shm link carrying CUDA tensors of the
//! simulated device, feature `cuda-sim`: large ones by CUDA IPC, small ones staged through the
//! ring). `PARALLEL_SHM=0` is the operator's off switch for shared memory: under it the shm
//! kinds check that it is honoured (their pairs are TCP) and run the cases over TCP.
//!
//! Invariants checked (defined in engine/src/link/mod.rs and link/shm/):
//! - LINK-1: a timeout before the first byte, or `out` tensors that do not match, leave the link
//!   usable; the refused payload is drained and the next message arrives intact.
//! - LINK-2: a failure inside a frame (a send or receive that times out half way, bytes that are
//!   no frame, a stream cut short) is an error on that link and poisons it: never a wrong or
//!   partial message, never a later desynchronized one.
//! - LINK-3: a peer killed in the middle of a message is a `PeerLost` error within a bound.
//! - SCOPE-4: a scope's operations of one direction on one link keep their starting order.
//! - SCOPE-1: a completion scope returns only after its operations ended; borrowed segments and
//!   buffers arrive intact.
//! - SHM-2: ring indices and frame lengths corrupted in the shared segment are an error on that
//!   link, never an out-of-bounds access.
//!
//! Every wait is bounded; the suite runs under every `PARALLEL_IO` x `PARALLEL_SHM` combination
//! (scripts/test.sh), in about 10-15 s for all kinds on 2 cores.
//!
//! Over 600 lines on purpose: the suite, the kinds and their fault injectors are one contract, read
//! (and changed by a new kind) together.

#[path = "common/pattern.rs"]
mod pattern;

use parallel_engine::config::config;
use parallel_engine::cuda::{self, DeviceAlloc, Mem};
use parallel_engine::link::{self, End, Link, Policy, handshake};
use parallel_engine::runtime::Deadline;
use parallel_engine::wire::{self, FrameKind, HEADER_LEN, Limits};
use parallel_engine::{DType, Device, Error, ErrorKind, Key, LinkKind, Tensor, Value};
use pattern::pattern;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
/// How soon a failure (dead peer, corrupt frame, cut stream) must be reported.
const PROMPT: Duration = Duration::from_secs(5);
/// The deadline of transfers that must succeed (generous: a loaded 2-core machine).
const LONG: Duration = Duration::from_secs(60);
/// Huge messages hold hundreds of MiB at both ends: one at a time in this process.
static BIG: Mutex<()> = Mutex::new(());
/// Pairs are made (and links dropped) one at a time, so a test can tell which shared segment
/// is its own.
static MAKING: Mutex<()> = Mutex::new(());

fn dl(d: Duration) -> Deadline {
    Deadline::after(d)
}

fn lock(m: &Mutex<()>) -> std::sync::MutexGuard<'_, ()> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---- kinds -------------------------------------------------------------------------------------

/// A link kind under test: how to make a connected pair, and where its tensors live.
#[derive(Debug, Clone, Copy)]
struct Kind {
    name: &'static str,
    /// Ask for a shared-memory link (granted when `PARALLEL_SHM` allows it).
    shm: bool,
    /// Tensors are CUDA tensors of the simulated device (CUDA IPC on a shm link).
    cuda: bool,
}

const TCP: Kind = Kind {
    name: "tcp",
    shm: false,
    cuda: false,
};
const SHM: Kind = Kind {
    name: "shm",
    shm: true,
    cuda: false,
};
const CUDA_IPC: Kind = Kind {
    name: "cuda_ipc",
    shm: true,
    cuda: true,
};

/// Two connected ends: `a` connected, `b` accepted.
struct Pair {
    a: Arc<Link>,
    b: Arc<Link>,
    /// The shared segment of a shm pair, as /proc/self/fd/N (for the tampering cases).
    memfd: Option<String>,
    /// Taken when the pair is dropped, released after both links closed their descriptors.
    dropping: Option<std::sync::MutexGuard<'static, ()>>,
}

impl Drop for Pair {
    fn drop(&mut self) {
        // No descriptor closes while another test tells its new segment from the others.
        self.dropping = Some(lock(&MAKING));
    }
}

impl Kind {
    /// The kind the registry chooses for this kind's pairs (two ends of this host; SHM=0 keeps
    /// everything on TCP): the suite runs each kind as the registry would pick it.
    fn chosen(self) -> LinkKind {
        let end = End {
            host_id: "this host",
            gpus: self.cuda,
        };
        let policy = Policy {
            shm: self.shm && config().shm,
            cuda_ipc: config().cuda && config().cuda_ipc,
        };
        link::choose(&end, &end, &policy, 64 * MIB as u64)
    }

    /// The kind of link this kind's pairs must be: the registry's choice, CUDA IPC riding a
    /// shared-memory link.
    fn link_kind(self) -> LinkKind {
        match self.chosen() {
            LinkKind::CudaIpc => LinkKind::Shm,
            k => k,
        }
    }

    /// A connected pair of this kind, in this process.
    fn pair(self) -> Pair {
        let (listener, addr) = handshake::listen("127.0.0.1", 0).unwrap();
        self.pair_through(&listener, addr.port())
    }

    /// A pair whose connecting end dials `port` (the listener's, or a proxy's in front of it).
    fn pair_through(self, listener: &std::os::fd::OwnedFd, port: u16) -> Pair {
        cuda::use_simulator();
        let _making = lock(&MAKING);
        let before = ring_memfds();
        let shm = self.shm;
        let a = std::thread::spawn(move || {
            handshake::connect_with("127.0.0.1", port, Duration::from_secs(20), shm)
        });
        let b = accept_one(listener);
        let a = a.join().unwrap().unwrap();
        let memfd = ring_memfds().into_iter().find(|f| !before.contains(f));
        for end in [&a, &b] {
            assert_eq!(end.kind(), self.link_kind(), "{} pair: {end:?}", self.name);
            // CUDA IPC rides a shm link between two ends with (simulated) CUDA (HS-3).
            assert_eq!(
                end.cuda_ipc(),
                self.link_kind() == LinkKind::Shm && config().cuda && config().cuda_ipc,
                "{end:?}"
            );
        }
        Pair {
            a: Arc::new(a),
            b: Arc::new(b),
            memfd,
            dropping: None,
        }
    }

    /// A tensor of this kind's device holding `bytes`.
    fn tensor(self, dtype: DType, shape: Vec<usize>, bytes: &[u8]) -> Tensor {
        if !self.cuda {
            return Tensor::from_slice(dtype, shape, bytes).unwrap();
        }
        cuda::use_simulator();
        let a = Arc::new(DeviceAlloc::new(0, bytes.len() + 64).unwrap());
        if !bytes.is_empty() {
            // SAFETY: the allocation holds bytes.len() + 64 bytes; the source is a live slice.
            unsafe {
                cuda::copy_sync(
                    0,
                    Mem::Dev(a.ptr),
                    Mem::Host(bytes.as_ptr() as *mut u8),
                    bytes.len(),
                )
            }
            .unwrap();
        }
        let ptr = a.ptr as *mut u8;
        // SAFETY: the tensor covers the first bytes.len() bytes of `a`, which it keeps alive.
        unsafe { Tensor::from_raw(dtype, shape, None, Device::Cuda(0), ptr, bytes.len(), a) }
    }

    fn u8s(self, bytes: &[u8]) -> Tensor {
        self.tensor(DType::U8, vec![bytes.len()], bytes)
    }

    /// A zero-filled tensor of this kind's device (a receive's `out`).
    fn zeros(self, dtype: DType, shape: Vec<usize>) -> Tensor {
        let n = shape.iter().product::<usize>() * dtype.itemsize();
        self.tensor(dtype, shape, &vec![0u8; n])
    }
}

/// Where a tensor of any device holds its bytes, read back to the host.
fn read(t: &Tensor) -> Vec<u8> {
    match t.device() {
        Device::Cpu => t.bytes().expect("contiguous").to_vec(),
        Device::Cuda(d) => {
            let mut v = vec![0u8; t.nbytes()];
            if !v.is_empty() {
                // SAFETY: the tensor's contiguous bytes, into a buffer of the same size.
                unsafe {
                    cuda::copy_sync(
                        d,
                        Mem::Host(v.as_mut_ptr()),
                        Mem::Dev(t.data_ptr() as u64),
                        v.len(),
                    )
                }
                .unwrap();
            }
            v
        }
    }
}

fn accept_one(listener: &std::os::fd::OwnedFd) -> Link {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((fd, addr)) = handshake::try_accept(listener.as_raw_fd()).unwrap() {
            return handshake::accept(fd, addr, 1).unwrap().link;
        }
        assert!(Instant::now() < until, "no connection within 20 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// This process's shared-memory ring segments, as /proc/self/fd paths.
fn ring_memfds() -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if let Ok(t) = std::fs::read_link(e.path())
            && t.to_string_lossy().starts_with("/memfd:parallel-ring")
        {
            out.push(e.path().to_string_lossy().into_owned());
        }
    }
    out
}

/// `pattern(n)` made distinct per `seed` (so a message delivered in another's place is caught).
fn seeded(n: usize, seed: u64) -> Vec<u8> {
    let mut v = pattern(n);
    let s = seed.to_le_bytes();
    for (i, b) in v.iter_mut().take(4096).enumerate() {
        *b ^= s[i % 8].wrapping_add(i as u8);
    }
    if n >= 8 {
        v[n - 8..].copy_from_slice(&s);
    }
    v
}

/// Asserts that `got` is `[Int(tag), tensor with bytes want]`.
fn assert_tagged(got: &Value, tag: i64, want: &[u8]) {
    let Value::List(items) = got else {
        panic!("expected [tag, tensor], got {got:?}")
    };
    assert_eq!(items.len(), 2, "{got:?}");
    assert_eq!(items[0].as_int(), Some(tag), "messages out of order");
    let t = items[1].as_tensor().expect("a tensor");
    assert_eq!(t.nbytes(), want.len(), "message {tag}: size");
    assert!(read(t) == want, "message {tag}: bytes differ");
}

fn tagged(k: Kind, tag: i64, bytes: &[u8]) -> Value {
    Value::List(vec![Value::Int(tag), Value::Tensor(k.u8s(bytes))])
}

/// Sends `v` from `from` (on a thread of its own: a CUDA IPC send waits for the receiver) while
/// `to` receives it into `out`.
fn exchange(from: &Link, to: &Link, v: Value, out: &mut [Tensor]) -> Result<Value, Error> {
    std::thread::scope(|s| {
        s.spawn(move || from.send(&v, dl(LONG)).unwrap());
        to.recv(out, dl(LONG))
    })
}

/// An error within `PROMPT`, of one of `kinds`.
fn assert_fails_promptly(r: Result<Value, Error>, started: Instant, kinds: &[ErrorKind]) {
    let took = started.elapsed();
    match r {
        Ok(v) => panic!("expected an error, received {v:?}"),
        Err(e) => {
            assert!(kinds.contains(&e.kind()), "unexpected error kind: {e}");
            assert!(took < PROMPT, "the error took {took:?}: {e}");
        }
    }
}

// ---- the suite -----------------------------------------------------------------------------------

/// Instantiates every case of the suite for one kind.
macro_rules! conformance {
    ($($kind:ident = $k:expr;)*) => {$(
        mod $kind {
            use super::*;
            #[test]
            fn many_messages_arrive_in_order_in_both_directions() {
                cases::ordering($k)
            }
            #[test]
            fn recv_1_messages_of_known_shapes_arrive_exactly_as_sent_whichever_path_took_them() {
                cases::known_shapes($k)
            }
            #[test]
            fn zero_length_values_and_tensors_round_trip() {
                cases::zero_length($k)
            }
            #[test]
            fn a_256_mib_message_arrives_intact_into_a_preallocated_tensor() {
                cases::huge($k)
            }
            #[test]
            fn messages_of_many_sizes_cross_the_ring_wrap_intact() {
                cases::many_sizes($k)
            }
            #[test]
            fn a_frame_larger_than_the_link_buffers_is_read_in_pieces() {
                cases::partial_reads($k)
            }
            #[test]
            fn link_1_recv_timeout_with_nothing_sent_leaves_the_link_usable() {
                cases::recv_timeout($k)
            }
            #[test]
            fn link_2_send_timeout_half_way_poisons_the_link_and_the_peer_gets_no_message() {
                cases::send_timeout($k)
            }
            #[test]
            fn link_2_a_send_that_gave_up_is_never_delivered_after_its_buffer_is_reused() {
                cases::abandoned_send($k)
            }
            #[test]
            fn link_3_peer_killed_mid_message_is_peer_lost_not_a_hang() {
                cases::peer_death($k, concat!(stringify!($kind), "::link_3_peer_killed_mid_message_is_peer_lost_not_a_hang"))
            }
            #[test]
            fn concurrent_senders_keep_every_message_intact_and_per_thread_order() {
                cases::concurrent_senders($k)
            }
            #[test]
            fn link_1_recv_into_out_matching_fills_and_mismatching_keeps_the_link() {
                cases::recv_into_out($k)
            }
            #[test]
            fn scope_1_borrowed_segments_are_sent_and_received_into_borrowed_buffers() {
                cases::scope_round_trip($k)
            }
            #[test]
            fn scope_1_a_scope_returns_only_after_its_pending_receive_ended_with_an_error() {
                cases::scope_waits($k)
            }
            #[test]
            fn scope_4_sends_and_receives_of_one_link_keep_the_order_they_were_started_in() {
                cases::scope_order($k)
            }
            #[test]
            fn a_control_frame_meeting_a_user_receive_is_refused_and_the_reverse() {
                cases::control_frames($k)
            }
            #[test]
            fn send_now_writes_only_whole_frames_that_fit_and_keeps_the_order() {
                cases::send_now($k)
            }
            #[test]
            fn a_streamed_receive_hands_every_byte_over_in_order_and_refuses_like_recv_into() {
                cases::streamed($k)
            }
        }
    )*
        /// The kinds this suite runs (the registry must list no other).
        const SUITE: &[&str] = &[$(stringify!($kind)),*];
    };
}

conformance! {
    tcp = TCP;
    shm = SHM;
    cuda_ipc = CUDA_IPC;
}

#[test]
fn every_registered_link_kind_runs_the_suite() {
    for k in link::kinds() {
        assert!(
            SUITE.contains(&k.id().name()),
            "link kind {} is registered (link::kinds) but the conformance suite does not run it: add it to conformance! below",
            k.id().name()
        );
    }
    for k in [TCP, SHM, CUDA_IPC] {
        if k.shm && config().shm {
            assert_eq!(k.chosen().name(), k.name, "the registry's choice for {k:?}");
        }
    }
}

mod cases {
    use super::*;

    /// `RecvGuard::recv_streamed` (the ring all-reduce's receive): the bytes of a host or
    /// device tensor reach the sink in order, in pieces no larger than the link's and of whole
    /// elements of the caller's size (all but the last), whatever path they took (stream,
    /// shared ring, cross-memory, staged or CUDA IPC); the check tensor is never written;
    /// a mismatching message reaches no sink and keeps the link (LINK-1); a sink that fails
    /// fails the receive and poisons the link (LINK-2: the frame was half read).
    pub fn streamed(k: Kind) {
        let p = k.pair();
        let recv_by = |n: usize, grain: usize, sink: &mut link::Sink<'_>| {
            let mut check = Tensor::from_slice(DType::U8, vec![n], &vec![0u8; n]).unwrap();
            let r =
                p.b.lock_recv()
                    .recv_streamed(&mut check, grain, dl(LONG), sink);
            assert!(
                read(&check).iter().all(|b| *b == 0),
                "the check tensor was written"
            );
            r
        };
        let recv = |n: usize, sink: &mut link::Sink<'_>| recv_by(n, 1, sink);
        // Sizes under the cross-memory threshold that leave a shared ring's positions at odd
        // offsets, so that elements of later messages straddle its end (the ring is 4 MiB by
        // default: these wrap it several times); element sizes of 1 to 16 bytes, and sizes
        // that are not a multiple of theirs (the last piece is then short).
        let cases = [
            (0usize, 1usize),
            (17, 1),
            (256 << 10, 4),
            (3 * MIB + 17, 1),
            (3, 2),
        ]
        .into_iter()
        .chain((0..24).map(|i| (768 * 1024 + 4096 * i + i % 3, [2, 4, 8, 16][i % 4])))
        .chain([(4 * MIB, 16), (5 * MIB + 4, 4)]);
        for (n, grain) in cases {
            let x = seeded(n, n as u64);
            let sender = {
                let (a, t) = (p.a.clone(), k.u8s(&x));
                std::thread::spawn(move || a.send(&Value::Tensor(t), dl(LONG)))
            };
            let mut got = Vec::with_capacity(n);
            recv_by(n, grain, &mut |off, piece| {
                assert_eq!(off, got.len(), "{n} bytes: a piece out of order");
                assert!(piece.len() <= MIB, "{n} bytes: a piece of {}", piece.len());
                assert!(
                    piece.len() % grain == 0 || off + piece.len() == n,
                    "{n} bytes of {grain}-byte elements: a piece of {} at {off}",
                    piece.len()
                );
                got.extend_from_slice(piece);
                Ok(())
            })
            .unwrap();
            sender.join().unwrap().unwrap();
            assert!(got == x, "{n} bytes: the pieces are not the message");
        }
        // An element size no piece size is a multiple of: refused before anything is read.
        let e = recv_by(4, 3, &mut |_, _| {
            panic!("a refused receive reached the sink")
        })
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        // A mismatching message: no sink call, and the link carries on. (Sent from a thread:
        // a send by CUDA IPC returns once the receiver has dealt with it.)
        let sender = {
            let (a, t) = (p.a.clone(), k.u8s(&seeded(10, 3)));
            std::thread::spawn(move || a.send(&Value::Tensor(t), dl(LONG)))
        };
        let e = recv(11, &mut |_, _| panic!("a refused message reached the sink")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
        sender.join().unwrap().unwrap();
        let got = exchange(&p.a, &p.b, Value::Int(5), &mut []).unwrap();
        assert_eq!(got.as_int(), Some(5));
        // A sink that fails: the receive fails with its error, and the link is unusable.
        let x = seeded(2 * MIB, 4);
        let sender = {
            let (a, t) = (p.a.clone(), k.u8s(&x));
            std::thread::spawn(move || a.send(&Value::Tensor(t), dl(PROMPT)))
        };
        let e = recv(x.len(), &mut |_, _| {
            Err(Error::new(
                ErrorKind::Unsupported,
                "test",
                "the sink refuses",
            ))
        })
        .unwrap_err();
        assert!(e.to_string().contains("the sink refuses"), "{e}");
        let _ = sender.join();
        let e = p.b.recv(&mut [], dl(PROMPT)).unwrap_err();
        assert!(
            matches!(e.kind(), ErrorKind::Closed | ErrorKind::PeerLost),
            "a link whose frame was half read must not deliver more: {e}"
        );
    }

    pub fn scope_round_trip(k: Kind) {
        let p = k.pair();
        let (x, y) = (seeded(3 * MIB + 17, 1), seeded(5, 2));
        let (mut gx, mut gy) = (vec![0u8; x.len()], vec![0u8; y.len()]);
        let r = link::scope(dl(LONG), |s| {
            let rx = s.recv_into(&p.b, vec![&mut gx[..], &mut gy[..]]);
            s.send(&p.a, &[&x[..], &y[..]]);
            rx.wait(dl(LONG))
        });
        let v = r.unwrap().unwrap();
        assert!(
            matches!(&v, Value::List(l) if matches!(l[..], [Value::Out(0), Value::Out(1)])),
            "{v:?}"
        );
        assert!(
            gx == x && gy == y,
            "the borrowed buffers hold what was sent"
        );
        // The link carries on (ordering after the scope's messages).
        let got = exchange(&p.a, &p.b, Value::Int(7), &mut []).unwrap();
        assert_eq!(got.as_int(), Some(7));
    }

    pub fn scope_order(k: Kind) {
        let p = k.pair();
        // Same-sized messages: a reordering would swap them silently (SCOPE-4).
        let sent: Vec<Vec<u8>> = (0..8u64).map(|i| seeded(64 * 1024, 10 + i)).collect();
        let mut got: Vec<Vec<u8>> = (0..8).map(|_| vec![0u8; 64 * 1024]).collect();
        link::scope(dl(LONG), |s| {
            for g in got.iter_mut() {
                s.recv_into(&p.b, vec![&mut g[..]]);
            }
            for x in &sent {
                s.send(&p.a, &[&x[..]]);
            }
        })
        .unwrap();
        for (i, (g, x)) in got.iter().zip(&sent).enumerate() {
            assert!(g == x, "receive {i} of the scope holds another message");
        }
    }

    pub fn scope_waits(k: Kind) {
        let p = k.pair();
        let mut buf = vec![0u8; 64];
        let started = Instant::now();
        // Nothing is sent: the receive ends at the scope's deadline, and the scope reports it.
        let r = link::scope(dl(Duration::from_millis(300)), |s| {
            s.recv_into(&p.b, vec![&mut buf[..]]);
        });
        let e = r.expect_err("a receive that timed out is the scope's error");
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        assert!(started.elapsed() < PROMPT, "took {:?}", started.elapsed());
        // The buffer is ours again, untouched; the link is usable (LINK-1) or closed by the
        // scope (SCOPE-2), never left with a receive writing into freed memory.
        assert!(buf.iter().all(|b| *b == 0));
        drop(buf);
        if !p.b.is_closed() {
            let got = exchange(&p.a, &p.b, Value::Int(8), &mut []).unwrap();
            assert_eq!(got.as_int(), Some(8));
        }
    }

    /// `Link::send_now` (SEND-3 of the collectives): it writes host messages while the link can
    /// take the whole frame without waiting (a shared-memory ring's room; half a TCP socket's
    /// send buffer) and then refuses, writing nothing; device tensors always refuse. What it
    /// sent and what is sent after it the usual way arrive intact and in order.
    pub fn send_now(k: Kind) {
        let p = k.pair();
        const SIZE: usize = 300 << 10; // under the cross-memory threshold: through the ring
        let mut now = 0i64;
        let refused = loop {
            let v = tagged(k, now, &seeded(SIZE, now as u64));
            if !p.a.send_now(&v).unwrap() {
                break v;
            }
            now += 1;
            assert!(now < 1000, "send_now never ran out of room");
        };
        let host_shm = k.link_kind() == LinkKind::Shm && !k.cuda;
        let host_tcp = k.link_kind() == LinkKind::Tcp && !k.cuda;
        if host_tcp {
            // Nobody reads meanwhile: what it wrote sits in the two ends' socket buffers, so it
            // never wrote more than the kernel lets them hold (it did not wait: it returned).
            let max = |f: &str| {
                std::fs::read_to_string(f)
                    .ok()
                    .and_then(|s| s.split_whitespace().nth(2)?.parse::<usize>().ok())
                    .unwrap_or(usize::MAX / 4)
            };
            let held = max("/proc/sys/net/ipv4/tcp_wmem") + max("/proc/sys/net/ipv4/tcp_rmem");
            assert!(
                (now as usize) * SIZE <= held,
                "{now} frames of {SIZE} bytes exceed the socket buffers ({held} bytes)"
            );
        } else if host_shm {
            let ring = config().shm_ring;
            assert!(now >= 2, "a {} KiB ring took only {now} frames", ring >> 10);
            assert!(
                (now as usize) * SIZE <= ring,
                "{now} frames of {SIZE} bytes exceed the ring"
            );
        } else {
            assert_eq!(
                now,
                0,
                "send_now wrote on a {} link ({} kind)",
                k.link_kind().name(),
                k.name
            );
        }
        // Nothing of the refused frame was written: it follows whole, sent the usual way.
        std::thread::scope(|s| {
            let a = &p.a;
            s.spawn(move || a.send(&refused, dl(LONG)).unwrap());
            for i in 0..=now {
                let got = p.b.recv(&mut [], dl(LONG)).unwrap();
                assert_tagged(&got, i, &seeded(SIZE, i as u64));
            }
        });
        assert_eq!(p.a.stats().msgs_sent, now as u64 + 1);
    }

    /// A collective's control message (FrameKind::Control) is taken only by `recv_control`:
    /// a user receive meeting one fails with a Protocol error naming both kinds, and so does a
    /// control receive meeting a user message; neither is delivered.
    pub fn control_frames(k: Kind) {
        let ctrl = || {
            Value::List(vec![
                Value::bytes(b"PCTL".to_vec()),
                Value::Tensor(k.u8s(&[1, 2])),
            ])
        };
        // The expected kind arrives intact.
        let p = k.pair();
        std::thread::scope(|s| {
            let (a, v) = (&p.a, ctrl());
            s.spawn(move || a.send_control(&v, dl(LONG)).unwrap());
            let got = p.b.recv_control(dl(LONG)).unwrap();
            let Value::List(items) = &got else {
                panic!("{got:?}")
            };
            assert_eq!(items.len(), 2);
        });
        // A control frame where a user message is expected, after a user message of the
        // same shape (RECV-1 remembers it: the kind still decides).
        let got = exchange(&p.a, &p.b, ctrl(), &mut []).unwrap();
        assert!(
            matches!(&got, Value::List(items) if items.len() == 2),
            "{got:?}"
        );
        let v = ctrl();
        let a = p.a.clone();
        let t = std::thread::spawn(move || a.send_control(&v, dl(LONG)));
        let e =
            p.b.recv(&mut [], dl(LONG))
                .expect_err("a control frame delivered as a message");
        let _ = t.join();
        assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("collective control message") && msg.contains("user message"),
            "{msg}"
        );
        // A user message where a control message is expected, after a control message of the
        // same shape.
        let p = k.pair();
        std::thread::scope(|s| {
            let a = &p.a;
            s.spawn(move || a.send_control(&Value::Int(7), dl(LONG)).unwrap());
            assert_eq!(p.b.recv_control(dl(LONG)).unwrap().as_int(), Some(7));
        });
        let a = p.a.clone();
        let t = std::thread::spawn(move || a.send(&Value::Int(7), dl(LONG)));
        let e =
            p.b.recv_control(dl(LONG))
                .expect_err("a user message taken as control");
        let _ = t.join();
        assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
        assert!(
            e.to_string()
                .contains("user message where a collective control message"),
            "{e}"
        );
    }

    pub fn ordering(k: Kind) {
        let p = k.pair();
        const N: i64 = 1500;
        std::thread::scope(|s| {
            for (from, to) in [(&p.a, &p.b), (&p.b, &p.a)] {
                s.spawn(move || {
                    for i in 0..N {
                        // Every 50th message carries a tensor, so sizes and paths interleave.
                        let v = if i % 50 == 0 {
                            tagged(k, i, &seeded(1000 + i as usize, i as u64))
                        } else {
                            Value::Int(i)
                        };
                        from.send(&v, dl(LONG)).unwrap();
                    }
                });
                s.spawn(move || {
                    for i in 0..N {
                        let got = to.recv(&mut [], dl(LONG)).unwrap();
                        if i % 50 == 0 {
                            assert_tagged(&got, i, &seeded(1000 + i as usize, i as u64));
                        } else {
                            assert_eq!(got.as_int(), Some(i), "message {i} out of order");
                        }
                    }
                });
            }
        });
        assert_eq!(p.a.stats().msgs_sent, N as u64);
        assert_eq!(p.b.stats().msgs_recv, N as u64);
    }

    /// RECV-1: messages of eight shapes (more than a link remembers), in turns and then in runs,
    /// with new contents each time, both ways at once, some across the shared ring's end: each
    /// arrives in order exactly as sent (floats to the bit, tensors byte for byte), whichever
    /// path took it, and the counters count every message and byte.
    pub fn known_shapes(k: Kind) {
        let p = k.pair();
        const N: u64 = 1000;
        let make = |i: u64| -> Value {
            let floats = [0.0, -0.0, f64::NAN, 1.5, -f64::INFINITY];
            let f = floats[(i % 5) as usize];
            let shape = if i < 400 { i % 8 } else { (i / 11) % 8 };
            match shape {
                0 => Value::bytes(seeded(8, i)),
                1 => Value::List(vec![Value::Tensor(k.u8s(&seeded(64, i))), Value::Float(f)]),
                2 => Value::Float(f),
                3 => Value::Dict(vec![
                    (Key::Str("f".into()), Value::Float(f)),
                    (Key::Str("b".into()), Value::bytes(seeded(3000, i))),
                ]),
                // A new descriptor every time (the integer is in it).
                4 => Value::Int(i as i64),
                5 => Value::Tuple(vec![
                    Value::None,
                    Value::Bool(i % 2 == 0),
                    Value::bytes(seeded(17, i)),
                ]),
                6 => Value::bytes(seeded(60_000, i)),
                _ => Value::List(vec![
                    Value::Tensor(k.tensor(DType::F64, vec![2, 3], &seeded(48, i))),
                    Value::str("t"),
                ]),
            }
        };
        std::thread::scope(|s| {
            for (from, to) in [(&p.a, &p.b), (&p.b, &p.a)] {
                let make = &make;
                s.spawn(move || {
                    for i in 0..N {
                        from.send(&make(i), dl(LONG)).unwrap();
                    }
                });
                s.spawn(move || {
                    for i in 0..N {
                        let got = to.recv(&mut [], dl(LONG)).unwrap();
                        assert_same(&make(i), &got);
                    }
                });
            }
        });
        for (x, y) in [(&p.a, &p.b), (&p.b, &p.a)] {
            assert_eq!(y.stats().msgs_recv, N);
            assert_eq!(y.stats().bytes_recv, x.stats().bytes_sent);
        }
    }

    pub fn zero_length(k: Kind) {
        let p = k.pair();
        let make = |i: usize| match i {
            0 => Value::bytes(Vec::new()),
            1 => Value::str(""),
            2 => Value::List(Vec::new()),
            3 => Value::Dict(Vec::new()),
            4 => Value::Tensor(k.tensor(DType::F32, vec![0], &[])),
            5 => Value::Tensor(k.tensor(DType::I64, vec![3, 0, 2], &[])),
            _ => Value::List(vec![
                Value::Tensor(k.u8s(&[])),
                Value::bytes(vec![1u8]),
                Value::Tensor(k.u8s(&[7])),
                Value::bytes(Vec::new()),
            ]),
        };
        for i in 0..7 {
            let got = exchange(&p.a, &p.b, make(i), &mut []).unwrap();
            assert_same(&make(i), &got);
        }
    }

    /// Structural equality, tensors compared by bytes wherever they live.
    fn assert_same(want: &Value, got: &Value) {
        match (want, got) {
            (Value::List(x), Value::List(y)) => {
                assert_eq!(x.len(), y.len(), "{got:?}");
                x.iter().zip(y).for_each(|(a, b)| assert_same(a, b));
            }
            (Value::Tensor(x), Value::Tensor(y)) => {
                assert_eq!((x.dtype(), x.shape()), (y.dtype(), y.shape()));
                assert!(read(x) == read(y), "tensor bytes differ");
            }
            _ => assert!(want.same(got), "sent {want:?}, received {got:?}"),
        }
    }

    pub fn huge(k: Kind) {
        let _big = lock(&BIG);
        let n = 256 * MIB;
        let p = k.pair();
        let mut out = [k.zeros(DType::U8, vec![n])];
        std::thread::scope(|s| {
            s.spawn(|| {
                let v = Value::List(vec![Value::str("huge"), Value::Tensor(k.u8s(&pattern(n)))]);
                p.a.send(&v, dl(LONG)).unwrap()
            });
            let got = p.b.recv(&mut out, dl(LONG)).unwrap();
            let Value::List(items) = &got else {
                panic!("{got:?}")
            };
            assert_eq!(items[0].as_str(), Some("huge"));
            assert!(matches!(items[1], Value::Out(0)), "{got:?}");
        });
        let (got, want) = (read(&out[0]), pattern(n));
        if got != want {
            let at = got.iter().zip(&want).position(|(x, y)| x != y);
            panic!("256 MiB message: bytes differ first at {at:?}");
        }
        assert!(p.b.stats().bytes_recv >= n as u64);
    }

    /// Sizes that straddle every boundary: pages, the cross-memory threshold, the ring; prime
    /// sizes below the threshold wrap the ring at a different offset each time.
    pub fn many_sizes(k: Kind) {
        let p = k.pair();
        // The ring, capped so a configured 1 GiB ring does not make this a 2 GiB message.
        let ring = config().shm_ring.min(16 * MIB);
        let cma = config().shm_cma_threshold as usize;
        let mut sizes = vec![
            0, 1, 2, 3, 7, 8, 31, 32, 33, 4095, 4096, 4097, 65_521, 65_536,
        ];
        sizes.extend([cma - 1, cma, cma + 1, ring - 1, ring + 1, 2 * ring + 13]);
        for i in 0..40 {
            sizes.push([999_983, 524_287, 131_071, 786_433][i % 4] - i);
        }
        let n = sizes.len();
        std::thread::scope(|s| {
            let (sizes, a) = (&sizes, &p.a);
            s.spawn(move || {
                for (i, &sz) in sizes.iter().enumerate() {
                    a.send(&tagged(k, i as i64, &seeded(sz, i as u64)), dl(LONG))
                        .unwrap();
                }
            });
            for (i, &sz) in sizes.iter().enumerate() {
                let got = p.b.recv(&mut [], dl(LONG)).unwrap();
                assert_tagged(&got, i as i64, &seeded(sz, i as u64));
            }
        });
        assert_eq!(p.b.stats().msgs_recv, n as u64);
    }

    /// 24 segments of 700,001 bytes (below the cross-memory threshold, so they go through the
    /// stream): 16 MiB, more than the ring or the socket buffers hold; the receiver is waiting
    /// first, and takes the frame as it arrives.
    pub fn partial_reads(k: Kind) {
        let p = k.pair();
        let parts: Vec<Vec<u8>> = (0..24).map(|i| seeded(700_001, i)).collect();
        let v = Value::List(parts.iter().map(|b| Value::Tensor(k.u8s(b))).collect());
        std::thread::scope(|s| {
            let r = s.spawn(|| p.b.recv(&mut [], dl(LONG)).unwrap());
            std::thread::sleep(Duration::from_millis(50));
            p.a.send(&v, dl(LONG)).unwrap();
            let got = r.join().unwrap();
            let Value::List(items) = &got else {
                panic!("{got:?}")
            };
            assert_eq!(items.len(), parts.len());
            for (i, (t, want)) in items.iter().zip(&parts).enumerate() {
                assert!(read(t.as_tensor().unwrap()) == *want, "part {i} differs");
            }
        });
    }

    pub fn recv_timeout(k: Kind) {
        let p = k.pair();
        for wait in [Duration::ZERO, Duration::from_millis(300)] {
            let t0 = Instant::now();
            let e = p.b.recv(&mut [], dl(wait)).unwrap_err();
            let took = t0.elapsed();
            assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
            assert!(
                took >= wait && took < wait + PROMPT,
                "{took:?} for {wait:?}"
            );
            assert!(!p.b.is_broken(), "a clean timeout broke the link: {e}");
        }
        std::thread::scope(|s| {
            s.spawn(|| {
                let v = tagged(k, 5, &seeded(3 * MIB, 5));
                p.a.send(&v, dl(LONG)).unwrap()
            });
            assert_tagged(
                &p.b.recv(&mut [], dl(LONG)).unwrap(),
                5,
                &seeded(3 * MIB, 5),
            );
        });
        p.b.send(&Value::str("back"), dl(LONG)).unwrap();
        assert_eq!(p.a.recv(&mut [], dl(LONG)).unwrap().as_str(), Some("back"));
    }

    pub fn send_timeout(k: Kind) {
        let p = k.pair();
        // More than the ring and the socket buffers hold, and nobody reading.
        let parts: Vec<Value> = (0..24)
            .map(|i| Value::Tensor(k.u8s(&seeded(700_001, i))))
            .collect();
        let v = Value::List(parts);
        let t0 = Instant::now();
        let e = p.a.send(&v, dl(Duration::from_millis(300))).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        assert!(t0.elapsed() < PROMPT, "{:?}", t0.elapsed());
        assert!(
            p.a.is_broken(),
            "a send that stopped half way left the link usable"
        );
        let e = p.a.send(&Value::Int(1), dl(PROMPT)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
        // The peer sees an error where the frame breaks off, not half a message.
        let t0 = Instant::now();
        let r = p.b.recv(&mut [], dl(LONG));
        assert_fails_promptly(r, t0, &[ErrorKind::PeerLost, ErrorKind::Closed]);
        let t0 = Instant::now();
        let r = p.b.recv(&mut [], dl(LONG));
        assert_fails_promptly(r, t0, &[ErrorKind::PeerLost, ErrorKind::Closed]);
    }

    /// SHM-7: a 64 MiB tensor (the cross-memory or CUDA IPC path where the kind has one) that
    /// nobody receives: the send times out, the caller overwrites its buffer as it may, and
    /// only then does the peer receive. It must get an error, never the overwritten bytes.
    pub fn abandoned_send(k: Kind) {
        let _big = lock(&BIG);
        let p = k.pair();
        let n = 64 * MIB;
        let v = Value::Tensor(k.u8s(&pattern(n)));
        let e = p.a.send(&v, dl(Duration::from_millis(300))).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        let Ok(mut t) = v.into_tensor() else {
            unreachable!()
        };
        let junk = vec![0xee_u8; n];
        match t.device() {
            Device::Cpu => {
                // SAFETY: the tensor owns n contiguous bytes; the failed send returned them.
                unsafe { std::ptr::copy_nonoverlapping(junk.as_ptr(), t.data_mut_ptr(), n) }
            }
            // SAFETY: as above, in device memory of n bytes.
            Device::Cuda(d) => unsafe {
                cuda::copy_sync(
                    d,
                    Mem::Dev(t.data_mut_ptr() as u64),
                    Mem::Host(junk.as_ptr() as *mut u8),
                    n,
                )
                .unwrap()
            },
        }
        let t0 = Instant::now();
        let r = p.b.recv(&mut [], dl(LONG));
        if let Ok(got) = &r {
            let bytes = read(got.as_tensor().unwrap());
            let junk = bytes.iter().filter(|&&x| x == 0xee).count();
            panic!(
                "a message the sender gave up on was delivered ({junk} of {n} bytes overwritten)"
            );
        }
        assert_fails_promptly(r, t0, &[ErrorKind::PeerLost, ErrorKind::Closed]);
    }

    /// The other end is this test binary re-run as a child process (`LINK_CONFORMANCE_CHILD` =
    /// port): it connects with this kind and sends a 256 MiB tensor; the parent kills it with
    /// SIGKILL as soon as the frame starts arriving.
    pub fn peer_death(k: Kind, test_name: &str) {
        #[allow(clippy::disallowed_methods)] // the child's role comes from its environment
        if let Ok(port) = std::env::var("LINK_CONFORMANCE_CHILD") {
            cuda::use_simulator();
            let port: u16 = port.parse().unwrap();
            let link = handshake::connect_with("127.0.0.1", port, LONG, k.shm).unwrap();
            let v = Value::Tensor(k.u8s(&vec![0x5a; 256 * MIB]));
            let _ = link.send(&v, dl(LONG));
            std::thread::sleep(LONG);
            return;
        }
        let (listener, addr) = handshake::listen("127.0.0.1", 0).unwrap();
        /// Killed and reaped when dropped, so a failing test leaves no process behind.
        struct Reap(std::process::Child);
        impl Drop for Reap {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let mut child = Reap(
            std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
                .env("LINK_CONFORMANCE_CHILD", addr.port().to_string())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        let pid = child.0.id();
        let b = {
            // The accepted end maps a ring segment: not while another test looks for its own.
            let _making = lock(&MAKING);
            accept_one(&listener)
        };
        assert_eq!(b.kind(), k.link_kind());
        let until = Instant::now() + LONG;
        while !b.ready() {
            assert!(
                Instant::now() < until,
                "the child sent nothing within {LONG:?}"
            );
            if let Some(st) = child.0.try_wait().unwrap() {
                panic!("the child exited ({st}) before sending");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // Dead and reaped before the receive starts: the frame's sender is gone for certain (a
        // receive racing the kill may legitimately copy a frame that was whole in its memory).
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        let t0 = Instant::now();
        let r = b.recv(&mut [], dl(LONG));
        let e = r.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
        assert_fails_promptly(r, t0, &[ErrorKind::PeerLost]);
        if k.link_kind() == LinkKind::Shm {
            assert!(
                e.contains(&format!("pid {pid}")),
                "the error names no pid: {e}"
            );
        }
        // LINK-3: every later call fails too, at once.
        let t0 = Instant::now();
        let r = b.recv(&mut [], dl(LONG));
        assert_fails_promptly(r, t0, &[ErrorKind::PeerLost, ErrorKind::Closed]);
        let e = b.send(&Value::Int(1), dl(LONG)).unwrap_err();
        assert!(
            matches!(e.kind(), ErrorKind::PeerLost | ErrorKind::Closed),
            "{e}"
        );
        let _dropping = lock(&MAKING);
        drop(b);
    }

    pub fn concurrent_senders(k: Kind) {
        let p = k.pair();
        const THREADS: i64 = 4;
        const EACH: i64 = 120;
        let size = |t: i64, i: i64| ((t * 7919 + i * 104_729) % 90_000) as usize;
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let a = &p.a;
                s.spawn(move || {
                    for i in 0..EACH {
                        let bytes = seeded(size(t, i), (t << 32 | i) as u64);
                        let v = Value::List(vec![
                            Value::Int(t),
                            Value::Int(i),
                            Value::Tensor(k.u8s(&bytes)),
                        ]);
                        a.send(&v, dl(LONG)).unwrap();
                    }
                });
            }
            let mut next = [0i64; THREADS as usize];
            for _ in 0..THREADS * EACH {
                let got = p.b.recv(&mut [], dl(LONG)).unwrap();
                let Value::List(items) = &got else {
                    panic!("{got:?}")
                };
                let t = items[0].as_int().unwrap();
                let i = items[1].as_int().unwrap();
                assert_eq!(i, next[t as usize], "thread {t}'s messages out of order");
                next[t as usize] += 1;
                let want = seeded(size(t, i), (t << 32 | i) as u64);
                assert!(read(items[2].as_tensor().unwrap()) == want, "({t}, {i})");
            }
            assert_eq!(next, [EACH; THREADS as usize]);
        });
    }

    pub fn recv_into_out(k: Kind) {
        let p = k.pair();
        let f = seeded(4 * 5 * 4, 1);
        let big = seeded(8 * MIB, 2); // large: cross-memory attach or CUDA IPC where they apply
        let msg = || {
            Value::Dict(vec![
                (
                    Key::Str("w".into()),
                    Value::Tensor(k.tensor(DType::F32, vec![4, 5], &f)),
                ),
                (Key::Str("n".into()), Value::Int(3)),
                (Key::Str("big".into()), Value::Tensor(k.u8s(&big))),
            ])
        };
        let recv_out = |out: &mut [Tensor]| exchange(&p.a, &p.b, msg(), out);
        // Matching: the tensors land in `out`, in order.
        let mut out = [
            k.zeros(DType::F32, vec![4, 5]),
            k.zeros(DType::U8, vec![8 * MIB]),
        ];
        let got = recv_out(&mut out).unwrap();
        assert!(matches!(got.get("w"), Some(Value::Out(0))), "{got:?}");
        assert!(matches!(got.get("big"), Some(Value::Out(1))), "{got:?}");
        assert_eq!(got.get("n").and_then(Value::as_int), Some(3));
        assert!(read(&out[0]) == f && read(&out[1]) == big);
        // Mismatching shape, dtype, count: a Mismatch error, the out tensors untouched, and the
        // link still usable (the refused payload was drained).
        let wrong: Vec<Vec<Tensor>> = vec![
            vec![
                k.zeros(DType::F32, vec![5, 4]),
                k.zeros(DType::U8, vec![8 * MIB]),
            ],
            vec![
                k.zeros(DType::I32, vec![4, 5]),
                k.zeros(DType::U8, vec![8 * MIB]),
            ],
            vec![
                k.zeros(DType::F32, vec![4, 5]),
                k.zeros(DType::U8, vec![8 * MIB - 1]),
            ],
            vec![k.zeros(DType::F32, vec![4, 5])],
        ];
        for (i, mut out) in wrong.into_iter().enumerate() {
            let e = recv_out(&mut out).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Mismatch, "case {i}: {e}");
            assert!(e.to_string().contains("still usable"), "{e}");
            assert!(!p.b.is_broken(), "case {i}: {e}");
            assert!(
                out.iter().all(|t| read(t).iter().all(|&x| x == 0)),
                "case {i}"
            );
            let v = tagged(k, i as i64, &seeded(1000, 9));
            let got = exchange(&p.a, &p.b, v, &mut []).unwrap();
            assert_tagged(&got, i as i64, &seeded(1000, 9));
        }
    }
}

// ---- TCP: a proxy that dribbles, stalls, cuts or flips bytes ----------------------------------

/// What the proxy does to the client-to-server bytes once armed, counting from the arming.
#[derive(Debug, Clone, Copy, Default)]
struct Plan {
    /// Forward in pieces of a few bytes, each its own write.
    dribble: bool,
    /// XOR the byte at this offset with the mask.
    flip: Option<(usize, u8)>,
    /// After this many bytes: end the stream (`cut`) or hold the rest back (`stall`).
    stop_at: Option<usize>,
    cut: bool,
}

/// A TCP proxy in front of a listener, for one connection.
struct Proxy {
    port: u16,
    plan: Arc<Mutex<Option<Plan>>>,
    done: Arc<AtomicBool>,
}

impl Proxy {
    fn new(target: u16) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let plan: Arc<Mutex<Option<Plan>>> = Arc::default();
        let done: Arc<AtomicBool> = Arc::default();
        let (plan2, done2) = (plan.clone(), done.clone());
        std::thread::spawn(move || {
            let (client, _) = l.accept().unwrap();
            let server = TcpStream::connect(("127.0.0.1", target)).unwrap();
            server.set_nodelay(true).unwrap();
            client.set_nodelay(true).unwrap();
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || pump_back(s2, c2));
            pump(client, server, &plan2, &done2);
        });
        Proxy { port, plan, done }
    }

    fn arm(&self, p: Plan) {
        *self.plan.lock().unwrap() = Some(p);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
    }
}

/// Server to client, untouched.
fn pump_back(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Client to server, through the plan once armed.
fn pump(mut from: TcpStream, mut to: TcpStream, plan: &Mutex<Option<Plan>>, done: &AtomicBool) {
    let mut buf = vec![0u8; 64 << 10];
    let mut seen = 0usize; // bytes since arming
    from.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    while !done.load(Ordering::SeqCst) {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => break,
        };
        let Some(p) = *plan.lock().unwrap() else {
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            continue;
        };
        let mut chunk = buf[..n].to_vec();
        if let Some((at, mask)) = p.flip
            && at >= seen
            && at < seen + n
        {
            chunk[at - seen] ^= mask;
        }
        if let Some(stop) = p.stop_at
            && seen + n >= stop
        {
            chunk.truncate(stop - seen);
        }
        let ok = if p.dribble {
            chunk.chunks(7).enumerate().all(|(i, c)| {
                if i % 64 == 63 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                to.write_all(c).is_ok()
            })
        } else {
            to.write_all(&chunk).is_ok()
        };
        seen += n;
        if !ok {
            break;
        }
        if p.stop_at.is_some_and(|s| seen >= s) {
            if p.cut {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
            // Stall: hold the connection open, forwarding nothing more, until dropped.
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            return;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// A TCP pair whose a-to-b bytes pass through a proxy.
fn proxied_pair() -> (Pair, Proxy) {
    let (listener, addr) = handshake::listen("127.0.0.1", 0).unwrap();
    let proxy = Proxy::new(addr.port());
    let p = TCP.pair_through(&listener, proxy.port);
    (p, proxy)
}

/// A message, and the length of its frame header + descriptor + payload on the wire.
fn probe_message() -> (Value, usize, usize) {
    let v = Value::Dict(vec![
        (Key::Str("tag".into()), Value::Int(0x1234_5678)),
        (Key::Str("name".into()), Value::str("tamper")),
        (
            Key::Str("t".into()),
            Value::Tensor(Tensor::from_slice(DType::U8, vec![1000], &seeded(1000, 3)).unwrap()),
        ),
    ]);
    let f = wire::encode_frame(FrameKind::Message, 1, &v, &Limits::from_config()).unwrap();
    let desc_len = u32::from_le_bytes(f[8..12].try_into().unwrap()) as usize;
    (v, f.len(), HEADER_LEN + desc_len)
}

mod tcp_faults {
    use super::*;

    #[test]
    fn a_frame_arriving_a_few_bytes_at_a_time_is_received_whole() {
        let (p, proxy) = proxied_pair();
        proxy.arm(Plan {
            dribble: true,
            ..Plan::default()
        });
        for i in 0..3 {
            let v = tagged(TCP, i, &seeded(40_000 + i as usize, i as u64));
            p.a.send(&v, dl(LONG)).unwrap();
            let got = p.b.recv(&mut [], dl(LONG)).unwrap();
            assert_tagged(&got, i, &seeded(40_000 + i as usize, i as u64));
        }
    }

    #[test]
    fn link_2_timeout_inside_a_frame_poisons_the_link() {
        let (p, proxy) = proxied_pair();
        let (v, len, _) = probe_message();
        proxy.arm(Plan {
            stop_at: Some(len / 2),
            ..Plan::default()
        });
        p.a.send(&v, dl(LONG)).unwrap();
        let t0 = Instant::now();
        let e =
            p.b.recv(&mut [], dl(Duration::from_millis(500)))
                .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        assert!(t0.elapsed() < PROMPT);
        assert!(
            p.b.is_broken(),
            "a timeout inside a frame left the link usable"
        );
        let e = p.b.recv(&mut [], dl(PROMPT)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
        assert!(e.to_string().contains("unusable"), "{e}");
    }

    #[test]
    fn link_2_a_stream_cut_anywhere_in_a_frame_is_peer_lost_never_a_message() {
        let (v, len, desc_end) = probe_message();
        for cut in [
            1,
            4,
            16,
            31,
            32,
            33,
            desc_end - 1,
            desc_end,
            desc_end + 1,
            len - 1,
        ] {
            // Primed: the same message went whole first, so its shape is known (RECV-1).
            for primed in [false, true] {
                let (p, proxy) = proxied_pair();
                if primed {
                    p.a.send(&v, dl(LONG)).unwrap();
                    assert!(v.same(&p.b.recv(&mut [], dl(LONG)).unwrap()));
                }
                proxy.arm(Plan {
                    stop_at: Some(cut),
                    cut: true,
                    ..Plan::default()
                });
                p.a.send(&v, dl(LONG)).unwrap();
                let t0 = Instant::now();
                let r = p.b.recv(&mut [], dl(LONG));
                assert!(
                    r.is_err(),
                    "cut at {cut} of {len} (primed {primed}): a message {r:?}"
                );
                assert_fails_promptly(r, t0, &[ErrorKind::PeerLost]);
                let r = p.b.recv(&mut [], dl(PROMPT));
                assert!(r.is_err(), "cut at {cut}: a message after the cut");
            }
        }
    }

    /// Every bit flip in the frame header: an error on the link, or (only where the flip hits a
    /// field the receiver does not act on, the sequence number) the message exactly as sent.
    #[test]
    fn link_2_a_flipped_header_byte_is_an_error_never_a_wrong_message() {
        let (v, len, _) = probe_message();
        for (at, primed) in (0..HEADER_LEN).flat_map(|at| [(at, false), (at, true)]) {
            for mask in [0x01u8, 0x80] {
                let (p, proxy) = proxied_pair();
                // Primed: the same message went whole first, so its shape is known (RECV-1).
                if primed {
                    p.a.send(&v, dl(LONG)).unwrap();
                    assert!(v.same(&p.b.recv(&mut [], dl(LONG)).unwrap()));
                }
                proxy.arm(Plan {
                    flip: Some((at, mask)),
                    stop_at: Some(len),
                    cut: true,
                    ..Plan::default()
                });
                p.a.send(&v, dl(LONG)).unwrap();
                let t0 = Instant::now();
                match p.b.recv(&mut [], dl(LONG)) {
                    Ok(got) => {
                        assert!(
                            at >= 24,
                            "flip {mask:#x} at {at} (primed {primed}) went unnoticed"
                        );
                        assert!(v.same(&got), "flip at {at}: a wrong message {got:?}");
                    }
                    Err(e) => assert!(t0.elapsed() < PROMPT, "at {at}: {e}"),
                }
                assert!(p.b.recv(&mut [], dl(PROMPT)).is_err(), "at {at}");
            }
        }
    }

    /// Bytes flipped in the descriptor or the payload: the frame carries no checksum, so a flip
    /// that keeps the descriptor well formed delivers a wrong message (TCP's own checksum
    /// guards the wire; this guards against a buggy or hostile middlebox or peer).
    #[test]
    #[ignore = "no integrity check on frames: a flipped payload or descriptor value byte is delivered. \
                Needs a per-frame checksum (CRC32C of descriptor + payload, optional, negotiated in the \
                handshake) in the Link-trait redesign (issue #13)"]
    fn a_flipped_descriptor_or_payload_byte_is_an_error_never_a_wrong_message() {
        let (v, len, _) = probe_message();
        for at in (HEADER_LEN..len).step_by(37) {
            let (p, proxy) = proxied_pair();
            proxy.arm(Plan {
                flip: Some((at, 0x10)),
                stop_at: Some(len),
                cut: true,
                ..Plan::default()
            });
            p.a.send(&v, dl(LONG)).unwrap();
            if let Ok(got) = p.b.recv(&mut [], dl(LONG)) {
                assert!(
                    v.same(&got),
                    "flip at {at} of {len}: a wrong message delivered"
                );
            }
        }
    }
}

// ---- shm: a hostile writer of the shared segment -----------------------------------------------

/// The shared segment of a shm pair, mapped again (as a hostile peer would have it).
struct Segment {
    base: *mut u8,
    len: usize,
    cap: usize,
}

impl Segment {
    fn open(path: &str) -> Segment {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let len = f.metadata().unwrap().len() as usize;
        // SAFETY: a fresh shared mapping of the whole (size-sealed) memfd; unmapped on drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Segment {
            base: p as *mut u8,
            len,
            cap: len / 2 - 4096,
        }
    }

    /// The u64 at `off` bytes into ring `r`'s control block (head 0, tail 128).
    fn word(&self, r: usize, off: usize) -> &std::sync::atomic::AtomicU64 {
        assert!(r < 2 && off % 8 == 0 && off < 4096);
        // SAFETY: inside the mapping, 8-byte aligned (page-aligned control blocks).
        unsafe {
            &*(self.base.add(r * (4096 + self.cap) + off) as *const std::sync::atomic::AtomicU64)
        }
    }

    /// The ring that holds unread bytes (the direction a message was just sent in).
    fn busy_ring(&self) -> usize {
        (0..2)
            .find(|&r| {
                self.word(r, 0).load(Ordering::SeqCst) != self.word(r, 128).load(Ordering::SeqCst)
            })
            .expect("a ring with unread bytes")
    }

    /// Reads `out.len()` bytes at `off` bytes into the unread data of ring `r`.
    fn read_unread(&self, r: usize, off: usize, out: &mut [u8]) {
        let tail = self.word(r, 128).load(Ordering::SeqCst) as usize;
        for (i, b) in out.iter_mut().enumerate() {
            let pos = (tail + off + i) % self.cap;
            // SAFETY: inside ring r's data area.
            *b = unsafe { *self.base.add(r * (4096 + self.cap) + 4096 + pos) };
        }
    }

    /// Writes `bytes` at `off` bytes into the unread data of ring `r`.
    fn write_unread(&self, r: usize, off: usize, bytes: &[u8]) {
        let tail = self.word(r, 128).load(Ordering::SeqCst) as usize;
        for (i, b) in bytes.iter().enumerate() {
            let pos = (tail + off + i) % self.cap;
            // SAFETY: inside ring r's data area.
            unsafe { *self.base.add(r * (4096 + self.cap) + 4096 + pos) = *b };
        }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what open mapped.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

mod shm_faults {
    use super::*;

    /// A shm pair and its segment, or None (after checking the pair is TCP) under PARALLEL_SHM=0.
    fn shm_pair() -> Option<(Pair, Segment)> {
        let p = SHM.pair();
        if !config().shm {
            assert_eq!(p.a.kind(), LinkKind::Tcp);
            return None;
        }
        let seg = Segment::open(p.memfd.as_deref().expect("the pair's ring segment"));
        Some((p, seg))
    }

    fn small() -> Value {
        tagged(SHM, 1, &seeded(1000, 1))
    }

    /// After the corruption: an error on this link, promptly, and on every later receive; a
    /// fresh link works.
    fn assert_link_refuses(p: &Pair) {
        let t0 = Instant::now();
        let r = p.b.recv(&mut [], dl(LONG));
        assert_fails_promptly(r, t0, &[ErrorKind::Protocol]);
        assert!(p.b.recv(&mut [], dl(PROMPT)).is_err());
        let q = SHM.pair();
        q.a.send(&small(), dl(LONG)).unwrap();
        assert_tagged(&q.b.recv(&mut [], dl(LONG)).unwrap(), 1, &seeded(1000, 1));
    }

    #[test]
    fn shm_2_a_head_index_beyond_the_ring_is_a_protocol_error() {
        let Some((p, seg)) = shm_pair() else { return };
        p.a.send(&small(), dl(LONG)).unwrap();
        let r = seg.busy_ring();
        let head = seg.word(r, 0).load(Ordering::SeqCst);
        seg.word(r, 0)
            .store(head + seg.cap as u64 + 1, Ordering::SeqCst);
        assert_link_refuses(&p);
    }

    #[test]
    fn shm_2_a_tail_index_ahead_of_the_writer_is_a_protocol_error() {
        let Some((p, seg)) = shm_pair() else { return };
        p.a.send(&small(), dl(LONG)).unwrap();
        let r = seg.busy_ring();
        seg.word(r, 128).store(u64::MAX / 2, Ordering::SeqCst);
        // A writer counts room from the reader position it last read, and reads the shared
        // word again when that room runs short: sends of half a MiB (through the ring, under
        // the cross-memory threshold) get there within a ring's worth, before any wait.
        let piece = Value::bytes(vec![7u8; 512 << 10]);
        let ring_pieces = config().shm_ring / (512 << 10) + 2;
        let e = (0..ring_pieces)
            .find_map(|_| p.a.send(&piece, dl(PROMPT)).err())
            .expect("a send reads the corrupted reader position once its room runs short");
        assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
        assert!(e.to_string().contains("corrupted"), "{e}");
    }

    /// Every bit flip in a frame header standing in the ring: an error, or (the sequence
    /// number, which the receiver does not act on, and path flags the message has no segment
    /// for) the message exactly as sent. The sender
    /// closes after sending, so a header that announces more bytes fails at once.
    #[test]
    fn shm_2_a_flipped_header_byte_in_the_ring_is_an_error_never_a_wrong_message() {
        let (v, _, _) = probe_message();
        for (at, primed) in (0..HEADER_LEN).flat_map(|at| [(at, false), (at, true)]) {
            for mask in [0x01u8, 0x80] {
                let Some((p, seg)) = shm_pair() else { return };
                // Primed: the same message went whole first, so its shape is known (RECV-1).
                if primed {
                    p.a.send(&v, dl(LONG)).unwrap();
                    assert!(v.same(&p.b.recv(&mut [], dl(LONG)).unwrap()));
                }
                p.a.send(&v, dl(LONG)).unwrap();
                let r = seg.busy_ring();
                let mut b = [0u8; 1];
                seg.read_unread(r, at, &mut b);
                seg.write_unread(r, at, &[b[0] ^ mask]);
                p.a.close();
                let t0 = Instant::now();
                match p.b.recv(&mut [], dl(LONG)) {
                    Ok(got) => {
                        // The flags (byte 7) may announce cross-memory or CUDA IPC segments
                        // the message does not have: harmless, as long as it is the message.
                        assert!(
                            at >= 24 || at == 7,
                            "flip {mask:#x} at {at} (primed {primed}) went unnoticed"
                        );
                        assert!(v.same(&got), "flip at {at}: a wrong message {got:?}");
                    }
                    Err(e) => assert!(t0.elapsed() < PROMPT, "at {at}: {e}"),
                }
                assert!(p.b.recv(&mut [], dl(PROMPT)).is_err(), "at {at}");
            }
        }
    }

    #[test]
    fn shm_2_a_frame_length_corrupted_in_the_ring_is_an_error_never_a_message() {
        // payload_len (bytes 16..24 of the header): beyond the limits, one more, one less;
        // desc_len (8..12): beyond the limits, one more.
        let edits: [(usize, Vec<u8>); 5] = [
            (16, u64::MAX.to_le_bytes().to_vec()),
            (16, vec![0xff]),
            (16, vec![0x00]),
            (8, u32::MAX.to_le_bytes().to_vec()),
            (8, vec![0xff]),
        ];
        for ((at, bytes), primed) in edits
            .into_iter()
            .flat_map(|e| [(e.clone(), false), (e, true)])
        {
            let Some((p, seg)) = shm_pair() else { return };
            // Primed: the same message went whole first, so its shape is known (RECV-1).
            if primed {
                p.a.send(&small(), dl(LONG)).unwrap();
                assert_tagged(&p.b.recv(&mut [], dl(LONG)).unwrap(), 1, &seeded(1000, 1));
            }
            p.a.send(&small(), dl(LONG)).unwrap();
            seg.write_unread(seg.busy_ring(), at, &bytes);
            let t0 = Instant::now();
            let r = p.b.recv(&mut [], dl(Duration::from_secs(2)));
            assert!(r.is_err(), "edit at {at}: a message {r:?}");
            assert!(t0.elapsed() < PROMPT);
            assert!(p.b.recv(&mut [], dl(PROMPT)).is_err(), "edit at {at}");
        }
    }
}
