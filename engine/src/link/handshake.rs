//! Connection set-up: hello, mutual authentication, and the shared-memory upgrade. Just over
//! 600 lines: the security-relevant steps stay in one file to be reviewed in one reading.
//!
//! ```text
//! client                                   server
//!   Hello {version, host, pid, nonce_c, shm}  ->
//!                                          <-  Welcome {host, nonce_s, auth, proof_s, shm_name, cuda_ipc}
//!   Auth {proof_c}  (only when a secret is set)  ->
//!                                          <-  Ready {id} | Refuse {reason}
//!   Link {shm: bool, cuda_ipc: bool}  ->
//!   [shm: connect to the abstract socket shm_name, send token + memfd + 4 eventfds, probes]
//! ```
//! proof_s = HMAC-SHA256(secret, "parallel/server" | nonce_c | nonce_s), proof_c likewise with
//! "parallel/client": each side proves it knows the secret without sending it; fresh nonces on
//! both sides defeat replay.
//!
//! Invariants:
//! - HS-1: the handshake runs under its own deadline (`PARALLEL_HANDSHAKE_TIMEOUT` on the server),
//!   with small frame limits, so a silent or hostile client costs the server one reactor task for
//!   a bounded time and a few KiB.
//! - HS-2: a shared-memory link is offered only when both ends have the same host identity
//!   (topology TOPO-1) and both allow it; any failure while setting it up fails the connection
//!   with a clear error (set PARALLEL_SHM=0 to keep such peers on TCP).
//! - HS-3: CUDA tensors travel by CUDA IPC only on a shared-memory link whose two ends both
//!   offered it (CUDA present, `PARALLEL_CUDA_IPC` on); otherwise they are staged.
//! - HS-5: nonces, probes and shared-memory socket names come from the OS generator only
//!   (getrandom(2)); without one the handshake fails. No pid a peer claims is used: the pid in a
//!   link's name is the kernel's (SO_PEERCRED on the shared-memory socket); over TCP there is none.
//!
//! Over 600 lines on purpose: the client's and the server's halves of one protocol, read (and
//! changed) together; sockets themselves are in `tcp.rs`.

use super::kinds::{End, Kind, Policy};
use super::shm::{Bells, Mapping, Shm, ShmEnd};
use super::tcp::connect_once;
/// Listening and accepting are TCP's (the old paths stay valid).
pub use super::tcp::{listen, try_accept};
use super::{Link, sys};
use crate::config::config;
use crate::error::{Error, ErrorKind, Result, protocol};
use crate::runtime::{self, Deadline, Interest};
use crate::topology::host_identity;
use crate::value::{Key, Value};
use crate::wire::{self, FrameKind, HEADER_LEN, Header, Limits};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

const HS_LIMITS: Limits = Limits {
    max_descriptor: 64 << 10,
    max_payload: 4 << 10,
    max_segments: 8,
    max_depth: 4,
};

fn dict(items: Vec<(&str, Value)>) -> Value {
    Value::Dict(
        items
            .into_iter()
            .map(|(k, v)| (Key::Str(k.to_string()), v))
            .collect(),
    )
}

fn send_hs(fd: RawFd, kind: FrameKind, v: &Value, deadline: Deadline) -> Result<()> {
    let f = wire::encode_frame(kind, 0, v, &HS_LIMITS)?;
    runtime::send_all(fd, &[&f], deadline, "the handshake")
}

