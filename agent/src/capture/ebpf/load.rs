//! The embedded object loaded into the kernel: its maps sized and its
//! globals set from the settings, then the programs of one mode attached
//! ([`Attached`]), with the fallbacks a host may need.
//!
//! Loading never leaves a program attached on failure: the object owns
//! everything, and dropping it on an error detaches what was attached.

use aya::{Ebpf, EbpfLoader};
use itw_common::{capacity, globals, maps, programs};

use super::{
    CommSource, LeaderRead, LoadedObjects,
    attach::{Attachment, Hooks, program_error},
    settings::CaptureSettings,
};
use crate::capture::{CaptureError, btf::TaskOffsets, tracefs::SetStateOffsets};

/// The programs, built by `hack/build-ebpf` for this target's architecture
/// (the kprobe programs read `pt_regs`, laid out per CPU).
#[cfg(target_arch = "x86_64")]
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../ebpf/artifacts/x86_64/itw.o"
));
#[cfg(target_arch = "aarch64")]
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../ebpf/artifacts/aarch64/itw.o"
));
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!(
    "the eBPF programs are built for x86_64 and aarch64 only (hack/build-ebpf ARCHES): their kprobe programs read pt_regs, whose layout is the CPU's"
);

/// Every program of the object, whatever the mode.
const ALL_PROGRAMS: [&str; 10] = [
    programs::CONNECT4,
    programs::CONNECT6,
    programs::CONNECT4_PODS,
    programs::CONNECT6_PODS,
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
    programs::TCP_V4_CONNECT,
    programs::TCP_V6_CONNECT,
    programs::INET_SOCK_SET_STATE,
    programs::SOCK_OPS,
];

/// The loaded object with the programs of one mode attached.
pub(super) struct Attached {
    pub ebpf: Ebpf,
    /// The hooks it ended up on (after any fallback).
    pub hooks: Hooks,
    pub attachment: Attachment,
    pub objects: LoadedObjects,
    /// The programs hold (cgroup mode with holding asked for).
    pub holding: bool,
}

impl Attached {
    /// [`Attached::new`], and again on the hooks to fall back to (see
    /// [`Hooks::fallback`]) when attaching fails in a way that has one.
    /// Each try loads the object afresh: its globals depend on the hooks.
    pub(super) fn with_fallback(
        settings: &CaptureSettings,
        hooks: &Hooks,
        comm: &CommSource,
    ) -> Result<Self, CaptureError> {
        let mut hooks = hooks.clone();
        loop {
            match Self::new(settings, &hooks, comm) {
                Err(error) => match hooks.fallback(&error, settings)? {
                    Some(next) => {
                        tracing::warn!(%error, from = ?hooks, to = ?next, "attaching the cgroup programs another way");
                        hooks = next;
                    }
                    None => return Err(error),
                },
                ok => return ok,
            }
        }
    }

