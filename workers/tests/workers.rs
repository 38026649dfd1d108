//! Workers: map, pools, and work queues between threads and between processes.
//! Just over 600 lines: the crate's one integration suite, grouped by invariant below.
//!
//! Invariants checked (defined in the module docs of workers/src/):
//! - MAP-1..3 (map.rs): results in worker order; a panicking worker is a `Worker` error naming it;
//!   a timed-out join can be repeated.
//! - WQ-1..5 (queue.rs): end of queue for workers and owner, back-pressure with the item given
//!   back, adjacent multi-writes, every item read exactly once by many readers, deadlines.
//! - HQ-1..4 (host.rs), SHQ-2..4 (shared.rs): a queue opened by name from another process is the
//!   same queue; tensors cross in shared memory and the reader's tensor views it; a process killed
//!   while holding the queue's lock, or while holding an item, leaves the queue usable and is not
//!   counted as a live worker.
//! - WQ-2/HQ-7: a write of more items than the capacity completes as readers consume, or times
//!   out saying how far it got; HQ-6: the owner does not reach end of queue while a process
//!   attaches; WQ-7/WQA-1..3: drain waits for the questions still outstanding, an unanswered
//!   sentinel does not poison it, a worker process killed holding questions is a named error.
//! - The seed's two examples (load 3 files with map; two workers loading files from a queue).
//!
//! Child processes re-run this test binary's ignored `child` test with `PARALLEL_TEST_CHILD` set.

use parallel_engine::{DType, ErrorKind, Tensor, Value};
use parallel_workers::{Channel, HostQueue, Pool, Role, WorkQueue, map};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn t(ms: u64) -> Option<Duration> {
    Some(Duration::from_millis(ms))
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{:?}", std::process::id(), Instant::now())
}

fn write_files(tag: &str) -> (std::path::PathBuf, Vec<String>) {
    let dir = std::env::temp_dir().join(unique(tag));
    std::fs::create_dir_all(&dir).unwrap();
    let names = (1..=3)
        .map(|i| {
            let p = dir.join(format!("f{i}.bin"));
            std::fs::write(&p, vec![i as u8; 1000 * i]).unwrap();
            p.to_string_lossy().into_owned()
        })
        .collect();
    (dir, names)
}

