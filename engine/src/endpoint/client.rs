//! A client: one connection to a server, set up with retry until its deadline.

use super::Conn;
use crate::config::config;
use crate::error::Result;
use crate::link::handshake;
use crate::link::{LinkKind, Stats};
use crate::runtime;
use crate::value::{Tensor, Value};
use std::sync::Arc;
use std::time::Duration;

/// A client: one connection to a server.
#[derive(Debug, Clone)]
pub struct Client {
    conn: Arc<Conn>,
}

impl Client {
    /// Connects to `host:port`, retrying until `timeout` (default `PARALLEL_CONNECT_TIMEOUT`).
    pub fn connect(host: &str, port: u16, timeout: Option<Duration>) -> Result<Client> {
        runtime::backend()?;
        let link = handshake::connect(host, port, timeout.unwrap_or(config().connect_timeout))?;
        Ok(Client {
            conn: Arc::new(Conn::new(link, 0)),
        })
    }
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }
    pub fn send(&self, v: &Value) -> Result<()> {
        self.conn.send(v, None)
    }
    pub fn send_timeout(&self, v: &Value, timeout: Option<Duration>) -> Result<()> {
        self.conn.send(v, timeout)
    }
    pub fn recv(&self, timeout: Option<Duration>) -> Result<Value> {
        self.conn.recv(timeout)
    }
    pub fn recv_into(&self, out: &mut [Tensor], timeout: Option<Duration>) -> Result<Value> {
        self.conn.recv_into(out, timeout)
    }
    pub fn link_kind(&self) -> LinkKind {
        self.conn.link_kind()
    }
    pub fn peer(&self) -> &str {
        self.conn.peer()
    }
    pub fn stats(&self) -> Stats {
        self.conn.stats()
    }
    pub fn close(&self) {
        self.conn.close()
    }
}