fn recv_hs(fd: RawFd, deadline: Deadline, expect: FrameKind) -> Result<Value> {
    let mut hb = [0u8; HEADER_LEN];
    if !runtime::recv_exact(fd, &mut hb, deadline, Duration::ZERO, "the handshake")? {
        return Err(Error::new(
            ErrorKind::PeerLost,
            "handshake",
            "the peer closed the connection during the handshake",
        ));
    }
    let h = Header::decode(&hb, &HS_LIMITS)?;
    let mut rest = vec![0u8; h.desc_len as usize + h.payload_len as usize];
    if !runtime::recv_exact(fd, &mut rest, deadline, Duration::ZERO, "the handshake")?
        && !rest.is_empty()
    {
        return Err(Error::new(
            ErrorKind::PeerLost,
            "handshake",
            "the peer closed the connection during the handshake",
        ));
    }
    let mut frame = hb.to_vec();
    frame.extend_from_slice(&rest);
    let (h, v) = wire::decode_frame(&frame, &HS_LIMITS)?;
    if h.kind == FrameKind::Refuse {
        let why = v
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or("no reason given")
            .to_string();
        let kind = if v.get("auth").is_some() {
            ErrorKind::Auth
        } else {
            ErrorKind::Protocol
        };
        return Err(Error::new(
            kind,
            "handshake",
            format!("the server refused the connection: {why}"),
        ));
    }
    if h.kind != expect {
        return Err(protocol(
            "handshake",
            format!("expected a {expect:?} frame, got {:?}", h.kind),
        ));
    }
    Ok(v)
}

fn bytes_field<'a>(v: &'a Value, k: &str) -> Result<&'a [u8]> {
    match v.get(k) {
        Some(Value::Bytes(b)) => Ok(b),
        _ => Err(protocol(
            "handshake",
            format!("handshake field {k:?} missing or not bytes"),
        )),
    }
}

fn proof(secret: &[u8], role: &str, nc: &[u8], ns: &[u8]) -> Mac256 {
    let mut m = Mac256::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(b"parallel/");
    m.update(role.as_bytes());
    m.update(nc);
    m.update(ns);
    m
}

type Mac256 = Hmac<Sha256>;

/// Client side: connects (retrying until the deadline), says hello, authenticates, and upgrades
/// to shared memory when possible.
pub fn connect(host: &str, port: u16, timeout: Duration) -> Result<Link> {
    connect_with(host, port, timeout, true)
}