    fn new(
        settings: &CaptureSettings,
        hooks: &Hooks,
        comm: &CommSource,
    ) -> Result<Self, CaptureError> {
        let comm_from_leader = comm.global();
        let leader = match comm {
            CommSource::Leader { offsets, .. } => *offsets,
            CommSource::Thread { .. } => TaskOffsets {
                group_leader: 0,
                comm: 0,
                netns: None,
                cgroup: None,
            },
        };
        let tp = match hooks {
            Hooks::Tracepoint(offsets) => *offsets,
            Hooks::Cgroup { .. } | Hooks::Kprobe => SetStateOffsets::UNATTACHED,
        };
        // The kernel wants a ring buffer of a power-of-two number of pages.
        // SAFETY: sysconf only reads a system setting.
        let page_size = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(4096);
        let wakes_bytes = capacity::WAKES_BYTES.max(page_size);

        let pods = match hooks {
            Hooks::Cgroup { pods, .. } => pods.as_ref(),
            Hooks::Kprobe | Hooks::Tracepoint(_) => None,
        };
        // Rewriting needs the connect hooks: cgroup mode only.
        let hold = settings
            .hold
            .as_ref()
            .filter(|_| matches!(hooks, Hooks::Cgroup { .. }));
        let hold_enabled = u32::from(hold.is_some());
        let hold_mark = hold.map_or(0, |h| h.mark);
        let (max_per_service, max_per_node) =
            hold.map_or((0, 0), |h| (h.max_per_service, h.max_per_node));
        let netns = leader
            .netns
            .map_or((0, 0, 0), |n| (n.nsproxy, n.net_ns, n.inum));
        // Read through the BTF-typed task only where the name is (the
        // programs then have that pointer at hand); else the helper call.
        let cgroup = leader
            .cgroup
            .filter(|_| {
                matches!(
                    comm,
                    CommSource::Leader {
                        read: LeaderRead::Btf,
                        ..
                    }
                )
            })
            .map_or((0, 0, 0, 0), |c| (c.cgroups, c.dfl_cgrp, c.kn, c.id));
        let park_ip4 = hold
            .and_then(|h| h.park_ip4)
            .map_or(0, |ip| u32::from_ne_bytes(ip.octets()));
        let park_ip6 = hold.and_then(|h| h.park_ip6).map_or([0u32; 4], |ip| {
            let o = ip.octets();
            [0, 4, 8, 12].map(|i| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]))
        });
        let pods_id = pods.map_or(0, |p| p.id);

        let mut loader = EbpfLoader::new();
        loader
            // The object carries no BTF and needs no relocation against the
            // kernel's. (aya 0.14's EbpfLoader::new parses the kernel's BTF
            // all the same; this only keeps it from being used.)
            .btf(None)
            .map_max_entries(maps::WATCHED, settings.max_destinations)
            .map_max_entries(maps::ATTEMPTS, settings.max_attempt_counters)
            .map_max_entries(maps::COUNTERS, settings.max_attempt_counters)
            .map_max_entries(maps::FREE_COUNTERS, settings.max_attempt_counters)
            .map_max_entries(maps::OVERFLOW, settings.max_destinations)
            .map_max_entries(maps::WAKES, wakes_bytes)
            .override_global(globals::COMM_FROM_LEADER, &comm_from_leader, true)
            .override_global(
                globals::TASK_GROUP_LEADER_OFFSET,
                &leader.group_leader,
                true,
            )
            .override_global(globals::TASK_COMM_OFFSET, &leader.comm, true)
            .override_global(globals::TP_NEWSTATE_OFFSET, &tp.newstate, true)
            .override_global(globals::TP_DPORT_OFFSET, &tp.dport, true)
            .override_global(globals::TP_FAMILY_OFFSET, &tp.family, true)
            .override_global(globals::TP_PROTOCOL_OFFSET, &tp.protocol, true)
            .override_global(globals::TP_DADDR_OFFSET, &tp.daddr, true)
            .override_global(globals::TP_DADDR_V6_OFFSET, &tp.daddr_v6, true)
            .override_global(globals::HOLD_ENABLED, &hold_enabled, true)
            .override_global(globals::HOLD_MARK, &hold_mark, true)
            .override_global(globals::PARK_IP4, &park_ip4, true)
            .override_global(globals::PARK_IP6, &park_ip6, true)
            .override_global(globals::POD_CGROUP_ID, &pods_id, true)
            .override_global(globals::HOLD_MAX_PER_SERVICE, &max_per_service, true)
            .override_global(globals::HOLD_MAX_PER_NODE, &max_per_node, true)
            .override_global(globals::TASK_NSPROXY_OFFSET, &netns.0, true)
            .override_global(globals::NSPROXY_NET_OFFSET, &netns.1, true)
            .override_global(globals::NET_INUM_OFFSET, &netns.2, true)
            .override_global(globals::TASK_CGROUPS_OFFSET, &cgroup.0, true)
            .override_global(globals::CSS_SET_DFL_CGRP_OFFSET, &cgroup.1, true)
            .override_global(globals::CGROUP_KN_OFFSET, &cgroup.2, true)
            .override_global(globals::KERNFS_NODE_ID_OFFSET, &cgroup.3, true);
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| CaptureError::Load(Box::new(e)))?;

        let attachment = hooks.attach(&mut ebpf, hold.is_some())?;
        let objects = loaded_objects(&ebpf)?;
        Ok(Self {
            ebpf,
            hooks: hooks.clone(),
            attachment,
            objects,
            holding: hold.is_some(),
        })
    }
}

/// The loaded programs' ids and the ids of the maps they use.
fn loaded_objects(ebpf: &Ebpf) -> Result<LoadedObjects, CaptureError> {
    let mut objects = LoadedObjects::default();
    for name in ALL_PROGRAMS {
        let Some(prog) = ebpf.program(name) else {
            continue;
        };
        // Programs of other modes are in the object but not in the kernel.
        if prog.fd().is_err() {
            continue;
        }
        let info = prog.info().map_err(program_error(name, "inspect"))?;
        objects.programs.push((name, info.id()));
        // aya 0.14 reads map ids by re-opening the program by id, which
        // needs CAP_SYS_ADMIN; the DaemonSet runs without it. The ids only
        // serve logs and tests (which run as full root), so go without.
        for id in info.map_ids().ok().flatten().unwrap_or_default() {
            if !objects.maps.contains(&id) {
                objects.maps.push(id);
            }
        }
    }
    objects.maps.sort_unstable();
    Ok(objects)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_object_has_every_program_and_map() {
        let obj = aya_obj::Object::parse(OBJECT).unwrap();
        for name in ALL_PROGRAMS {
            assert!(obj.programs.contains_key(name), "no program {name}");
        }
        for name in [
            maps::WATCHED,
            maps::EXCLUDED,
            maps::EXCLUDED_HINT,
            maps::ATTEMPTS,
            maps::COUNTERS,
            maps::FREE_COUNTERS,
            maps::LAST_CALLERS,
            maps::OVERFLOW,
            maps::FILTERED,
            maps::WAKES,
            maps::STATS,
            maps::HOLD,
            maps::HOLD_COUNT,
            maps::PARKED,
            maps::POD_LEVEL,
            maps::HOLD_REDIRECTS,
            maps::HOLD_CONNS,
            maps::HOLD_ADMITTED,
            maps::HOLD_FINISHED,
            maps::HOLD_REFUSED,
        ] {
            assert!(obj.maps.contains_key(name), "no map {name}");
        }
    }
}
