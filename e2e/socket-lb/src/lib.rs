//! A socket load balancer at the node's cgroup root, as Cilium's kube-proxy
//! replacement runs one: `lab-lb.o`'s connect programs rewrite a ClusterIP
//! to a ready backend and refuse a Service without one, before
//! `tcp_v4_connect` ever runs. Attached once as usual (after the programs of
//! child cgroups, such as the agent's in the pods' cgroup) and once with
//! `BPF_F_PREORDER` (Linux 6.15 and later: before them).
//!
//! The node lab's (`itw-e2e`) stand-in for Cilium's, in a crate of its own so
//! the agent's hold tests can put one in front of the agent's programs
//! without depending on the lab (which depends on the agent for its tests).

use std::{
    collections::BTreeSet,
    fs::File,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData},
    programs::{CgroupAttachMode, CgroupSockAddr},
};
use itw_common::{
    Destination,
    lab::{self, LbService, MAX_BACKENDS},
};

/// One Service port on one ClusterIP, and where it leads now.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Frontend {
    /// `namespace/service:port-name`, for comments and chain names.
    pub name: String,
    pub cluster_ip: IpAddr,
    pub port: u16,
    /// Ready endpoints (address and target port); empty: refused.
    pub backends: Vec<SocketAddr>,
}

impl Frontend {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.cluster_ip, self.port)
    }
}

#[cfg(target_arch = "x86_64")]
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../ebpf/artifacts/x86_64/lab-lb.o"
));
#[cfg(target_arch = "aarch64")]
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../ebpf/artifacts/aarch64/lab-lb.o"
));
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!(
    "the eBPF programs are built for x86_64 and aarch64 only (hack/build-ebpf ARCHES): their kprobe programs read pt_regs, whose layout is the CPU's"
);

/// `BPF_F_PREORDER` (include/uapi/linux/bpf.h): run before the programs of
/// descendant cgroups.
pub const BPF_F_PREORDER: u32 = 1 << 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;

/// The loaded and attached load balancer; detached when dropped.
pub struct SocketLb {
    services: HashMap<MapData, Destination, LbService>,
    installed: BTreeSet<Destination>,
    /// Links made by hand (with flags aya 0.14 cannot pass).
    _links: Vec<OwnedFd>,
    /// Owns the programs (and aya's own links).
    _ebpf: Ebpf,
}

impl SocketLb {
    /// Loads the programs and attaches them to `cgroup` (the node's root).
    pub fn attach(cgroup: &Path, preorder: bool) -> anyhow::Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .load(OBJECT)
            .context("loading lab-lb.o")?;
        let dir = File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
        let mut links = Vec::new();
        for (name, attach_type) in [
            (lab::CONNECT4, BPF_CGROUP_INET4_CONNECT),
            (lab::CONNECT6, BPF_CGROUP_INET6_CONNECT),
        ] {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("lab-lb.o has no program {name}"))?
                .try_into()?;
            program.load().with_context(|| format!("loading {name}"))?;
            if preorder {
                let fd = program.fd()?.as_fd().as_raw_fd();
                links.push(
                    link_create(fd, dir.as_raw_fd(), attach_type, BPF_F_PREORDER)
                        .with_context(|| format!("attaching {name} with BPF_F_PREORDER"))?,
                );
            } else {
                program
                    .attach(dir.as_fd(), CgroupAttachMode::Single)
                    .with_context(|| format!("attaching {name}"))?;
            }
        }
        let services = HashMap::try_from(
            ebpf.take_map(lab::SERVICES)
                .context("lab-lb.o has no services map")?,
        )?;
        Ok(Self {
            services,
            installed: BTreeSet::new(),
            _links: links,
            _ebpf: ebpf,
        })
    }

    /// Makes the map say what `frontends` say.
    pub fn apply(&mut self, frontends: &[Frontend]) -> anyhow::Result<()> {
        let mut now = BTreeSet::new();
        for frontend in frontends {
            let key = destination(frontend.addr());
            if frontend.backends.len() > MAX_BACKENDS {
                bail!(
                    "{}: {} backends, the stand-in takes {MAX_BACKENDS}",
                    frontend.name,
                    frontend.backends.len()
                );
            }
            let mut value = LbService {
                count: frontend.backends.len() as u32,
                _pad: 0,
                backends: [Destination::new([0; 16], 0); MAX_BACKENDS],
            };
            for (slot, backend) in value.backends.iter_mut().zip(&frontend.backends) {
                *slot = destination(*backend);
            }
            self.services.insert(key, value, 0)?;
            now.insert(key);
        }
        for gone in self.installed.difference(&now) {
            self.services.remove(gone)?;
        }
        self.installed = now;
        Ok(())
    }
}

/// The map key of an address: IPv4 stored v4-mapped.
fn destination(addr: std::net::SocketAddr) -> Destination {
    match addr.ip() {
        std::net::IpAddr::V4(ip) => Destination::v4(ip.octets(), addr.port()),
        std::net::IpAddr::V6(ip) => Destination::new(ip.octets(), addr.port()),
    }
}

/// `BPF_LINK_CREATE` of a cgroup program with `flags`.
pub fn link_create(
    prog_fd: i32,
    cgroup_fd: i32,
    attach_type: u32,
    flags: u32,
) -> std::io::Result<OwnedFd> {
    // struct { prog_fd, target_fd, attach_type, flags, then unions left zero }
    let mut attr = [0u32; 16];
    attr[0] = prog_fd as u32;
    attr[1] = cgroup_fd as u32;
    attr[2] = attach_type;
    attr[3] = flags;
    // SAFETY: the bpf syscall reads `size` bytes of `attr`, which is that long.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