#[test]
fn seed_map_loads_three_files_in_worker_order() {
    // MAP-1: the seed's `t1, t2, t3 = parallel.map(3, load, names):join()`, with the workers made
    // to finish in reverse order.
    let (dir, names) = write_files("seed-map");
    let names = Arc::new(names);
    let mut h = map(3, {
        let names = names.clone();
        move |i| {
            std::thread::sleep(Duration::from_millis(30 * (3 - i as u64)));
            std::fs::read(&names[i]).unwrap()
        }
    })
    .unwrap();
    let got = h.join(t(5000)).unwrap();
    assert_eq!(got.len(), 3);
    for (i, data) in got.iter().enumerate() {
        assert_eq!(data, &vec![i as u8 + 1; 1000 * (i + 1)]);
    }
    assert!(h.done());
    assert_eq!(h.join(t(100)).unwrap_err().kind(), ErrorKind::Closed);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn map_2_a_panicking_worker_is_an_error_naming_it() {
    let mut h = map(3, |i| {
        if i == 1 {
            panic!("boom in the middle");
        }
        i * 10
    })
    .unwrap();
    let e = h.join(t(5000)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Worker);
    assert!(e.to_string().contains("worker 1 of 3"), "{e}");
    assert!(e.to_string().contains("boom in the middle"), "{e}");
}

#[test]
fn map_3_join_times_out_and_can_be_repeated() {
    let gate: Arc<Channel<()>> = Arc::new(Channel::new(1));
    let g = gate.clone();
    let mut h = map(2, move |i| {
        if i == 1 {
            g.pop(parallel_engine::runtime::Deadline::after(
                Duration::from_secs(10),
            ))
            .unwrap();
        }
        i
    })
    .unwrap();
    let start = Instant::now();
    let e = h.join(t(100)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert!(
        e.to_string().contains("1 of 2 map workers still running"),
        "{e}"
    );
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(!h.done());
    gate.try_push(()).unwrap();
    assert_eq!(h.join(t(5000)).unwrap(), vec![0, 1]);
}

#[test]
fn pool_runs_many_small_jobs_in_item_order_with_progress() {
    let pool = Pool::new(2).unwrap();
    let mut seen = Vec::new();
    let out = pool
        .map(
            0..100u64,
            |x| x * x,
            t(10_000),
            |done, total| seen.push((done, total)),
        )
        .unwrap();
    assert_eq!(out, (0..100u64).map(|x| x * x).collect::<Vec<_>>());
    assert_eq!(seen.last(), Some(&(100, 100)));
    let task = pool.submit(|| -> u8 { panic!("job failed") }).unwrap();
    assert_eq!(task.wait(t(5000)).unwrap_err().kind(), ErrorKind::Worker);
    assert_eq!(pool.submit(|| 7).unwrap().wait(t(5000)).unwrap(), 7);
}

#[test]
fn seed_workqueue_two_workers_load_files_between_threads() {
    // The seed's workqueue example with threads: the owner writes file names, two workers that
    // open the queue by name write the files' contents back.
    let (dir, names) = write_files("seed-wq");
    let qname = unique("seed-queue");
    let q: WorkQueue<Vec<u8>> = WorkQueue::open(&qname).unwrap();
    assert!(q.is_owner());
    let qn = qname.clone();
    let mut workers = map(2, move |_| {
        let q: WorkQueue<Vec<u8>> = WorkQueue::open(&qn).unwrap();
        assert_eq!(q.role(), Role::Worker);
        for name in q.iter() {
            let name = String::from_utf8(name.unwrap()).unwrap();
            q.write(std::fs::read(name).unwrap(), None).unwrap();
        }
    })
    .unwrap();
    for n in &names {
        q.write(n.clone().into_bytes(), None).unwrap();
    }
    let mut got: Vec<Vec<u8>> = (0..3).map(|_| q.read(t(5000)).unwrap()).collect();
    got.sort_by_key(|v| v.len());
    for (i, data) in got.iter().enumerate() {
        assert_eq!(data, &vec![i as u8 + 1; 1000 * (i + 1)]);
    }
    q.close();
    workers.join(t(5000)).unwrap();
    // WQ-1: workers are gone, questions done, answers read: the owner sees end of queue.
    assert_eq!(q.read(t(1000)).unwrap_err().kind(), ErrorKind::Closed);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn wq_1_close_gives_a_clear_end_of_queue() {
    let q: WorkQueue<i32> = WorkQueue::new(8);
    let w = q.worker();
    q.write(1, None).unwrap();
    q.write(2, None).unwrap();
    q.close();
    assert_eq!(
        q.write(3, None).unwrap_err().item,
        3,
        "WQ-4: the item comes back"
    );
    assert_eq!(w.read(t(1000)).unwrap(), 1);
    assert_eq!(w.read(t(1000)).unwrap(), 2);
    let e = w.read(t(1000)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Closed);
    assert!(e.to_string().contains("end of queue"), "{e}");
    // The owner still reads answers after its close, then end of queue once the worker closes.
    w.write(20, None).unwrap();
    assert_eq!(q.read(t(1000)).unwrap(), 20);
    assert_eq!(q.try_read().unwrap(), None, "a worker is still open");
    let waiter = std::thread::spawn(move || q.read(t(5000)).unwrap_err().kind());
    std::thread::sleep(Duration::from_millis(50));
    drop(w);
    assert_eq!(
        waiter.join().unwrap(),
        ErrorKind::Closed,
        "closing the last worker wakes the owner"
    );
}

#[test]
fn wq_2_back_pressure_waits_and_gives_the_item_back() {
    let q: WorkQueue<String> = WorkQueue::new(2);
    let w = q.worker();
    q.write("a".into(), None).unwrap();
    q.try_write("b".into()).unwrap();
    assert_eq!(q.try_write("c".into()).unwrap_err().item, "c");
    let start = Instant::now();
    let r = q.write("c".into(), t(100)).unwrap_err();
    assert_eq!(r.error.kind(), ErrorKind::Timeout);
    assert!(
        r.error.to_string().contains("PARALLEL_WORKQUEUE_CAPACITY"),
        "{}",
        r.error
    );
    assert_eq!(r.item, "c");
    assert!(
        start.elapsed() >= Duration::from_millis(100) && start.elapsed() < Duration::from_secs(3)
    );
    // A blocked writer proceeds as soon as a reader makes room.
    let q = Arc::new(q);
    let q2 = q.clone();
    let writer = std::thread::spawn(move || q2.write("c".into(), t(5000)).is_ok());
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(w.read(t(1000)).unwrap(), "a");
    assert!(writer.join().unwrap());
    assert_eq!(w.read(t(1000)).unwrap(), "b");
    assert_eq!(w.read(t(1000)).unwrap(), "c");
}

#[test]
fn wq_5_reads_time_out_at_their_deadline() {
    let q: WorkQueue<u8> = WorkQueue::new(4);
    let w = q.worker();
    let start = Instant::now();
    let e = w.read(t(120)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(120) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(w.try_read().unwrap(), None);
}

#[test]
fn wq_many_readers_take_every_question_exactly_once() {
    let q: WorkQueue<u32> = WorkQueue::new(16);
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let w = q.worker();
            std::thread::spawn(move || {
                let mine: Vec<u32> = w.iter().map(|r| r.unwrap()).collect();
                assert!(
                    mine.windows(2).all(|p| p[0] < p[1]),
                    "WQ-3: one writer's order"
                );
                for v in &mine {
                    w.write(*v, None).unwrap();
                }
                mine.len()
            })
        })
        .collect();
    for i in 0..2000 {
        q.write(i, t(5000)).unwrap();
    }
    q.close();
    let mut answers: Vec<u32> = q.iter().map(|r| r.unwrap()).collect();
    let counts: Vec<usize> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    assert_eq!(counts.iter().sum::<usize>(), 2000);
    answers.sort();
    assert_eq!(answers, (0..2000).collect::<Vec<_>>());
}

#[test]
fn wq_3_multi_writes_land_adjacent() {
    let q: WorkQueue<(usize, u32)> = WorkQueue::new(64);
    let writers: Vec<_> = (0..3)
        .map(|id| {
            let w = q.worker();
            std::thread::spawn(move || {
                for k in 0..200 {
                    w.write_all(vec![(id, 2 * k), (id, 2 * k + 1)], t(5000))
                        .unwrap();
                }
            })
        })
        .collect();
    let got: Vec<(usize, u32)> = (0..1200).map(|_| q.read(t(5000)).unwrap()).collect();
    for w in writers {
        w.join().unwrap();
    }
    for pair in got.chunks(2) {
        assert_eq!(pair[0].0, pair[1].0, "a batch was split: {pair:?}");
        assert_eq!(pair[0].1 + 1, pair[1].1);
    }
}

#[test]
fn wq_6_names_are_typed_and_reusable() {
    let name = unique("typed");
    let q: WorkQueue<u8> = WorkQueue::open(&name).unwrap();
    assert_eq!(
        WorkQueue::<String>::open(&name).unwrap_err().kind(),
        ErrorKind::Mismatch
    );
    let w: WorkQueue<u8> = WorkQueue::open(&name).unwrap();
    assert!(!w.is_owner());
    drop(q);
    let again: WorkQueue<u8> = WorkQueue::open(&name).unwrap();
    assert!(again.is_owner(), "a dropped owner's name is free again");
}

fn tensor(vals: &[f32]) -> Tensor {
    let bytes = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    Tensor::from_bytes(DType::F32, vec![vals.len()], bytes).unwrap()
}

#[test]
fn hq_tensors_move_between_threads_by_reference() {
    let q = HostQueue::open(&unique("byref"), None).unwrap();
    let w = q.worker().unwrap();
    let t0 = tensor(&[1.0, 2.0, 3.0]);
    let ptr = t0.data_ptr();
    q.write(vec![Value::Tensor(t0), Value::str("x")], None)
        .unwrap();
    let got = w.read(t(1000)).unwrap();
    assert_eq!(
        got.as_tensor().unwrap().data_ptr(),
        ptr,
        "same memory, no copy"
    );
    assert_eq!(
        w.read(t(1000)).unwrap().as_str(),
        Some("x"),
        "WQ-3: adjacent, in order"
    );
    assert!(!q.is_shared());
}

// ---------------------------------------------------------------------------------------------
// Across processes

fn spawn_child(mode: &str, name: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PARALLEL_TEST_CHILD", format!("{mode}:{name}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn wait_exit(c: &mut Child, within: Duration) -> std::process::ExitStatus {
    let until = Instant::now() + within;
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > until {
            c.kill().unwrap();
            panic!("child did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The body of child processes (not a test on its own: ignored, run by the tests above).
#[test]
#[ignore = "run as a child process by the cross-process tests"]
fn child() {
    #[allow(clippy::disallowed_methods)] // test-only: the parent passes the child's role
    let Ok(spec) = std::env::var("PARALLEL_TEST_CHILD") else {
        return;
    };
    let (mode, name) = spec.split_once(':').unwrap();
    let q = HostQueue::open(name, t(5000)).unwrap();
    assert_eq!(q.role(), Role::Worker);
    match mode {
        "echo" => loop {
            match q.read(t(10_000)) {
                Ok(Value::Str(ref path)) => q
                    .write(vec![Value::bytes(std::fs::read(path).unwrap())], None)
                    .unwrap(),
                Ok(v) => q.write(vec![v], None).unwrap(),
                Err(e) if e.kind() == ErrorKind::Closed => return,
                Err(e) => panic!("{e}"),
            }
        },
        "die" => q.die_holding_lock(),
        "hold" => {
            let _held = q.read(t(10_000)).unwrap();
            std::thread::sleep(Duration::from_secs(30));
        }
        _ => panic!("unknown child mode {mode}"),
    }
}

#[test]
fn seed_workqueue_two_worker_processes_load_files() {
    // HQ-1, SHQ-4: the seed's workqueue example with workers in other processes, which open
    // the queue by name; big tensors come back as views of the shared arena.
    let (dir, names) = write_files("seed-procs");
    let name = unique("procs");
    let q = HostQueue::open(&name, None).unwrap();
    for n in &names {
        q.write(vec![Value::str(n.clone())], None).unwrap();
    }
    let mut kids = [spawn_child("echo", &name), spawn_child("echo", &name)];
    let mut got: Vec<Vec<u8>> = (0..3)
        .map(|_| match &q.read(t(10_000)).unwrap() {
            Value::Bytes(b) => b.to_vec(),
            v => panic!("unexpected {v:?}"),
        })
        .collect();
    got.sort_by_key(|v| v.len());
    for (i, data) in got.iter().enumerate() {
        assert_eq!(data, &vec![i as u8 + 1; 1000 * (i + 1)]);
    }
    assert!(q.is_shared());
    let big: Vec<f32> = (0..(4 << 20)).map(|i| i as f32).collect();
    q.write(vec![Value::Tensor(tensor(&big))], None).unwrap();
    let back = q.read(t(10_000)).unwrap();
    let bt = back.as_tensor().unwrap();
    assert!(
        matches!(
            bt.storage(),
            parallel_engine::value::Storage::Foreign { .. }
        ),
        "a view, not a copy"
    );
    assert_eq!(bt.bytes().unwrap(), tensor(&big).bytes().unwrap());
    q.close();
    for k in &mut kids {
        assert!(wait_exit(k, Duration::from_secs(10)).success());
    }
    assert_eq!(q.read(t(2000)).unwrap_err().kind(), ErrorKind::Closed);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn shq_2_a_process_killed_holding_the_lock_leaves_the_queue_usable() {
    let name = unique("die");
    let q = HostQueue::open(&name, None).unwrap();
    let mut k = spawn_child("die", &name);
    let status = wait_exit(&mut k, Duration::from_secs(10));
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    // The queue is shared now (the child opened it); its lock's holder is dead.
    assert!(q.is_shared());
    let w = q.worker().unwrap();
    let start = Instant::now();
    q.write(vec![Value::Int(5)], t(3000)).unwrap();
    assert_eq!(w.read(t(3000)).unwrap().as_int(), Some(5));
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[test]
fn hq_3_a_worker_process_killed_holding_an_item_does_not_hang_the_owner() {
    let name = unique("hold");
    let q = HostQueue::open(&name, None).unwrap();
    let mut k = spawn_child("hold", &name);
    let big: Vec<f32> = vec![1.0; 1 << 20];
    q.write(vec![Value::Tensor(tensor(&big))], None).unwrap();
    // Wait until the child took the item, then kill it.
    let until = Instant::now() + Duration::from_secs(10);
    while !q.is_shared() || q.questions() > 0 {
        assert!(Instant::now() < until, "child never took the item");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(50));
    k.kill().unwrap();
    wait_exit(&mut k, Duration::from_secs(5));
    q.close();
    let start = Instant::now();
    // WQA-3: it died holding a question: a `Worker` error naming it, then the end of queue.
    let e = q.read(t(5000)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Worker, "{e}");
    assert!(
        e.to_string()
            .contains(&format!("worker process {}", k.id())),
        "{e}"
    );
    let e = q.read(t(5000)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "the dead worker is not waited for"
    );
}

#[test]
fn wq_2_a_write_of_more_items_than_the_capacity_completes_as_readers_consume() {
    let q: WorkQueue<u32> = WorkQueue::new(2);
    let w = q.worker();
    let reader = std::thread::spawn(move || w.iter().map(Result::unwrap).collect::<Vec<_>>());
    q.write_all((0..1000).collect(), t(60_000)).unwrap();
    q.close();
    assert_eq!(reader.join().unwrap(), (0..1000).collect::<Vec<_>>());
}

#[test]
fn wq_2_a_write_larger_than_the_capacity_times_out_saying_how_far_it_got() {
    let q: WorkQueue<u32> = WorkQueue::new(2);
    let w = q.worker();
    let start = Instant::now();
    let r = q.write_all((0..10).collect(), t(300)).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(r.error.kind(), ErrorKind::Timeout);
    let msg = r.error.to_string();
    assert!(msg.contains("2 of the 10 items were written"), "{msg}");
    assert!(msg.contains("capacity 2"), "{msg}");
    assert_eq!(
        r.item,
        (2..10).collect::<Vec<_>>(),
        "the rest is given back"
    );
    assert_eq!(w.read(t(1000)).unwrap(), 0);
    assert_eq!(w.read(t(1000)).unwrap(), 1);
}

#[test]
fn wq_7_drain_is_not_poisoned_by_an_unanswered_sentinel() {
    let q: WorkQueue<Option<u32>> = WorkQueue::new(16);
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let w = q.worker();
            std::thread::spawn(move || {
                while let Ok(Some(x)) = w.read(t(30_000)) {
                    w.write(Some(x * 2), None).unwrap();
                }
                // A sentinel (None) or the end: the handle closes without answering it.
            })
        })
        .collect();
    q.write_all((0..10).map(Some).collect(), None).unwrap();
    q.drain(t(30_000)).unwrap();
    q.write(None, None).unwrap(); // stops one worker, never answered
    let start = Instant::now();
    q.drain(t(30_000)).unwrap();
    assert!(start.elapsed() < Duration::from_secs(10));
    q.write_all((0..5).map(Some).collect(), None).unwrap();
    q.drain(t(30_000)).unwrap();
    let mut got: Vec<u32> = (0..15).map(|_| q.read(t(1000)).unwrap().unwrap()).collect();
    got.sort();
    let mut want: Vec<u32> = (0..10).chain(0..5).map(|x| x * 2).collect();
    want.sort();
    assert_eq!(got, want);
    q.close();
    for h in workers {
        h.join().unwrap();
    }
}

#[test]
fn wq_7_a_timed_out_drain_names_what_is_outstanding_and_the_next_drain_works() {
    let q: WorkQueue<u32> = WorkQueue::new(16);
    let w = q.worker();
    q.write_all(vec![1, 2], None).unwrap();
    let e = q.drain(t(200)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    let msg = e.to_string();
    assert!(
        msg.contains("2 of the 2 questions written before drain() are still unanswered"),
        "{msg}"
    );
    assert!(msg.contains("2 questions queued"), "{msg}");
    let x = w.read(t(1000)).unwrap();
    let e = q.drain(t(200)).unwrap_err();
    assert!(e.to_string().contains("1 questions held unanswered"), "{e}");
    w.write(x, None).unwrap();
    let y = w.read(t(1000)).unwrap();
    w.write(y, None).unwrap();
    q.drain(t(5000)).unwrap();
    assert_eq!((q.read(t(1000)).unwrap(), q.read(t(1000)).unwrap()), (1, 2));
}

#[test]
fn hq_7_a_write_of_more_items_than_the_capacity_to_a_worker_process_completes() {
    // Capacity comes from the config (1024 by default): 3000 items cross in pieces.
    let name = unique("big-write");
    let q = HostQueue::open(&name, None).unwrap();
    let mut k = spawn_child("echo", &name);
    let n = 3 * q.capacity() as i64;
    // The child echoes each item: read the answers while writing, from another thread of
    // this process (an owner's handle works from any thread in Rust).
    let q = Arc::new(q);
    let q2 = q.clone();
    let answers = std::thread::spawn(move || {
        (0..n)
            .map(|_| q2.read(t(60_000)).unwrap().as_int().unwrap())
            .collect::<Vec<_>>()
    });
    q.write((0..n).map(Value::Int).collect(), t(60_000))
        .unwrap();
    assert_eq!(answers.join().unwrap(), (0..n).collect::<Vec<_>>());
    q.close();
    assert!(wait_exit(&mut k, Duration::from_secs(20)).success());
}

#[test]
fn hq_6_the_owner_does_not_end_while_a_worker_process_attaches() {
    // Questions queued in-process move to shared memory when the first process connects; the
    // owner's end-of-queue check runs across that move and the child's attach.
    for round in 0..3 {
        let name = unique(&format!("attach-{round}"));
        let q = HostQueue::open(&name, None).unwrap();
        let big: Vec<f32> = vec![1.0; 4 << 20];
        let items: Vec<Value> = (0..6).map(|_| Value::Tensor(tensor(&big))).collect();
        q.write(items, None).unwrap();
        q.close();
        let mut k = spawn_child("echo", &name);
        let mut got = 0;
        loop {
            match q.read(t(60_000)) {
                Ok(_) => got += 1,
                Err(e) if e.kind() == ErrorKind::Closed => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, 6, "round {round}: the owner's read ended early");
        assert!(wait_exit(&mut k, Duration::from_secs(20)).success());
    }
}
