//! Sockets in a parked connection's client's network namespace, so that its
//! release reaches the Service as the client's own connection would: from
//! the client pod's address, through the pod's own interface, routes, CNI
//! and NetworkPolicy rules, and the node's datapath after them.
//!
//! The programs record the caller's network namespace by inode number. The
//! container runtime keeps a file per pod network namespace in one
//! directory (containerd and CRI-O: `/var/run/netns`), whose inode is the
//! namespace's; the agent finds the file by it, enters the namespace on a
//! thread of its own only long enough to create a socket (CAP_SYS_ADMIN),
//! and comes back. A socket stays in the namespace it was created in.
//!
//! What it must never do: create a socket anywhere but in the namespace
//! asked for. A thread that cannot come back to the agent's own namespace
//! stops serving, and every later request fails.

use std::{
    collections::HashMap,
    fs::File,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::PathBuf,
};

use tokio::{net::TcpSocket, sync::oneshot};

/// One socket to create.
struct Request {
    netns: u64,
    ipv6: bool,
    mark: u32,
    reply: oneshot::Sender<io::Result<OwnedFd>>,
}

/// Makes sockets in other network namespaces, on a thread of its own.
#[derive(Debug)]
pub struct Dialer {
    requests: std::sync::mpsc::Sender<Request>,
}

impl Dialer {
    /// Starts the thread; `dir` holds the runtime's netns files.
    pub fn start(dir: PathBuf) -> io::Result<Self> {
        let own = File::open("/proc/thread-self/ns/net")?;
        let own_inode = own.metadata()?.ino();
        let (requests, rx) = std::sync::mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("itw-netns".to_owned())
            .spawn(move || {
                let mut files = NetnsFiles {
                    dir,
                    by_inode: HashMap::new(),
                };
                for request in rx {
                    let result = if request.netns == own_inode {
                        new_socket(request.ipv6, request.mark)
                    } else {
                        match files.socket_in(request.netns, request.ipv6, request.mark, &own) {
                            Ok(socket) => socket,
                            Err(Stuck(error)) => {
                                tracing::error!(%error, "could not return to the agent's own network namespace: held connections can no longer be released");
                                let _ = request.reply.send(Err(io::Error::other(
                                    "the agent's netns thread is stuck in another namespace",
                                )));
                                return;
                            }
                        }
                    };
                    let _ = request.reply.send(result);
                }
            })?;
        Ok(Self { requests })
    }

    /// A TCP socket created in the network namespace whose inode is
    /// `netns`, carrying socket mark `mark` (0: none), not yet connected.
    pub async fn socket(&self, netns: u64, ipv6: bool, mark: u32) -> io::Result<TcpSocket> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request {
                netns,
                ipv6,
                mark,
                reply,
            })
            .map_err(|_| io::Error::other("the agent's netns thread has stopped"))?;
        let fd = answer
            .await
            .map_err(|_| io::Error::other("the agent's netns thread has stopped"))??;
        // SAFETY: a TCP socket the thread just created, owned by nothing else.
        Ok(unsafe { TcpSocket::from_raw_fd(fd.into_raw_fd()) })
    }
}

/// The thread could not get back to the agent's namespace.
struct Stuck(io::Error);

/// The runtime's netns files by inode, looked up again on a miss (pods come
/// and go).
struct NetnsFiles {
    dir: PathBuf,
    by_inode: HashMap<u64, PathBuf>,
}

impl NetnsFiles {
    fn find(&mut self, inode: u64) -> io::Result<File> {
        if let Some(path) = self.by_inode.get(&inode)
            && let Ok(file) = File::open(path)
            && file.metadata().is_ok_and(|m| m.ino() == inode)
        {
            return Ok(file);
        }
        self.by_inode.clear();
        for entry in std::fs::read_dir(&self.dir)?.flatten() {
            if let Ok(meta) = entry.metadata() {
                self.by_inode.insert(meta.ino(), entry.path());
            }
        }
        match self.by_inode.get(&inode) {
            Some(path) => File::open(path),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no network namespace file with inode {inode} in {}",
                    self.dir.display()
                ),
            )),
        }
    }

    /// Inner errors (namespace gone, no permission) are the request's;
    /// failing to come back is [`Stuck`].
    fn socket_in(
        &mut self,
        inode: u64,
        ipv6: bool,
        mark: u32,
        own: &File,
    ) -> Result<io::Result<OwnedFd>, Stuck> {
        let target = match self.find(inode) {
            Ok(file) => file,
            Err(error) => return Ok(Err(error)),
        };
        if let Err(error) = enter(&target) {
            return Ok(Err(error));
        }
        let socket = new_socket(ipv6, mark);
        enter(own).map_err(Stuck)?;
        Ok(socket)
    }
}

fn enter(netns: &File) -> io::Result<()> {
    // SAFETY: setns on the calling thread with a namespace descriptor.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn new_socket(ipv6: bool, mark: u32) -> io::Result<OwnedFd> {
    let domain = if ipv6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    if mark != 0 {
        super::net::set_mark(socket.as_raw_fd(), mark)?;
    }
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_socket_in_the_agents_own_namespace_needs_no_file() {
        let own = File::open("/proc/thread-self/ns/net")
            .unwrap()
            .metadata()
            .unwrap()
            .ino();
        let dialer = Dialer::start(PathBuf::from("/nonexistent")).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let socket = dialer.socket(own, false, 0).await.unwrap();
        socket
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_unknown_namespace_is_an_error_naming_the_directory() {
        let dir = std::env::temp_dir().join(format!("itw-netns-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dialer = Dialer::start(dir.clone()).unwrap();
        let error = dialer.socket(1, false, 0).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "no network namespace file with inode 1 in {}",
                dir.display()
            )
        );
        std::fs::remove_dir(&dir).unwrap();
    }
}
