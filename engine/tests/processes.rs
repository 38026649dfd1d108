//! Client/Server conformance across processes, and hostile input against a live server.
//! Over 600 lines on purpose: every case shares the child-process harness at the top, and the
//! file runs once per I/O backend and link kind (scripts/test.sh).
//!
//! The other end is the `parallel-peer` helper binary (engine/src/bin/parallel-peer.rs) in a child
//! process. Children inherit the environment, so both ends run the same PARALLEL_IO backend and
//! PARALLEL_SHM choice; this file runs under every combination (scripts/test.sh, .ci/run).
//!
//! Invariants checked (defined in the module docs named):
//! - EP-2, LINK-3 (endpoint/, link/mod.rs): a peer killed with SIGKILL, or aborting in the
//!   middle of a message, is reported promptly (< 2 s) as `PeerLost` naming its pid, once, and the
//!   server goes on serving other clients.
//! - HS-1, WIRE-1 (handshake.rs, wire/): garbage, oversized declarations, truncated frames and a
//!   wrong version, before or after the handshake, cost the server a refused connection and no
//!   memory; a real client connects afterwards.
//! - HS auth: a peer with another PARALLEL_SECRET (or none) is refused with an authentication error
//!   that names the variable; the same secret connects.
//!
//! Timing: every wait is bounded; no test should take more than a few seconds.

use parallel_engine::endpoint::ServerStats;
use parallel_engine::wire::{self, FrameKind, HEADER_LEN, Header, Limits};
#[path = "common/pattern.rs"]
mod pattern;

use parallel_engine::{Client, DType, ErrorKind, Key, LinkKind, Server, Tensor, Value};
use pattern::pattern;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::RwLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const PEER: &str = env!("CARGO_BIN_EXE_parallel-peer");
const MIB: usize = 1 << 20;
/// How soon a dead peer must be reported.
const PROMPT: Duration = Duration::from_secs(2);

/// Tests that measure this process's memory hold it exclusively; the others share it, so a 64 MiB
/// transfer in a parallel test cannot be mistaken for a leak.
static MEMORY: RwLock<()> = RwLock::new(());

fn t(secs: f64) -> Option<Duration> {
    Some(Duration::from_secs_f64(secs))
}

fn expected_link() -> LinkKind {
    if parallel_engine::config::config().shm {
        LinkKind::Shm
    } else {
        LinkKind::Tcp
    }
}

/// HS-5: a peer is named by its address and, on a shared-memory link, by the pid the kernel
/// reports (SO_PEERCRED); a pid claimed over TCP is never shown.
fn names_peer(text: &str, pid: u32) -> bool {
    let with_pid = text.contains(&format!("pid {pid}"));
    match expected_link() {
        LinkKind::Shm => with_pid,
        _ => text.contains("127.0.0.1:") && !text.contains("pid "),
    }
}

// ---- child processes ---------------------------------------------------------------------------

/// A child `parallel-peer`, killed (SIGKILL) and reaped when dropped, so a failing test leaves no
/// process behind.
struct Peer {
    child: std::process::Child,
    what: String,
}

impl Peer {
    fn spawn(args: &[&str], env: &[(&str, Option<&str>)]) -> Peer {
        let mut cmd = Command::new(PEER);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {PEER}: {e}"));
        Peer {
            child,
            what: args.join(" "),
        }
    }

