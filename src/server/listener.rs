//! The listening socket on `PROXY_HOST`:`PROXY_PORT`.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

/// Connections waiting to be accepted; the kernel caps it at `somaxconn`.
const BACKLOG: i32 = 1024;

/// Binds `address`. `::` accepts IPv4 as well (`IPV6_V6ONLY` off, whatever the system default
/// says); `::1` and other IPv6 addresses only IPv6.
pub fn bind(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    if let IpAddr::V6(ip) = address.ip() {
        socket.set_only_v6(!ip.is_unspecified())?;
    }
    // A restart must not fail on the previous process's connections still in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Whether only this machine can reach `host`.
pub fn is_loopback_only(host: IpAddr) -> bool {
    host.is_loopback()
}
