//! `parallel-peer`: a scriptable peer process for the cross-process tests
//! (engine/tests/processes.rs). Not installed for users; it only exists so that tests can put a
//! real Parallel endpoint in another process, kill it, starve it or give it another secret.
//!
//! ```text
//! parallel-peer serve <port-file>
//!     binds 127.0.0.1:0, writes the port to <port-file> (atomically), then echoes every message
//!     that recv_any returns to its sender, until it receives the string "quit" (echoed too).
//!     A client that goes away is logged and forgotten; the whole run is bounded by 60 s.
//! parallel-peer client <port> <mode> [args]
//!     send-hi                   send "hi", close, exit 0
//!     echo-hi                   send "hi", wait for the echo and check it, close, exit 0
//!     quit                      send "quit" (stops a `serve` peer), wait for the echo, exit 0
//!     send-then-hang            send "hi", then sleep 60 s (the test kills it)
//!     big <nbytes>              send a u8 tensor of <nbytes> with a known pattern, wait for the
//!                               echo and verify it byte for byte
//!     die-mid-send <nbytes> <delay-ms>
//!                               start sending a u8 tensor of <nbytes>; another thread aborts the
//!                               process <delay-ms> after the send started
//! ```
//! Exit codes: 0 success, 2 usage, 3 an engine error (its text on stderr), 4 a failed check.
//! Configuration comes from the inherited `PARALLEL_*` environment, like any Parallel process;
//! progress lines go to stdout ("port N", "sending", "sent"), errors to stderr.
#![allow(clippy::print_stdout, clippy::print_stderr)] // test helper binary: reports on stdio

#[path = "../../tests/common/pattern.rs"]
mod pattern;

use parallel_engine::{Client, DType, ErrorKind, Server, Tensor, Value};
use pattern::pattern;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const SERVE_FOR: Duration = Duration::from_secs(60);
const CONNECT: Option<Duration> = Some(Duration::from_secs(10));
const REPLY: Option<Duration> = Some(Duration::from_secs(30));

/// Why the peer failed, mapped to its exit code.
enum Fail {
    Usage(String),
    Engine(parallel_engine::Error),
    Check(String),
}