    fn client(port: u16, mode: &[&str]) -> Peer {
        let p = port.to_string();
        let mut args = vec!["client", p.as_str()];
        args.extend_from_slice(mode);
        Peer::spawn(&args, &[])
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the exit, failing the test after `timeout`.
    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "`parallel-peer {}` did not exit within {timeout:?}",
                self.what
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the exit and returns (status, stdout, stderr). The helper writes a few lines at
    /// most, well under a pipe's capacity, so reading after the exit cannot deadlock.
    fn finish(&mut self, timeout: Duration) -> (ExitStatus, String, String) {
        let status = self.wait(timeout);
        let mut out = String::new();
        let mut err = String::new();
        if let Some(o) = self.child.stdout.as_mut() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(e) = self.child.stderr.as_mut() {
            let _ = e.read_to_string(&mut err);
        }
        (status, out, err)
    }

    /// Asserts a clean exit within `timeout`.
    fn succeeds(&mut self, timeout: Duration) {
        let (status, out, err) = self.finish(timeout);
        assert!(
            status.success(),
            "`parallel-peer {}` failed ({status}):\nstdout: {out}\nstderr: {err}",
            self.what
        );
    }

    fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL the peer");
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `parallel-peer serve` and returns it with its port.
fn serve(env: &[(&str, Option<&str>)]) -> (Peer, u16) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let file = std::env::temp_dir().join(format!(
        "parallel-peer-{}-{}.port",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let path = file.to_str().expect("utf-8 temp dir");
    let mut p = Peer::spawn(&["serve", path], env);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(port) = std::fs::read_to_string(&file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            let _ = std::fs::remove_file(&file);
            return (p, port);
        }
        if let Some(s) = p.child.try_wait().expect("try_wait") {
            let (_, _, err) = p.finish(Duration::ZERO);
            panic!("`parallel-peer serve` exited early ({s}): {err}");
        }
        assert!(Instant::now() < deadline, "serve wrote no port file");
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---- data -------------------------------------------------------------------------------------

fn assert_pattern(v: &Value, n: usize) {
    let t = v.as_tensor().expect("a tensor");
    assert_eq!((t.dtype(), t.shape()), (DType::U8, &[n][..]));
    let got = t.bytes().expect("contiguous");
    let want = pattern(n);
    if got != &want[..] {
        let i = got.iter().zip(&want).position(|(a, b)| a != b);
        panic!("received bytes differ from the pattern at {i:?} of {n}");
    }
}

fn pattern_tensor(n: usize) -> Value {
    Value::Tensor(Tensor::from_bytes(DType::U8, vec![n], pattern(n)).unwrap())
}

fn status_kib(field: &str) -> usize {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} line in /proc/self/status"))
}

/// Memory watch over a hostile test: resident memory now, and the peak since `start` where the
/// kernel lets us reset it (so memory taken and given back within the test counts too).
struct MemoryWatch {
    before: usize,
    peak_reset: bool,
}

impl MemoryWatch {
    fn start() -> MemoryWatch {
        let before = status_kib("VmRSS:") * 1024;
        // "5" resets VmHWM, the peak resident size, to the current size (Linux 4.0+).
        let peak_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        MemoryWatch { before, peak_reset }
    }

    /// Bytes the process grew by, at the peak where known, else now.
    fn grown(&self) -> usize {
        let now = status_kib("VmRSS:") * 1024;
        let peak = if self.peak_reset {
            status_kib("VmHWM:") * 1024
        } else {
            0
        };
        now.max(peak).saturating_sub(self.before)
    }
}

// ---- across processes -------------------------------------------------------------------------

#[test]
fn seed_example_across_processes() {
    let _shared = MEMORY.read().unwrap_or_else(|e| e.into_inner());
    let server = Server::bind("127.0.0.1", 0).unwrap();
    let mut child = Peer::client(server.port(), &["send-hi"]);
    let (msg, conn) = server.recv_any(None, t(10.0)).unwrap();
    assert_eq!(msg.as_str(), Some("hi"));
    assert_eq!(conn.link_kind(), expected_link());
    assert!(
        names_peer(conn.peer(), child.pid()),
        "the connection names the child: {}",
        conn.peer()
    );
    child.succeeds(Duration::from_secs(5));
}

#[test]
fn tensor_64mib_child_to_parent_and_back() {
    let _shared = MEMORY.read().unwrap_or_else(|e| e.into_inner());
    let n = 64 * MIB;
    let server = Server::bind("127.0.0.1", 0).unwrap();
    let n_arg = n.to_string();
    let mut child = Peer::client(server.port(), &["big", &n_arg]);
    let (v, conn) = server.recv_any(None, t(10.0)).unwrap();
    assert_pattern(&v, n);
    assert_eq!(conn.link_kind(), expected_link());
    // The child checks the echo byte for byte and exits 0 only if it matches.
    conn.send(&v, t(10.0)).unwrap();
    child.succeeds(Duration::from_secs(10));
}

#[test]
fn tensor_64mib_parent_to_child_server_and_back() {
    let _shared = MEMORY.read().unwrap_or_else(|e| e.into_inner());
    let n = 64 * MIB;
    let (mut server, port) = serve(&[]);
    let c = Client::connect("127.0.0.1", port, t(10.0)).unwrap();
    assert_eq!(c.link_kind(), expected_link());
    assert!(names_peer(c.peer(), server.pid()), "{}", c.peer());
    c.send(&pattern_tensor(n)).unwrap();
    assert_pattern(&c.recv(t(10.0)).unwrap(), n);
    c.send(&Value::str("quit")).unwrap();
    assert_eq!(c.recv(t(10.0)).unwrap().as_str(), Some("quit"));
    server.succeeds(Duration::from_secs(5));
}

/// Runs `blocked` on a thread, SIGKILLs `child` once the call had time to block, and returns the
/// call's error and how long after the kill it came.
fn kill_while_blocked<T: Send + 'static>(
    child: &mut Peer,
    blocked: impl FnOnce() -> parallel_engine::Result<T> + Send + 'static,
) -> (parallel_engine::Error, Duration) {
    let h = std::thread::spawn(move || {
        let r = blocked();
        (r.err(), Instant::now())
    });
    std::thread::sleep(Duration::from_millis(150));
    assert!(
        !h.is_finished(),
        "the call returned before the peer was killed"
    );
    let killed = Instant::now();
    child.kill9();
    let (e, at) = h.join().unwrap();
    let e = e.expect("the blocked call failed when its peer was killed");
    child.wait(Duration::from_secs(5));
    (e, at.saturating_duration_since(killed))
}

fn assert_peer_lost(e: &parallel_engine::Error, took: Duration, pid: u32) {
    assert_eq!(e.kind(), ErrorKind::PeerLost, "{e}");
    assert!(took < PROMPT, "reported {took:?} after the peer died: {e}");
    assert!(
        names_peer(&e.to_string(), pid),
        "the error names the dead peer (pid {pid}): {e}"
    );
}

/// After a client died: a new client process is still served.
fn assert_serves_another(server: &Server) {
    let mut next = Peer::client(server.port(), &["send-hi"]);
    let (v, conn) = server.recv_any(None, t(10.0)).unwrap();
    assert_eq!(v.as_str(), Some("hi"));
    assert!(names_peer(conn.peer(), next.pid()), "{}", conn.peer());
    next.succeeds(Duration::from_secs(5));
}

#[test]
fn ep_2_peer_killed_while_server_blocked_in_recv_any() {
    let _shared = MEMORY.read().unwrap_or_else(|e| e.into_inner());
    let server = Server::bind("127.0.0.1", 0).unwrap();
    let mut child = Peer::client(server.port(), &["send-then-hang"]);
    assert_eq!(
        server.recv_any(None, t(10.0)).unwrap().0.as_str(),
        Some("hi")
    );
    let s2 = server.clone();
    let pid = child.pid();
    let (e, took) = kill_while_blocked(&mut child, move || s2.recv_any(None, t(10.0)));
    assert_peer_lost(&e, took, pid);
    assert_eq!(server.connections().len(), 0, "the dead peer was removed");
    assert_serves_another(&server);
}

#[test]
fn link_3_peer_killed_while_server_blocked_in_conn_recv() {
    let _shared = MEMORY.read().unwrap_or_else(|e| e.into_inner());
    let server = Server::bind("127.0.0.1", 0).unwrap();
    let mut child = Peer::client(server.port(), &["send-then-hang"]);
    server.wait_for(1, t(10.0)).unwrap();
    let conn = server.connections()[0].clone();
    assert_eq!(conn.recv(t(10.0)).unwrap().as_str(), Some("hi"));
    let c2 = conn.clone();
    let pid = child.pid();
    let (e, took) = kill_while_blocked(&mut child, move || c2.recv(t(10.0)));
    assert_peer_lost(&e, took, pid);
    // Later calls on the dead connection fail at once; they do not wait for the deadline, and a
    // send does not vanish into a ring or socket buffer nobody reads any more.
    let t0 = Instant::now();
    assert!(conn.recv(t(10.0)).is_err());
    let e = conn.send(&Value::None, t(10.0)).unwrap_err();
    assert_peer_lost(&e, t0.elapsed(), pid);
    assert_serves_another(&server);
}

#[test]
fn link_3_server_killed_while_client_blocked_in_recv() {
    let _shared = MEMORY.read().unwrap_or_else(|e| e.into_inner());
    let (mut server, port) = serve(&[]);
    let c = Client::connect("127.0.0.1", port, t(10.0)).unwrap();
    let c2 = c.clone();
    let pid = server.pid();
    let (e, took) = kill_while_blocked(&mut server, move || c2.recv(t(10.0)));
    assert_peer_lost(&e, took, pid);
}

/// Accepts what a receiver may report for a peer that died inside a message.
fn assert_died_mid_message(e: &parallel_engine::Error, pid: u32) {
    assert!(
        matches!(e.kind(), ErrorKind::PeerLost | ErrorKind::Protocol),
        "a peer dying mid-message is PeerLost (or Protocol), got {:?}: {e}",
        e.kind()
    );
    assert!(names_peer(&e.to_string(), pid), "{e}");
}

#[test]
fn link_3_peer_aborts_mid_message_before_the_server_reads() {
    let _shared = MEMORY.read().unwrap_or_else(|e| e.into_inner());
    let server = Server::bind("127.0.0.1", 0).unwrap();
    // 64 MiB cannot fit in socket buffers or the ring: the sender is still inside send() when
    // its abort fires 200 ms later, and the server then finds a frame cut short.
    let n = (64 * MIB).to_string();
    let mut child = Peer::client(server.port(), &["die-mid-send", &n, "200"]);
    server.wait_for(1, t(10.0)).unwrap();
    let status = child.wait(Duration::from_secs(5));
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{status}");
    let t0 = Instant::now();
    let e = server.recv_any(None, t(10.0)).unwrap_err();
    assert!(t0.elapsed() < PROMPT, "took {:?}: {e}", t0.elapsed());
    assert_died_mid_message(&e, child.pid());
    assert_serves_another(&server);
}

#[test]
fn link_3_peer_aborts_mid_message_while_the_server_reads() {
    let _shared = MEMORY.read().unwrap_or_else(|e| e.into_inner());
    let server = Server::bind("127.0.0.1", 0).unwrap();
    let n = 128 * MIB;
    let n_arg = n.to_string();
    let mut child = Peer::client(server.port(), &["die-mid-send", &n_arg, "5"]);
    let s2 = server.clone();
    // Receive until the first error: the abort usually cuts the message; on a fast machine the
    // message may arrive whole first, and the death is reported by the next call.
    let h = std::thread::spawn(move || {
        let mut whole = 0;
        loop {
            match s2.recv_any(None, t(10.0)) {
                Ok((v, _)) => {
                    assert_eq!(v.as_tensor().map(Tensor::nbytes), Some(n));
                    whole += 1;
                }
                Err(e) => return (e, Instant::now(), whole),
            }
        }
    });
    let status = child.wait(Duration::from_secs(5));
    let died = Instant::now();
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{status}");
    let (e, at, whole) = h.join().unwrap();
    assert!(whole <= 1);
    assert!(
        at.saturating_duration_since(died) < PROMPT,
        "reported {:?} after the peer died: {e}",
        at.saturating_duration_since(died)
    );
    assert_died_mid_message(&e, child.pid());
    assert_serves_another(&server);
}

// ---- authentication -----------------------------------------------------------------------------

/// Env for a child with the given secret (None: no secret at all).
fn secret_env(secret: Option<&str>) -> [(&'static str, Option<&str>); 2] {
    [("PARALLEL_SECRET", secret), ("PARALLEL_SECRET_FILE", None)]
}

fn client_with_env(port: u16, mode: &str, env: &[(&str, Option<&str>)]) -> Peer {
    Peer::spawn(&["client", &port.to_string(), mode], env)
}

#[test]
fn auth_wrong_or_missing_secret_is_refused_and_named() {
    let (mut server, port) = serve(&secret_env(Some("a")));

    let mut wrong = client_with_env(port, "echo-hi", &secret_env(Some("b")));
    let (status, _, err) = wrong.finish(Duration::from_secs(5));
    assert_eq!(status.code(), Some(3), "engine error exit: {err}");
    assert!(err.contains("authentication failed"), "{err}");
    assert!(err.contains("PARALLEL_SECRET"), "names the knob: {err}");

    let mut none = client_with_env(port, "echo-hi", &secret_env(None));
    let (status, _, err) = none.finish(Duration::from_secs(5));
    assert_eq!(status.code(), Some(3), "engine error exit: {err}");
    assert!(err.contains("authentication failed"), "{err}");
    assert!(err.contains("PARALLEL_SECRET"), "names the knob: {err}");

    // The refusals did not disturb the server: the right secret still gets through.
    client_with_env(port, "echo-hi", &secret_env(Some("a"))).succeeds(Duration::from_secs(5));
    client_with_env(port, "quit", &secret_env(Some("a"))).succeeds(Duration::from_secs(5));
    server.succeeds(Duration::from_secs(5));
}

#[test]
fn auth_client_with_a_secret_refuses_an_unauthenticated_server() {
    let (mut server, port) = serve(&secret_env(None));
    let mut c = client_with_env(port, "echo-hi", &secret_env(Some("a")));
    let (status, _, err) = c.finish(Duration::from_secs(5));
    assert_eq!(status.code(), Some(3), "engine error exit: {err}");
    assert!(err.contains("authentication failed"), "{err}");
    assert!(err.contains("PARALLEL_SECRET"), "{err}");
    client_with_env(port, "quit", &secret_env(None)).succeeds(Duration::from_secs(5));
    server.succeeds(Duration::from_secs(5));
}

// ---- hostile bytes against a live, in-process server --------------------------------------------

fn test_limits() -> Limits {
    Limits {
        max_descriptor: 1 << 20,
        max_payload: 1 << 20,
        max_segments: 16,
        max_depth: 8,
    }
}

fn header(kind: FrameKind, desc_len: u32, nseg: u32, payload_len: u64) -> [u8; HEADER_LEN] {
    Header {
        kind,
        flags: 0,
        desc_len,
        nseg,
        payload_len,
        seq: 1,
    }
    .encode()
}

fn frame(kind: FrameKind, v: &Value) -> Vec<u8> {
    wire::encode_frame(kind, 1, v, &test_limits()).unwrap()
}

fn dict(items: Vec<(&str, Value)>) -> Value {
    Value::Dict(
        items
            .into_iter()
            .map(|(k, v)| (Key::Str(k.into()), v))
            .collect(),
    )
}

/// A well-formed client Hello (no shared memory).
fn hello() -> Vec<u8> {
    frame(
        FrameKind::Hello,
        &dict(vec![
            ("host", Value::str("raw-test-client")),
            ("pid", Value::Int(std::process::id() as i64)),
            ("nonce", Value::bytes(vec![7u8; 32])),
            ("shm", Value::Bool(false)),
        ]),
    )
}

/// Deterministic pseudo-random bytes (xorshift), never starting with the protocol magic.
fn garbage(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v: Vec<u8> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    if let Some(b) = v.first_mut() {
        *b = b'G';
    }
    v
}

fn raw_connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    // No Nagle: an attack written right after the last handshake frame must not wait for the
    // server's delayed ACK (40 ms per round).
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(PROMPT)).unwrap();
    s.set_write_timeout(Some(PROMPT)).unwrap();
    s
}

/// Reads one frame as the handshake peer would.
fn read_frame(s: &mut TcpStream) -> (Header, Value) {
    let mut hb = [0u8; HEADER_LEN];
    s.read_exact(&mut hb).unwrap();
    let h = Header::decode(&hb, &test_limits()).unwrap();
    let mut f = hb.to_vec();
    f.resize(HEADER_LEN + h.desc_len as usize + h.payload_len as usize, 0);
    s.read_exact(&mut f[HEADER_LEN..]).unwrap();
    wire::decode_frame(&f, &test_limits()).unwrap()
}

/// Completes the server handshake by hand (no secret, TCP), built from the public wire encoder
/// only: the raw stream can then inject bytes where only established links ever write.
fn raw_handshake(port: u16) -> TcpStream {
    let mut s = raw_connect(port);
    s.write_all(&hello()).unwrap();
    let (h, welcome) = read_frame(&mut s);
    assert_eq!(h.kind, FrameKind::Welcome);
    assert!(matches!(welcome.get("auth"), Some(Value::Bool(false))));
    assert_eq!(read_frame(&mut s).0.kind, FrameKind::Ready);
    s.write_all(&frame(
        FrameKind::Hello,
        &dict(vec![("shm", Value::Bool(false))]),
    ))
    .unwrap();
    s
}

/// True when the server dropped the connection (EOF or reset) within [`PROMPT`].
fn dropped_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + PROMPT;
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a Welcome or Refuse frame before the close
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false, // read timeout: still open
        }
    }
    false
}

