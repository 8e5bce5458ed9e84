//! Socket details of holding: the agent's exempt connects, resets, and the
//! node address parking listeners default to.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd, RawFd},
    time::Duration,
};

use tokio::net::{TcpSocket, TcpStream};

/// How long the agent waits for a released connection's Service to answer.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live T of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets socket mark `mark` (SO_MARK needs CAP_NET_ADMIN).
pub fn set_mark(fd: RawFd, mark: u32) -> io::Result<()> {
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_MARK, &mark)
}

/// Whether this process may set socket mark `mark`: tried once on a socket
/// of its own, so a missing capability is a failed start, not a reset
/// client at every release.
pub fn can_mark(mark: u32) -> io::Result<()> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    set_mark(socket.as_raw_fd(), mark)
}

/// Connects to `addr` with socket mark `mark`, which the agent's programs
/// let through unheld and uncounted (SO_MARK needs CAP_NET_ADMIN). Mark 0
/// is none (the agent's settings never take it; tests without the
/// capability do).
pub async fn connect_marked(addr: SocketAddr, mark: u32) -> io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if mark != 0 {
        set_mark(socket.as_raw_fd(), mark)?;
    }
    match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, socket.connect(addr)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {UPSTREAM_CONNECT_TIMEOUT:?}"),
        )),
    }
}

/// A cold start gathers callers: a burst of them must wait in the
/// listener's queue, not have their handshakes dropped (std listens with a
/// backlog of 128). The kernel caps it at `net.core.somaxconn`.
pub fn widen_backlog(listener: std::net::TcpListener) -> io::Result<std::net::TcpListener> {
    // SAFETY: listen(2) on a socket we own; calling it again on a listening
    // socket only changes its backlog.
    if unsafe { libc::listen(listener.as_raw_fd(), 4096) } == 0 {
        Ok(listener)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Closes `stream` with a reset (RST), so its client sees an error at once
/// instead of an orderly end of a reply that never came.
pub fn reset(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    if let Err(error) = setsockopt(
        stream.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_LINGER,
        &linger,
    ) {
        tracing::debug!(%error, "SO_LINGER 0 refused; closing normally");
    }
    drop(stream);
}

/// The IPv4 address of the interface of the default route: the node's IP
/// on a typical node, reachable from every pod.
pub fn default_route_ipv4() -> Result<Ipv4Addr, String> {
    let routes = std::fs::read_to_string("/proc/net/route")
        .map_err(|e| format!("reading /proc/net/route: {e}"))?;
    let iface =
        default_route_interface(&routes).ok_or_else(|| "no IPv4 default route".to_owned())?;
    interface_ipv4(&iface)?.ok_or_else(|| format!("interface {iface} has no IPv4 address"))
}

/// The interface of the default route in a `/proc/net/route` table (the
/// one with the lowest metric).
pub fn default_route_interface(table: &str) -> Option<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (iface, dest, mask, metric) = (
                fields.first()?,
                fields.get(1)?,
                fields.get(7)?,
                fields.get(6)?,
            );
            (*dest == "00000000" && *mask == "00000000")
                .then(|| Some((metric.parse::<u32>().ok()?, (*iface).to_owned())))?
        })
        .min()
        .map(|(_, iface)| iface)
}

fn interface_ipv4(name: &str) -> Result<Option<Ipv4Addr>, String> {
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `addrs` with a list freed below.
    if unsafe { libc::getifaddrs(&mut addrs) } != 0 {
        return Err(format!("getifaddrs: {}", io::Error::last_os_error()));
    }
    let mut found = None;
    let mut cursor = addrs;
    while !cursor.is_null() {
        // SAFETY: a node of the list getifaddrs returned, alive until freeifaddrs.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_addr.is_null() || entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string; ifa_addr a sockaddr
        // whose family says its real type.
        let (ifname, family) = unsafe {
            (
                std::ffi::CStr::from_ptr(entry.ifa_name),
                i32::from((*entry.ifa_addr).sa_family),
            )
        };
        if family == libc::AF_INET && ifname.to_bytes() == name.as_bytes() {
            // SAFETY: an AF_INET address is a sockaddr_in.
            let sin = unsafe { &*entry.ifa_addr.cast::<libc::sockaddr_in>() };
            found = Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            break;
        }
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(addrs) };
    Ok(found)
}

/// Whether pods (in network namespaces of their own) can reach `ip`: not a
/// loopback address, which is each pod's own.
pub fn reachable_from_pods(ip: IpAddr) -> bool {
    !ip.is_loopback() && !ip.is_unspecified()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_route_with_the_lowest_metric_wins() {
        let table = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
wlan0\t00000000\t0100A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0
";
        assert_eq!(default_route_interface(table).as_deref(), Some("eth0"));
        let no_default = "Iface\tDestination\tGateway\n\
eth0\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(default_route_interface(no_default), None);
        assert_eq!(default_route_interface(""), None);
    }

    #[test]
    fn loopback_is_not_reachable_from_pods() {
        assert!(!reachable_from_pods("127.0.0.1".parse().unwrap()));
        assert!(!reachable_from_pods("::1".parse().unwrap()));
        assert!(!reachable_from_pods("0.0.0.0".parse().unwrap()));
        assert!(reachable_from_pods("169.254.20.1".parse().unwrap()));
        assert!(reachable_from_pods("10.0.0.4".parse().unwrap()));
    }
}