impl From<parallel_engine::Error> for Fail {
    fn from(e: parallel_engine::Error) -> Fail {
        Fail::Engine(e)
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = match args.as_slice() {
        ["serve", port_file] => serve(port_file),
        ["client", port, mode, rest @ ..] => port
            .parse::<u16>()
            .map_err(|_| Fail::Usage(format!("bad port {port:?}")))
            .and_then(|p| client(p, mode, rest)),
        _ => Err(Fail::Usage(format!("unknown arguments {args:?}"))),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail::Usage(m)) => {
            eprintln!(
                "parallel-peer: usage error: {m}\nusage: parallel-peer serve <port-file> | client <port> <mode> [args]"
            );
            ExitCode::from(2)
        }
        Err(Fail::Engine(e)) => {
            eprintln!("parallel-peer: error ({:?}): {e}", e.kind());
            ExitCode::from(3)
        }
        Err(Fail::Check(m)) => {
            eprintln!("parallel-peer: check failed: {m}");
            ExitCode::from(4)
        }
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn serve(port_file: &str) -> Result<(), Fail> {
    let server = Server::bind("127.0.0.1", 0)?;
    // Write then rename, so a test polling the file never reads a partial port number.
    let tmp = format!("{port_file}.tmp");
    std::fs::write(&tmp, server.port().to_string())
        .and_then(|_| std::fs::rename(&tmp, port_file))
        .map_err(|e| Fail::Usage(format!("cannot write the port file {port_file:?}: {e}")))?;
    say(&format!("port {}", server.port()));
    let deadline = Instant::now() + SERVE_FOR;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (v, conn) = match server.recv_any(None, Some(left)) {
            Ok(x) => x,
            // One client going away is that client's problem (EP-2), not the server's.
            Err(e) if matches!(e.kind(), ErrorKind::PeerLost | ErrorKind::Closed) => {
                eprintln!("parallel-peer serve: a client went away: {e}");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let quit = v.as_str() == Some("quit");
        if let Err(e) = conn.send(&v, REPLY) {
            eprintln!("parallel-peer serve: cannot echo to {}: {e}", conn.peer());
        }
        if quit {
            server.close();
            return Ok(());
        }
    }
}

fn arg<T: std::str::FromStr>(rest: &[&str], i: usize, what: &str) -> Result<T, Fail> {
    rest.get(i)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Fail::Usage(format!("missing or malformed <{what}>")))
}

fn client(port: u16, mode: &str, rest: &[&str]) -> Result<(), Fail> {
    let c = Client::connect("127.0.0.1", port, CONNECT)?;
    match mode {
        "send-hi" => c.send(&Value::str("hi"))?,
        "echo-hi" => expect_echo(&c, "hi")?,
        "quit" => expect_echo(&c, "quit")?,
        "send-then-hang" => {
            c.send(&Value::str("hi"))?;
            say("sent");
            std::thread::sleep(SERVE_FOR);
            return Err(Fail::Check(
                "send-then-hang was not killed within 60 s".into(),
            ));
        }
        "big" => big(&c, arg(rest, 0, "nbytes")?)?,
        "die-mid-send" => die_mid_send(&c, arg(rest, 0, "nbytes")?, arg(rest, 1, "delay-ms")?)?,
        m => return Err(Fail::Usage(format!("unknown client mode {m:?}"))),
    }
    c.close();
    Ok(())
}

fn expect_echo(c: &Client, s: &str) -> Result<(), Fail> {
    c.send(&Value::str(s))?;
    match c.recv(REPLY)? {
        v if v.as_str() == Some(s) => Ok(()),
        v => Err(Fail::Check(format!("expected the echo {s:?}, got {v:?}"))),
    }
}

fn big(c: &Client, n: usize) -> Result<(), Fail> {
    c.send(&Value::Tensor(Tensor::from_bytes(
        DType::U8,
        vec![n],
        pattern(n),
    )?))?;
    say("sent");
    let v = c.recv(REPLY)?;
    let t = v
        .as_tensor()
        .ok_or_else(|| Fail::Check(format!("expected a tensor back, got a {}", v.type_name())))?;
    if t.dtype() != DType::U8 || t.shape() != [n] {
        return Err(Fail::Check(format!(
            "echo is {} {:?}, sent uint8 [{n}]",
            t.dtype().name(),
            t.shape()
        )));
    }
    let got = t
        .bytes()
        .ok_or_else(|| Fail::Check("echoed tensor is not contiguous".into()))?;
    match first_difference(got, &pattern(n)) {
        None => Ok(()),
        Some(i) => Err(Fail::Check(format!(
            "echo differs from what was sent at byte {i} of {n}"
        ))),
    }
}

fn die_mid_send(c: &Client, n: usize, delay_ms: u64) -> Result<(), Fail> {
    no_core_dumps();
    let v = Value::Tensor(Tensor::from_bytes(DType::U8, vec![n], vec![0xa5; n])?);
    say("sending");
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(delay_ms));
        std::process::abort();
    });
    let r = c.send(&v);
    // The receiver may have taken the whole message before the abort: wait for it anyway, so the
    // process always dies by SIGABRT and the test sees one kind of death.
    say(&format!(
        "send returned {:?}",
        r.as_ref().map_err(|e| e.kind())
    ));
    std::thread::sleep(SERVE_FOR);
    Err(Fail::Check("the abort thread did not fire".into()))
}

/// Keeps an aborting peer from writing a core file wherever the host's core pattern points.
fn no_core_dumps() {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads one valid, initialised rlimit struct; it affects only this process.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
}

/// The first offset where `a` and `b` differ (or where the shorter one ends).
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        return None;
    }
    Some(
        a.iter()
            .zip(b)
            .position(|(x, y)| x != y)
            .unwrap_or(a.len().min(b.len())),
    )
}