/// A server that has served one real client, so its threads and pools exist before memory is
/// measured.
fn warm_server() -> Server {
    let server = Server::bind("127.0.0.1", 0).unwrap();
    real_client_round_trip(&server);
    // Let recv_any see that client's orderly close and forget it (EP-2), so every connection
    // counted from here on is the attacker's.
    let e = server.recv_any(None, t(0.05)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert_eq!(server.connections().len(), 0);
    server
}

fn real_client_round_trip(server: &Server) {
    let c = Client::connect("127.0.0.1", server.port(), t(10.0)).unwrap();
    c.send(&Value::str("still serving")).unwrap();
    let (v, conn) = server.recv_any(None, t(10.0)).unwrap();
    assert_eq!(v.as_str(), Some("still serving"));
    conn.send(&Value::Int(1), t(10.0)).unwrap();
    assert_eq!(c.recv(t(10.0)).unwrap().as_int(), Some(1));
    c.close();
}

/// Growth allowed across one hostile test (20 rounds of an attack), peak included.
const RSS_SLACK: usize = 64 * MIB;

/// HS-1: each pre-handshake attack, 20 times over, is refused promptly, costs no memory, and a
/// real client is served afterwards.
fn survives_before_handshake(name: &str, attack: impl Fn(&mut TcpStream)) {
    let _exclusive = MEMORY.write().unwrap_or_else(|e| e.into_inner());
    let server = warm_server();
    let memory = MemoryWatch::start();
    let ServerStats {
        accepted, refused, ..
    } = server.stats();
    for _ in 0..20 {
        let mut s = raw_connect(server.port());
        attack(&mut s);
        assert!(
            dropped_by_server(&mut s),
            "{name}: the server kept the connection open"
        );
    }
    // Refusals are counted once the reactor finished the handshake task.
    let deadline = Instant::now() + PROMPT;
    while server.stats().refused < refused + 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(server.stats().refused, refused + 20, "{name}");
    assert_eq!(
        server.stats().accepted,
        accepted,
        "{name}: no attack became a connection"
    );
    real_client_round_trip(&server);
    let grown = memory.grown();
    assert!(
        grown < RSS_SLACK,
        "{name}: resident memory grew by {grown} bytes"
    );
}

/// HS-1: a silent client costs one handshake thread for a bounded time and delays nobody else.
#[test]
fn hs_1_silent_clients_do_not_block_other_handshakes() {
    let server = Server::bind("127.0.0.1", 0).unwrap();
    let n = parallel_engine::runtime::Runtime::get().reactors();
    let _silent: Vec<TcpStream> = (0..n).map(|_| raw_connect(server.port())).collect();
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    let r = Client::connect("127.0.0.1", server.port(), t(3.0));
    assert!(
        r.is_ok(),
        "{n} silent sockets kept a real client out for {:?}: {:?}",
        t0.elapsed(),
        r.err()
    );
}

#[test]
fn hs_1_random_bytes_instead_of_a_hello() {
    survives_before_handshake("random bytes", |s| {
        s.write_all(&garbage(4096, 0x9e37_79b9)).unwrap();
    });
}

#[test]
fn hs_1_huge_declared_lengths_in_the_hello() {
    survives_before_handshake("huge lengths", |s| {
        s.write_all(&header(FrameKind::Hello, u32::MAX, u32::MAX, u64::MAX))
            .unwrap();
    });
    survives_before_handshake("huge payload only", |s| {
        s.write_all(&header(FrameKind::Hello, 64, 1, 1 << 40))
            .unwrap();
    });
}

#[test]
fn hs_1_truncated_hello_then_close() {
    survives_before_handshake("truncated hello", |s| {
        let f = hello();
        s.write_all(&f[..f.len() / 2]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
    });
    survives_before_handshake("truncated header", |s| {
        s.write_all(&hello()[..HEADER_LEN - 5]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
    });
}

#[test]
fn hs_1_wrong_version_and_wrong_frame_kind() {
    survives_before_handshake("wrong version", |s| {
        let mut f = hello();
        f[4..6].copy_from_slice(&(wire::VERSION + 1).to_le_bytes());
        s.write_all(&f).unwrap();
    });
    survives_before_handshake("message before hello", |s| {
        s.write_all(&frame(FrameKind::Message, &Value::str("hi")))
            .unwrap();
    });
}

/// WIRE-1, LINK-2: each attack after a completed handshake is reported once by recv_any as an
/// error of `kind` naming the peer, the connection is dropped, memory does not grow, and a real
/// client is served afterwards.
fn survives_after_handshake(name: &str, kind: ErrorKind, attack: impl Fn(&mut TcpStream)) {
    assert!(
        parallel_engine::config::config().secret.is_none(),
        "the raw handshake assumes no PARALLEL_SECRET"
    );
    let _exclusive = MEMORY.write().unwrap_or_else(|e| e.into_inner());
    let server = warm_server();
    let memory = MemoryWatch::start();
    for _ in 0..20 {
        let accepted = server.stats().accepted;
        let mut s = raw_handshake(server.port());
        let deadline = Instant::now() + PROMPT;
        while server.stats().accepted == accepted && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            server.stats().accepted,
            accepted + 1,
            "{name}: handshake done"
        );
        attack(&mut s);
        let t0 = Instant::now();
        let e = server.recv_any(None, t(10.0)).unwrap_err();
        assert!(t0.elapsed() < PROMPT, "{name}: took {:?}", t0.elapsed());
        assert_eq!(e.kind(), kind, "{name}: {e}");
        // Named by its address; the pid its Hello claims is not shown (HS-5).
        let me = s.local_addr().unwrap().to_string();
        assert!(e.to_string().contains(&me), "{name}: names the peer: {e}");
        let claimed = format!("pid {}", std::process::id());
        assert!(
            !e.to_string().contains(&claimed),
            "{name}: claimed pid used: {e}"
        );
        assert!(dropped_by_server(&mut s), "{name}: connection kept open");
        assert_eq!(server.connections().len(), 0, "{name}");
    }
    real_client_round_trip(&server);
    let grown = memory.grown();
    assert!(
        grown < RSS_SLACK,
        "{name}: resident memory grew by {grown} bytes"
    );
}

#[test]
fn wire_1_garbage_after_the_handshake() {
    survives_after_handshake("random bytes", ErrorKind::Protocol, |s| {
        s.write_all(&garbage(4096, 0x2545_f491)).unwrap();
    });
    survives_after_handshake("wrong version", ErrorKind::Protocol, |s| {
        let mut f = frame(FrameKind::Message, &Value::str("hi"));
        f[4..6].copy_from_slice(&0xffffu16.to_le_bytes());
        s.write_all(&f).unwrap();
    });
    survives_after_handshake("handshake frame on a link", ErrorKind::Protocol, |s| {
        s.write_all(&hello()).unwrap();
    });
}

#[test]
fn wire_1_declarations_beyond_the_limits_after_the_handshake() {
    survives_after_handshake("payload beyond MAX_FRAME", ErrorKind::Protocol, |s| {
        s.write_all(&header(FrameKind::Message, 64, 1, u64::MAX))
            .unwrap();
    });
    survives_after_handshake(
        "descriptor beyond MAX_DESCRIPTOR",
        ErrorKind::Protocol,
        |s| {
            s.write_all(&header(FrameKind::Message, u32::MAX, 0, 0))
                .unwrap();
        },
    );
    survives_after_handshake("segments beyond MAX_SEGMENTS", ErrorKind::Protocol, |s| {
        s.write_all(&header(FrameKind::Message, 64, u32::MAX, 0))
            .unwrap();
    });
}

#[test]
fn wire_1_inconsistent_descriptor_after_the_handshake() {
    // A float32 [16] tensor (64 bytes) whose segment announces 16 bytes.
    survives_after_handshake("tensor size mismatch", ErrorKind::Protocol, |s| {
        let desc = tensor_descriptor(DType::F32, 16, 16);
        s.write_all(&header(FrameKind::Message, desc.len() as u32, 1, 16))
            .unwrap();
        s.write_all(&desc).unwrap();
        s.write_all(&[1; 16]).unwrap();
    });
    survives_after_handshake("descriptor garbage", ErrorKind::Protocol, |s| {
        s.write_all(&header(FrameKind::Message, 256, 0, 0)).unwrap();
        s.write_all(&garbage(256, 77)).unwrap();
    });
}

#[test]
fn link_3_truncated_message_then_close_after_the_handshake() {
    survives_after_handshake("truncated message", ErrorKind::PeerLost, |s| {
        let f = frame(FrameKind::Message, &pattern_tensor(MIB));
        s.write_all(&f[..f.len() / 2]).unwrap();
        s.shutdown(Shutdown::Both).unwrap();
    });
    // The declared payload is within PARALLEL_MAX_FRAME, but only a few bytes ever arrive: the
    // server must not commit memory for bytes it has not received.
    survives_after_handshake("large declaration, no payload", ErrorKind::PeerLost, |s| {
        let big = 1u64 << 30;
        let desc = tensor_descriptor(DType::U8, big, big);
        s.write_all(&header(FrameKind::Message, desc.len() as u32, 1, big))
            .unwrap();
        s.write_all(&desc).unwrap();
        s.write_all(&[0u8; 100]).unwrap();
        s.shutdown(Shutdown::Both).unwrap();
    });
}

/// Stats count what arrived: a message that declares 1 GiB and delivers 100 bytes of it adds
/// its header and descriptor to `bytes_recv`, never the declared size (issue 11, behaviour 9).
#[test]
fn stats_bytes_recv_counts_bytes_received_not_declared() {
    assert!(parallel_engine::config::config().secret.is_none());
    let _shared = MEMORY.read().unwrap_or_else(|e| e.into_inner());
    let server = Server::bind("127.0.0.1", 0).unwrap();
    let mut s = raw_handshake(server.port());
    let big = 1u64 << 30;
    let desc = tensor_descriptor(DType::U8, big, big);
    s.write_all(&header(FrameKind::Message, desc.len() as u32, 1, big))
        .unwrap();
    s.write_all(&desc).unwrap();
    s.write_all(&[0u8; 100]).unwrap();
    s.shutdown(Shutdown::Both).unwrap();
    let e = server.recv_any(None, t(10.0)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PeerLost, "{e}");
    let got = server.stats().traffic.bytes_recv;
    let framing = (HEADER_LEN + desc.len()) as u64;
    assert!(
        (framing..=framing + 100).contains(&got),
        "bytes_recv {got}, but only {framing} bytes of framing and 100 of payload arrived"
    );
}

/// The archived descriptor of one 1-d tensor of `numel` elements whose payload segment announces
/// `seg_len` bytes (consistent only when they agree).
fn tensor_descriptor(dtype: DType, numel: u64, seg_len: u64) -> Vec<u8> {
    let d = wire::Descriptor {
        nodes: vec![wire::Node::Tensor(wire::TensorNode {
            dtype: dtype as u8,
            device: 0,
            device_index: 0,
            shape: vec![numel],
            seg: 0,
        })],
        segments: vec![seg_len],
    };
    rkyv::to_bytes::<rkyv::rancor::Error>(&d).unwrap().to_vec()
}

// ---- the decoder alone ----------------------------------------------------------------------------

#[test]
fn wire_2_the_same_attacks_against_the_decoder_alone() {
    let limits = test_limits();
    let other_version = format!("wire version {}", wire::VERSION + 1);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("random", garbage(4096, 5), "bad magic"),
        ("empty", vec![], "truncated header"),
        (
            "huge payload",
            header(FrameKind::Message, 8, 1, u64::MAX).to_vec(),
            "PARALLEL_MAX_FRAME",
        ),
        (
            "huge descriptor",
            header(FrameKind::Message, u32::MAX, 0, 0).to_vec(),
            "PARALLEL_MAX_DESCRIPTOR",
        ),
        (
            "many segments",
            header(FrameKind::Message, 8, u32::MAX, 0).to_vec(),
            "PARALLEL_MAX_SEGMENTS",
        ),
        ("truncated", hello()[..HEADER_LEN + 3].to_vec(), "truncated"),
        (
            "no payload",
            {
                let d = tensor_descriptor(DType::U8, 1000, 1000);
                let mut f = header(FrameKind::Message, d.len() as u32, 1, 1000).to_vec();
                f.extend_from_slice(&d);
                f
            },
            "truncated payload",
        ),
        (
            "version",
            {
                let mut f = hello();
                f[4..6].copy_from_slice(&(wire::VERSION + 1).to_le_bytes());
                f
            },
            &other_version,
        ),
    ];
    for (name, bytes, says) in cases {
        let e = wire::decode_frame(&bytes, &limits).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol, "{name}: {e}");
        assert!(e.to_string().contains(says), "{name}: {e}");
    }
}
