//! The seed's client/server example, in Rust.
#![allow(clippy::print_stdout)] // an example prints what it does

use parallel_engine::{Client, Server, Value};

fn main() -> parallel_engine::Result<()> {
    // Create a server (port 0: the OS picks a free port)
    let server = Server::bind("127.0.0.1", 0)?;
    // Create a client and connect to the server
    let client = Client::connect("127.0.0.1", server.port(), None)?;
    // Say hello
    client.send(&Value::str("hi"))?;
    // Listen for any client to say something
    let (msg, _conn) = server.recv_any(None, None)?;
    assert_eq!(msg.as_str(), Some("hi"));
    println!(
        "server received {:?} over {}",
        msg.as_str().unwrap_or_default(),
        client.link_kind().name()
    );
    // Disconnect and shut down
    client.close();
    server.close();
    Ok(())
}
