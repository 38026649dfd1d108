//! Server and Client: the user-facing endpoints (the seed's Client-Server).
//!
//! A [`Server`] listens; an acceptor thread accepts connections and hands each handshake to a
//! reactor, so a slow or hostile client never blocks the others. Connections get increasing ids
//! in the order they complete their handshake. A [`Client`] connects with retry until its
//! deadline.
//!
//! Invariants:
//! - EP-1: `recv_any` is fair: it scans connections round-robin from a rotating start, so a busy
//!   client cannot starve the others.
//! - EP-2: a connection whose peer closed in order leaves the server silently; one whose peer
//!   died is reported once (a `PeerLost` error naming it from `recv_any`) and then removed.
//! - EP-3: `close()` from any thread wakes every blocked call on the endpoint, which fails with
//!   `Closed`.
//! - EP-4: asynchronous operations of one connection run on one reactor, in submission order.
//! - EP-5: no head-of-line blocking: `recv_any` reads a message inline only when all of it is
//!   already queued; a message still arriving is read by a short-lived thread of its own, under
//!   the connection's receive lock, within `PARALLEL_FRAME_TIMEOUT` (else the connection is
//!   dropped with a warning), and lands in the connection's inbox, which every receive on the
//!   connection empties first (so order is kept).
//! - EP-6: a departed client is retired within about 0.2 s whatever the application calls: the
//!   acceptor thread checks for peers that hung up and, when nothing but an orderly close is left
//!   to read, closes the connection and drops it from the server (its fds and rings are freed
//!   once the application holds no `Conn`). A death found this way is reported by the next
//!   `recv_any` (EP-2), from a bounded list.
//! - EP-7: handshakes never lock clients out: at most `MAX_HANDSHAKES` run at once, and a new
//!   connection beyond that evicts the oldest unfinished one (idle sockets age first), so a
//!   client that completes its hello promptly always gets in.
//!
//! Files: `conn` (one connection, its inbox and async handles), `client`, `server` (the
//! connections, `recv_any`, broadcast, retiring departed clients), `accept` (the acceptor thread
//! and the bound on handshakes in progress).

mod accept;
mod client;
mod conn;
mod server;

pub use client::Client;
pub use conn::Conn;
pub use server::{Server, ServerStats};