/// [`connect`], with this connection kept on TCP when `allow_shm` is false. `true` can only
/// allow what the configuration allows: `PARALLEL_SHM=0` (here or on the server) keeps every
/// link on TCP. The link conformance suite (engine/tests/link_conformance.rs) makes a pair of
/// each kind in one process with it.
pub fn connect_with(host: &str, port: u16, timeout: Duration, allow_shm: bool) -> Result<Link> {
    let deadline = Deadline::after(timeout);
    let target = format!("{host}:{port}");
    let mut tried: Vec<String> = Vec::new();
    let mut last: Option<Error> = None;
    let mut backoff = Duration::from_millis(10);
    loop {
        match (host, port).to_socket_addrs() {
            Ok(addrs) => {
                for a in addrs {
                    if !tried.contains(&a.to_string()) {
                        tried.push(a.to_string());
                    }
                    let attempt = Deadline::after(deadline.remaining().min(Duration::from_secs(5)));
                    match connect_once(&a, attempt)
                        .and_then(|fd| client_handshake(fd, &a, deadline, allow_shm))
                    {
                        Ok(link) => return Ok(link),
                        // Refusals by a live server (auth, version) are final: retrying cannot help.
                        Err(e)
                            if matches!(
                                e.kind(),
                                ErrorKind::Auth | ErrorKind::Protocol | ErrorKind::Config
                            ) =>
                        {
                            return Err(e.with_peer(a.to_string()));
                        }
                        Err(e) => last = Some(e),
                    }
                }
            }
            Err(e) => {
                last = Some(Error::new(
                    ErrorKind::Config,
                    "connect",
                    format!("cannot resolve {host:?}: {e}"),
                ))
            }
        }
        if deadline.passed() || deadline.remaining() < backoff {
            let why = last
                .map(|e| e.to_string())
                .unwrap_or_else(|| "no address to try".into());
            return Err(Error::new(
                ErrorKind::Timeout,
                "connect",
                format!(
                    "could not connect to {target} within {:.1}s (tried {}); last error: {why}. Is the server running and reachable? (timeout=..., PARALLEL_CONNECT_TIMEOUT)",
                    timeout.as_secs_f64(),
                    if tried.is_empty() {
                        "nothing".into()
                    } else {
                        tried.join(", ")
                    }
                ),
            ));
        }
        deadline.slice("connect", &target)?;
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

fn client_handshake(
    fd: OwnedFd,
    addr: &SocketAddr,
    deadline: Deadline,
    allow_shm: bool,
) -> Result<Link> {
    let cfg = config();
    let shm_wanted = cfg.shm && allow_shm;
    let raw = fd.as_raw_fd();
    let nonce_c = sys::random_bytes::<32>()?;
    send_hs(
        raw,
        FrameKind::Hello,
        &dict(vec![
            ("host", Value::str(host_identity())),
            ("nonce", Value::bytes(nonce_c.to_vec())),
            ("shm", Value::Bool(shm_wanted)),
        ]),
        deadline,
    )?;
    let w = recv_hs(raw, deadline, FrameKind::Welcome)?;
    let nonce_s = bytes_field(&w, "nonce")?.to_vec();
    let server_auth = matches!(w.get("auth"), Some(Value::Bool(true)));
    match (&cfg.secret, server_auth) {
        (Some(secret), true) => {
            let p = bytes_field(&w, "proof")?;
            proof(secret, "server", &nonce_c, &nonce_s).verify_slice(p).map_err(|_| {
                Error::new(ErrorKind::Auth, "handshake", "the server's proof of the shared secret is wrong: the two ends have different PARALLEL_SECRET values")
            })?;
            let mine = proof(secret, "client", &nonce_c, &nonce_s)
                .finalize()
                .into_bytes()
                .to_vec();
            send_hs(
                raw,
                FrameKind::Auth,
                &dict(vec![("proof", Value::bytes(mine))]),
                deadline,
            )?;
        }
        (Some(_), false) => {
            return Err(Error::new(
                ErrorKind::Auth,
                "handshake",
                "PARALLEL_SECRET is set here but the server does not authenticate: refusing an unauthenticated server (set the same secret on the server)",
            ));
        }
        (None, true) => {
            return Err(Error::new(
                ErrorKind::Auth,
                "handshake",
                "the server requires a shared secret: set PARALLEL_SECRET (or PARALLEL_SECRET_FILE) to the server's secret",
            ));
        }
        (None, false) => {}
    }
    recv_hs(raw, deadline, FrameKind::Ready)?;
    let shm_name = match w.get("shm_name") {
        Some(Value::Str(s)) if shm_wanted => Some(s.clone()),
        _ => None,
    };
    let ipc_mine = crate::cuda::ipc_offered();
    send_hs(
        raw,
        FrameKind::Hello,
        &dict(vec![
            ("shm", Value::Bool(shm_name.is_some())),
            ("cuda_ipc", Value::Bool(ipc_mine)),
        ]),
        deadline,
    )?;
    // CUDA IPC needs the same host (the shm link) and CUDA on both ends (HS-3).
    let cuda_ipc =
        shm_name.is_some() && ipc_mine && matches!(w.get("cuda_ipc"), Some(Value::Bool(true)));
    // HS-5: a pid the peer claims is spoofable and never used; the one named is the kernel's
    // (SO_PEERCRED on the shared-memory socket), and over TCP there is none.
    let shm = match shm_name {
        Some(name) => Some(
            client_shm(&name, &nonce_s, raw, deadline)
                .map_err(|e| e.with_peer(addr.to_string()))?,
        ),
        None => None,
    };
    let peer = verified_peer(addr, shm.as_ref());
    Ok(Link::new(fd, shm, peer, cuda_ipc))
}

fn client_shm(name: &str, token: &[u8], liveness: RawFd, deadline: Deadline) -> Result<ShmEnd> {
    let cfg = config();
    let cap = Mapping::ring_bytes(cfg.shm_ring);
    let memfd = sys::memfd("parallel-ring", Mapping::total_len(cap))?;
    let bells = [
        Bells {
            data: sys::eventfd()?,
            space: sys::eventfd()?,
        },
        Bells {
            data: sys::eventfd()?,
            space: sys::eventfd()?,
        },
    ];
    let fds = [
        memfd.as_raw_fd(),
        bells[0].data.as_raw_fd(),
        bells[0].space.as_raw_fd(),
        bells[1].data.as_raw_fd(),
        bells[1].space.as_raw_fd(),
    ];
    let sock = sys::socket(libc::AF_UNIX, libc::SOCK_STREAM)?;
    let (addr, len) = sys::abstract_addr(name.as_bytes());
    // SAFETY: valid sockaddr_un.
    if unsafe {
        libc::connect(
            sock.as_raw_fd(),
            &addr as *const _ as *const libc::sockaddr,
            len,
        )
    } != 0
    {
        return Err(sys::last(
            "shm",
            "connect to the server's shared-memory socket (set PARALLEL_SHM=0 to use TCP)",
        ));
    }
    let map = Mapping::map(memfd, cap)?;
    ShmEnd::init(&map);
    // Our probe for the server's cross-memory test: 32 random bytes at a known address.
    let probe = Box::new(sys::random_bytes::<32>()?);
    let mut msg = Vec::with_capacity(SETUP_LEN);
    msg.extend_from_slice(&token[..32.min(token.len())]);
    msg.extend_from_slice(&(cap as u64).to_le_bytes());
    msg.extend_from_slice(&(probe.as_ptr() as u64).to_le_bytes());
    msg.extend_from_slice(&probe[..]);
    msg.extend_from_slice(&cfg.shm_cma_threshold.to_le_bytes());
    wait_fd(sock.as_raw_fd(), Interest::Write, deadline)?;
    sys::send_fds(sock.as_raw_fd(), &msg, &fds)?;
    // Reply: cma_ok_c2s u8 | server probe addr u64 | server probe bytes 32 | server's
    // cross-memory threshold u64
    let mut reply = [0u8; REPLY_LEN];
    read_unix(sock.as_raw_fd(), &mut reply, deadline)?;
    let server_pid = sys::peer_pid(sock.as_raw_fd())?;
    let addr = u64::from_le_bytes(reply[1..9].try_into().expect("8"));
    let mut seen = [0u8; 32];
    let cma_s2c = sys::cma_wanted()
        && sys::cma_read(server_pid, addr, &mut seen).is_ok()
        && seen == reply[9..41];
    runtime::send_all(
        sock.as_raw_fd(),
        &[&[cma_s2c as u8]],
        deadline,
        "the shared-memory set-up",
    )?;
    let mut end = ShmEnd::new(map, 0, bells, liveness, server_pid, cfg.spin);
    end.cma_send = reply[0] == 1;
    end.cma_threshold = cfg.shm_cma_threshold;
    end.peer_cma_threshold = peer_threshold(&reply[41..49])?;
    drop(probe);
    Ok(end)
}

fn wait_fd(fd: RawFd, i: Interest, deadline: Deadline) -> Result<()> {
    runtime::wait_until(
        &[(fd, i)],
        deadline,
        "handshake",
        "the shared-memory set-up",
        || {
            let mut p = libc::pollfd {
                fd,
                events: if i == Interest::Read {
                    libc::POLLIN
                } else {
                    libc::POLLOUT
                },
                revents: 0,
            };
            // SAFETY: one pollfd, zero timeout.
            Ok(unsafe { libc::poll(&mut p, 1, 0) } > 0)
        },
    )
}

fn read_unix(fd: RawFd, buf: &mut [u8], deadline: Deadline) -> Result<()> {
    if !runtime::recv_exact(
        fd,
        buf,
        deadline,
        Duration::ZERO,
        "the shared-memory set-up",
    )? {
        return Err(Error::new(
            ErrorKind::PeerLost,
            "handshake",
            "the peer closed the shared-memory set-up socket",
        ));
    }
    Ok(())
}

/// How a peer is named in errors (HS-5): its address, and over shared memory the pid the kernel
/// reports for the other end of the set-up socket (SO_PEERCRED), never a pid the peer claims.
fn verified_peer(addr: &SocketAddr, shm: Option<&ShmEnd>) -> String {
    match shm {
        Some(end) => format!("{addr} (pid {})", end.peer_pid),
        None => addr.to_string(),
    }
}

/// What the server learned about an accepted client.
#[derive(Debug)]
pub struct Accepted {
    pub link: Link,
    pub addr: SocketAddr,
}

/// Server side of the handshake (HS-1).
pub fn accept(fd: OwnedFd, addr: SocketAddr, id: u64) -> Result<Accepted> {
    let cfg = config();
    let deadline = Deadline::after(cfg.handshake_timeout);
    let raw = fd.as_raw_fd();
    sys::tune_tcp(raw);
    let hello = recv_hs(raw, deadline, FrameKind::Hello)?;
    let nonce_c = bytes_field(&hello, "nonce")?.to_vec();
    if nonce_c.len() != 32 {
        return Err(protocol("handshake", "client nonce must be 32 bytes"));
    }
    let wants_shm = matches!(hello.get("shm"), Some(Value::Bool(true)));
    let their_host = hello.get("host").and_then(Value::as_str);
    // HS-2 is the shared-memory kind's probe (KIND-2): same host identity, allowed on both ends.
    let (mine, theirs) = (
        End {
            host_id: host_identity(),
            gpus: false,
        },
        End {
            host_id: their_host.unwrap_or_default(),
            gpus: false,
        },
    );
    let policy = Policy {
        shm: cfg.shm && wants_shm && their_host.is_some(),
        cuda_ipc: false,
    };
    let nonce_s = sys::random_bytes::<32>()?;
    let shm_name = match Shm.probe(&mine, &theirs, &policy).is_some() {
        true => Some(format!(
            "parallel/{}/{}",
            std::process::id(),
            sys::random_hex::<12>()?
        )),
        false => None,
    };
    let shm_listener = match &shm_name {
        Some(n) => Some(sys::unix_listen_abstract(n.as_bytes())?),
        None => None,
    };
    let mut welcome = vec![
        ("host", Value::str(host_identity())),
        ("nonce", Value::bytes(nonce_s.to_vec())),
        ("auth", Value::Bool(cfg.secret.is_some())),
    ];
    if let Some(secret) = &cfg.secret {
        welcome.push((
            "proof",
            Value::bytes(
                proof(secret, "server", &nonce_c, &nonce_s)
                    .finalize()
                    .into_bytes()
                    .to_vec(),
            ),
        ));
    }
    if let Some(n) = &shm_name {
        welcome.push(("shm_name", Value::str(n.clone())));
    }
    let ipc_mine = shm_name.is_some() && crate::cuda::ipc_offered();
    welcome.push(("cuda_ipc", Value::Bool(ipc_mine)));
    send_hs(raw, FrameKind::Welcome, &dict(welcome), deadline)?;
    if let Some(secret) = &cfg.secret {
        let auth = recv_hs(raw, deadline, FrameKind::Auth).map_err(|e| {
            tracing::warn!("refused {addr}: no authentication ({e})");
            Error::new(
                ErrorKind::Auth,
                "accept",
                format!("client {addr} did not authenticate ({e})"),
            )
        })?;
        let ok = bytes_field(&auth, "proof")
            .map(|p| {
                proof(secret, "client", &nonce_c, &nonce_s)
                    .verify_slice(p)
                    .is_ok()
            })
            .unwrap_or(false);
        if !ok {
            tracing::warn!("refused {addr}: wrong shared secret");
            let _ = send_hs(
                raw,
                FrameKind::Refuse,
                &dict(vec![
                    (
                        "reason",
                        Value::str("wrong shared secret (PARALLEL_SECRET differs)"),
                    ),
                    ("auth", Value::Bool(true)),
                ]),
                deadline,
            );
            return Err(Error::new(
                ErrorKind::Auth,
                "accept",
                format!("client {addr} presented a wrong shared secret; refused"),
            ));
        }
    }
    send_hs(
        raw,
        FrameKind::Ready,
        &dict(vec![("id", Value::Int(id as i64))]),
        deadline,
    )?;
    let choice = recv_hs(raw, deadline, FrameKind::Hello)?;
    let shm = match (
        shm_listener,
        matches!(choice.get("shm"), Some(Value::Bool(true))),
    ) {
        (Some(l), true) => Some(
            server_shm(l, &nonce_s, raw, deadline).map_err(|e| e.with_peer(addr.to_string()))?,
        ),
        _ => None,
    };
    let peer = verified_peer(&addr, shm.as_ref()); // HS-5
    let cuda_ipc =
        shm.is_some() && ipc_mine && matches!(choice.get("cuda_ipc"), Some(Value::Bool(true)));
    Ok(Accepted {
        link: Link::new(fd, shm, peer, cuda_ipc),
        addr,
    })
}

fn server_shm(
    listener: OwnedFd,
    token: &[u8],
    liveness: RawFd,
    deadline: Deadline,
) -> Result<ShmEnd> {
    let cfg = config();
    wait_fd(listener.as_raw_fd(), Interest::Read, deadline)?;
    // SAFETY: accepting on our listener; the fd is owned on success.
    let s = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if s < 0 {
        return Err(sys::last("shm", "accept on the shared-memory socket"));
    }
    // SAFETY: fresh owned fd.
    let sock: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(s) };
    drop(listener);
    let mut msg = [0u8; SETUP_LEN];
    wait_fd(sock.as_raw_fd(), Interest::Read, deadline)?;
    let (n, mut fds) = sys::recv_fds(sock.as_raw_fd(), &mut msg, 5)?;
    if n != SETUP_LEN || msg[..32] != token[..32] {
        return Err(protocol(
            "shm",
            "shared-memory set-up message has a wrong token or size",
        ));
    }
    let cap = u64::from_le_bytes(msg[32..40].try_into().expect("8"));
    if !(64 << 10..=1 << 30).contains(&cap) {
        return Err(protocol("shm", format!("ring capacity {cap} out of range")));
    }
    let probe_addr = u64::from_le_bytes(msg[40..48].try_into().expect("8"));
    let client_pid = sys::peer_pid(sock.as_raw_fd())?;
    let mut seen = [0u8; 32];
    let cma_c2s = sys::cma_wanted()
        && sys::cma_read(client_pid, probe_addr, &mut seen).is_ok()
        && seen == msg[48..80];
    let mut it = fds.drain(..);
    let memfd = it.next().expect("5 fds");
    let b = [
        it.next().expect("5"),
        it.next().expect("5"),
        it.next().expect("5"),
        it.next().expect("5"),
    ];
    let [d0, s0, d1, s1] = b;
    let map = Mapping::map(memfd, cap as usize)?;
    let probe = Box::new(sys::random_bytes::<32>()?);
    let client_threshold = peer_threshold(&msg[80..88])?;
    let mut reply = Vec::with_capacity(REPLY_LEN);
    reply.push(cma_c2s as u8);
    reply.extend_from_slice(&(probe.as_ptr() as u64).to_le_bytes());
    reply.extend_from_slice(&probe[..]);
    reply.extend_from_slice(&cfg.shm_cma_threshold.to_le_bytes());
    runtime::send_all(
        sock.as_raw_fd(),
        &[&reply],
        deadline,
        "the shared-memory set-up",
    )?;
    let mut fin = [0u8; 1];
    read_unix(sock.as_raw_fd(), &mut fin, deadline)?;
    drop(probe);
    let mut end = ShmEnd::new(
        map,
        1,
        [
            Bells {
                data: d0,
                space: s0,
            },
            Bells {
                data: d1,
                space: s1,
            },
        ],
        liveness,
        client_pid,
        cfg.spin,
    );
    end.cma_send = fin[0] == 1;
    end.cma_threshold = cfg.shm_cma_threshold;
    end.peer_cma_threshold = client_threshold;
    Ok(end)
}

/// The shared-memory set-up message (client to server): token 32 | ring capacity u64 | probe
/// address u64 | probe bytes 32 | the client's cross-memory threshold u64.
const SETUP_LEN: usize = 88;
/// Its reply: cma_ok_c2s u8 | probe address u64 | probe bytes 32 | the server's threshold u64.
const REPLY_LEN: usize = 49;

/// The peer's `PARALLEL_SHM_CMA_THRESHOLD`: which of its segments it sends by cross-memory
/// attach is its setting, not ours, so the receiver reads each frame as it was written even
/// when the two processes were configured differently.
fn peer_threshold(b: &[u8]) -> Result<u64> {
    let t = u64::from_le_bytes(b.try_into().expect("8 bytes"));
    if t == 0 {
        return Err(protocol(
            "shm",
            "the peer announced a cross-memory threshold of 0 bytes (its minimum is 4 KiB)",
        ));
    }
    Ok(t)
}

/// Time since `t`, for logs.
pub fn since(t: Instant) -> Duration {
    t.elapsed()
}
