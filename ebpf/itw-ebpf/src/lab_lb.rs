//! The node lab's socket load balancer: a stand-in for Cilium's kube-proxy
//! replacement, never loaded by the agent.
//!
//! `cgroup/connect4` and `connect6`, attached by the lab at its node's cgroup
//! root (once as usual, once with `BPF_F_PREORDER`), do in the kernel what a
//! socket load balancer does before `tcp_v4_connect`: a connect to a
//! ClusterIP:port in `LAB_LB_SERVICES` is rewritten to one of its ready
//! backends, and refused (EPERM) when it has none. Anything else passes
//! untouched. The lab fills the map from the same EndpointSlices the agent
//! reads, some time after each change, as a real agent would.

#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::bpf_get_prandom_u32,
    macros::{cgroup_sock_addr, map},
    maps::HashMap,
    programs::SockAddrContext,
};
use itw_common::{
    Destination,
    lab::{LbService, MAX_BACKENDS, SERVICES_CAPACITY},
};

#[map(name = "LAB_LB_SERVICES")]
static LAB_LB_SERVICES: HashMap<Destination, LbService> =
    HashMap::with_max_entries(SERVICES_CAPACITY, 0);

const SOCK_STREAM: u32 = 1;
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn lab_lb_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel passes a valid bpf_sock_addr; each field is read and
    // written with the one-word access the verifier allows for it.
    unsafe {
        if read(&raw const (*sa).type_) != SOCK_STREAM {
            return ALLOW;
        }
        let addr = read(&raw const (*sa).user_ip4).to_ne_bytes();
        let port = u16::from_be(read(&raw const (*sa).user_port) as u16);
        let Some(backend) = pick(&Destination::v4(addr, port)) else {
            return ALLOW;
        };
        let Some(backend) = backend else {
            return REFUSE;
        };
        let a = backend.addr;
        write(
            &raw mut (*sa).user_ip4,
            u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
        );
        write(&raw mut (*sa).user_port, u32::from(backend.port.to_be()));
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn lab_lb_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in lab_lb_connect4.
    unsafe {
        if read(&raw const (*sa).type_) != SOCK_STREAM {
            return ALLOW;
        }
        let words = &raw mut (*sa).user_ip6;
        let mut addr = [0u8; 16];
        for (i, chunk) in addr.chunks_exact_mut(4).enumerate() {
            chunk.copy_from_slice(&read(words.cast::<u32>().add(i)).to_ne_bytes());
        }
        let port = u16::from_be(read(&raw const (*sa).user_port) as u16);
        let Some(backend) = pick(&Destination::new(addr, port)) else {
            return ALLOW;
        };
        let Some(backend) = backend else {
            return REFUSE;
        };
        for (i, chunk) in backend.addr.chunks_exact(4).enumerate() {
            let word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            write(words.cast::<u32>().add(i), word);
        }
        write(&raw mut (*sa).user_port, u32::from(backend.port.to_be()));
    }
    ALLOW
}

/// `None`: not a Service; `Some(None)`: a Service without a ready backend;
/// else a backend chosen at random, as Cilium's random selection does.
#[inline(always)]
fn pick(service: &Destination) -> Option<Option<Destination>> {
    // SAFETY: a copy of the value, taken under the program's RCU section.
    let entry = unsafe { LAB_LB_SERVICES.get(service) }?;
    let count = entry.count as usize;
    if count == 0 {
        return Some(None);
    }
    // SAFETY: a helper without arguments.
    let random = unsafe { bpf_get_prandom_u32() } as usize;
    // The mask bounds the index for the verifier (MAX_BACKENDS is a power
    // of two, and the lab never sets more); it changes no index below it.
    let index = (random % count) & (MAX_BACKENDS - 1);
    Some(entry.backends.get(index).copied())
}

#[inline(always)]
unsafe fn read(field: *const u32) -> u32 {
    // SAFETY: the caller passes a field of the context.
    unsafe { core::ptr::read_volatile(field) }
}

#[inline(always)]
unsafe fn write(field: *mut u32, value: u32) {
    // SAFETY: the caller passes a writable field of the context.
    unsafe { core::ptr::write_volatile(field, value) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
