//! Offsets in the running kernel's `task_struct`, from its BTF
//! (`/sys/kernel/btf/vmlinux`), for the programs to read the process name
//! (`current->group_leader->comm`), the caller's cgroup v2 id
//! (`current->cgroups->dfl_cgrp->kn->id`) and, for holding, the caller's
//! network namespace (`current->nsproxy->net_ns->ns.inum`).
//!
//! aya's Rust programs have no CO-RE relocations, and `task_struct`'s layout
//! depends on the kernel's version and configuration, so the agent looks the
//! two offsets up at start and passes them in as globals.
//!
//! Parser: the `btf-rs` crate. aya-obj parses BTF too, but keeps struct
//! members and type lookup crate-private; btf-rs exposes both, can map the
//! file instead of parsing all ~150k kernel types up front (the agent's
//! memory budget is small), and needs no C library.

use std::path::Path;

use btf_rs::{Btf, Type};

/// Where the kernel publishes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Byte offsets in `struct task_struct`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskOffsets {
    /// `struct task_struct *group_leader`.
    pub group_leader: u32,
    /// `char comm[TASK_COMM_LEN]`.
    pub comm: u32,
    /// The way to the network namespace's inode number, when this kernel's
    /// BTF has it (holding needs it; counting does not).
    pub netns: Option<NetnsOffsets>,
    /// The way to the cgroup v2 id; without it the programs call
    /// `bpf_get_current_cgroup_id`, which gives the same id at a higher cost.
    pub cgroup: Option<CgroupOffsets>,
}

/// `task_struct.cgroups`, `css_set.dfl_cgrp`, `cgroup.kn`, `kernfs_node.id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupOffsets {
    pub cgroups: u32,
    pub dfl_cgrp: u32,
    pub kn: u32,
    pub id: u32,
}

/// `task_struct.nsproxy`, `nsproxy.net_ns`, and `net.ns` + `ns_common.inum`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetnsOffsets {
    pub nsproxy: u32,
    pub net_ns: u32,
    pub inum: u32,
}

/// The offsets from the BTF file at `path`.
pub fn task_offsets(path: &Path) -> Result<TaskOffsets, String> {
    if !path.exists() {
        return Err(format!(
            "{} does not exist (kernel built without CONFIG_DEBUG_INFO_BTF)",
            path.display()
        ));
    }
    // Mapping the file avoids parsing every type up front, but the kernel
    // allows mmap of its BTF only since 6.16 (ENODEV before): then read it.
    let btf = Btf::from_file_with_backend(path, btf_rs::Backend::Mmap)
        .or_else(|_| Btf::from_file_with_backend(path, btf_rs::Backend::Cache))
        .map_err(|e| format!("parsing {}: {e}", path.display()))?;
    task_offsets_in(&btf).map_err(|e| format!("{}: {e}", path.display()))
}

/// The offsets in parsed BTF.
pub fn task_offsets_in(btf: &Btf) -> Result<TaskOffsets, String> {
    let task = btf
        .resolve_types_by_name("task_struct")
        .map_err(|e| format!("no task_struct: {e}"))?
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) => Some(s),
            _ => None,
        })
        .ok_or("no struct task_struct (only a forward declaration)")?;

    let (group_leader, leader_type) =
        member(btf, &task, "group_leader")?.ok_or("task_struct has no member group_leader")?;
    if !matches!(strip_qualifiers(btf, leader_type)?, Type::Ptr(_)) {
        return Err("task_struct.group_leader is not a pointer".to_owned());
    }

    let (comm, comm_type) = member(btf, &task, "comm")?.ok_or("task_struct has no member comm")?;
    match strip_qualifiers(btf, comm_type)? {
        Type::Array(a) if a.len() == itw_common::COMM_LEN => {}
        Type::Array(a) => {
            return Err(format!(
                "task_struct.comm has {} bytes; the programs read {}",
                a.len(),
                itw_common::COMM_LEN
            ));
        }
        other => {
            return Err(format!(
                "task_struct.comm is a {}, not an array",
                other.name()
            ));
        }
    }
    let netns = match netns_offsets(btf, &task) {
        Ok(offsets) => Some(offsets),
        Err(reason) => {
            tracing::warn!(%reason, "the kernel's BTF does not lead to a task's network namespace: connects cannot be held");
            None
        }
    };
    let cgroup = match cgroup_offsets(btf, &task) {
        Ok(offsets) => Some(offsets),
        Err(reason) => {
            tracing::info!(%reason, "the kernel's BTF does not lead to a task's cgroup id: the programs call bpf_get_current_cgroup_id");
            None
        }
    };
    Ok(TaskOffsets {
        group_leader,
        comm,
        netns,
        cgroup,
    })
}

/// `task->cgroups->dfl_cgrp->kn->id`, each step a pointer where it must be
/// and the id a 64-bit integer (Linux 5.5 and later; a union before).
fn cgroup_offsets(btf: &Btf, task: &btf_rs::Struct) -> Result<CgroupOffsets, String> {
    let step = |parent: &btf_rs::Struct, parent_name: &str, name: &str| {
        let (offset, ty) = member(btf, parent, name)?
            .ok_or_else(|| format!("{parent_name} has no member {name}"))?;
        match strip_qualifiers(btf, ty)? {
            Type::Ptr(_) => Ok(offset),
            other => Err(format!(
                "{parent_name}.{name} is a {}, not a pointer",
                other.name()
            )),
        }
    };
    let cgroups = step(task, "task_struct", "cgroups")?;
    let dfl_cgrp = step(&named_struct(btf, "css_set")?, "css_set", "dfl_cgrp")?;
    let kn = step(&named_struct(btf, "cgroup")?, "cgroup", "kn")?;
    let (id, id_type) = member(btf, &named_struct(btf, "kernfs_node")?, "id")?
        .ok_or("kernfs_node has no member id")?;
    match strip_qualifiers(btf, id_type)? {
        Type::Int(int) if int.size() == 8 => {}
        other => {
            return Err(format!(
                "kernfs_node.id is not a 64-bit integer ({}, {} bytes)",
                other.name(),
                match &other {
                    Type::Int(int) => int.size(),
                    _ => 0,
                }
            ));
        }
    }
    Ok(CgroupOffsets {
        cgroups,
        dfl_cgrp,
        kn,
        id,
    })
}

/// `task->nsproxy->net_ns->ns.inum`, each step a pointer where it must be.
fn netns_offsets(btf: &Btf, task: &btf_rs::Struct) -> Result<NetnsOffsets, String> {
    let (nsproxy, _) = member(btf, task, "nsproxy")?.ok_or("task_struct has no member nsproxy")?;
    let nsproxy_struct = named_struct(btf, "nsproxy")?;
    let (net_ns, _) =
        member(btf, &nsproxy_struct, "net_ns")?.ok_or("nsproxy has no member net_ns")?;
    let net = named_struct(btf, "net")?;
    let (ns, ns_type) = member(btf, &net, "ns")?.ok_or("net has no member ns")?;
    let Type::Struct(ns_common) = strip_qualifiers(btf, ns_type)? else {
        return Err("net.ns is not a struct".to_owned());
    };
    let (inum, _) = member(btf, &ns_common, "inum")?.ok_or("ns_common has no member inum")?;
    Ok(NetnsOffsets {
        nsproxy,
        net_ns,
        inum: ns + inum,
    })
}

fn named_struct(btf: &Btf, name: &str) -> Result<btf_rs::Struct, String> {
    btf.resolve_types_by_name(name)
        .map_err(|e| format!("no {name}: {e}"))?
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) => Some(s),
            _ => None,
        })
        .ok_or_else(|| format!("no struct {name} (only a forward declaration)"))
}

/// The byte offset and type of member `name` of a struct or union, looking
/// into anonymous struct and union members (where a kernel built with
/// structure randomisation, for one, keeps most of task_struct).
fn member(btf: &Btf, parent: &btf_rs::Struct, name: &str) -> Result<Option<(u32, Type)>, String> {
    for m in &parent.members {
        let member_name = btf
            .resolve_name(m)
            .map_err(|e| format!("reading a member name: {e}"))?;
        if m.bitfield_size().is_some_and(|bits| bits != 0) {
            continue;
        }
        let bit_offset = m.bit_offset();
        let ty = btf
            .resolve_chained_type(m)
            .map_err(|e| format!("resolving the type of {member_name:?}: {e}"))?;
        if member_name == name {
            if bit_offset % 8 != 0 {
                return Err(format!("member {name} is not byte-aligned"));
            }
            return Ok(Some((bit_offset / 8, ty)));
        }
        if member_name.is_empty()
            && let Type::Struct(inner) | Type::Union(inner) = strip_qualifiers(btf, ty)?
            && let Some((offset, found)) = member(btf, &inner, name)?
        {
            return Ok(Some((bit_offset / 8 + offset, found)));
        }
    }
    Ok(None)
}

/// A type without its typedefs and qualifiers.
fn strip_qualifiers(btf: &Btf, mut ty: Type) -> Result<Type, String> {
    // A chain longer than this is corrupt BTF, not a real type.
    for _ in 0..32 {
        let next = match &ty {
            Type::Typedef(t) => btf.resolve_chained_type(t),
            Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => btf.resolve_chained_type(t),
            Type::TypeTag(t) => btf.resolve_chained_type(t),
            _ => return Ok(ty),
        };
        ty = next.map_err(|e| format!("resolving a {}: {e}", ty.name()))?;
    }
    Err("typedef chain too long".to_owned())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a raw BTF blob (the format of /sys/kernel/btf/vmlinux).
    #[derive(Default)]
    pub(crate) struct BtfBuilder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    const KIND_INT: u32 = 1;
    const KIND_PTR: u32 = 2;
    const KIND_ARRAY: u32 = 3;
    const KIND_STRUCT: u32 = 4;
    const KIND_UNION: u32 = 5;
    const KIND_TYPEDEF: u32 = 8;

    impl BtfBuilder {
        pub(crate) fn new() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
            }
        }

        fn string(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let offset = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            offset
        }

        fn header(&mut self, name: &str, kind: u32, vlen: u32, size_or_type: u32) -> u32 {
            let name = self.string(name);
            for word in [name, (kind << 24) | vlen, size_or_type] {
                self.types.extend_from_slice(&word.to_ne_bytes());
            }
            let id = self.next_id;
            self.next_id += 1;
            id
        }

        pub(crate) fn int(&mut self, name: &str, size: u32) -> u32 {
            let id = self.header(name, KIND_INT, 0, size);
            self.types.extend_from_slice(&(size * 8).to_ne_bytes());
            id
        }

        pub(crate) fn ptr(&mut self, to: u32) -> u32 {
            self.header("", KIND_PTR, 0, to)
        }

        pub(crate) fn typedef(&mut self, name: &str, to: u32) -> u32 {
            self.header(name, KIND_TYPEDEF, 0, to)
        }

        pub(crate) fn array(&mut self, elem: u32, index: u32, len: u32) -> u32 {
            let id = self.header("", KIND_ARRAY, 0, 0);
            for word in [elem, index, len] {
                self.types.extend_from_slice(&word.to_ne_bytes());
            }
            id
        }

        /// A struct (or union) with members (name, type id, byte offset).
        pub(crate) fn record(
            &mut self,
            name: &str,
            union: bool,
            size: u32,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let kind = if union { KIND_UNION } else { KIND_STRUCT };
            let id = self.header(name, kind, members.len() as u32, size);
            for (member, ty, offset) in members {
                let name = self.string(member);
                for word in [name, *ty, offset * 8] {
                    self.types.extend_from_slice(&word.to_ne_bytes());
                }
            }
            id
        }

        /// The id the next type will get (for forward references).
        pub(crate) fn next_id(&self) -> u32 {
            self.next_id
        }

        pub(crate) fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&0xeb9f_u16.to_ne_bytes());
            out.extend_from_slice(&[1, 0]);
            let type_len = self.types.len() as u32;
            for word in [24, 0, type_len, type_len, self.strings.len() as u32] {
                out.extend_from_slice(&u32::to_ne_bytes(word));
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// A task_struct with group_leader inside an anonymous struct inside an
    /// anonymous union, and comm behind a typedef, like a randomised layout.
    fn task_struct_btf(comm_len: u32) -> Vec<u8> {
        let mut b = BtfBuilder::new();
        let char_ty = b.int("char", 1);
        let int_ty = b.int("int", 4);
        let comm_arr = b.array(char_ty, int_ty, comm_len);
        let comm_ty = b.typedef("comm_t", comm_arr);
        // task_struct is declared after the pointer to it.
        let task_id = b.next_id() + 3;
        let task_ptr = b.ptr(task_id);
        let inner = b.record(
            "",
            false,
            16,
            &[("pid", int_ty, 0), ("group_leader", task_ptr, 8)],
        );
        let anon_union = b.record("", true, 16, &[("", inner, 0), ("raw", int_ty, 0)]);
        let task = b.record(
            "task_struct",
            false,
            96,
            &[
                ("state", int_ty, 0),
                ("", anon_union, 16),
                ("comm", comm_ty, 64),
            ],
        );
        assert_eq!(task, task_id);
        b.build()
    }

    #[test]
    fn finds_offsets_through_anonymous_members_and_typedefs() {
        let btf = Btf::from_bytes(&task_struct_btf(16)).unwrap();
        assert_eq!(
            task_offsets_in(&btf),
            Ok(TaskOffsets {
                group_leader: 24,
                comm: 64,
                netns: None,
                cgroup: None,
            })
        );
    }

    /// task_struct -> css_set -> cgroup -> kernfs_node, the id `id_size` bytes.
    fn cgroup_chain_btf(id_size: u32) -> Vec<u8> {
        let mut b = BtfBuilder::new();
        let char_ty = b.int("char", 1);
        let int_ty = b.int("int", 4);
        let id_ty = b.int("unsigned long long", id_size);
        let comm_arr = b.array(char_ty, int_ty, 16);
        // Pointers first, to the records declared after them in this order.
        let first = b.next_id() + 4;
        let [task_ptr, css_ptr, cgroup_ptr, kn_ptr] = [0, 1, 2, 3].map(|i| b.ptr(first + i));
        b.record(
            "task_struct",
            false,
            64,
            &[
                ("group_leader", task_ptr, 8),
                ("cgroups", css_ptr, 16),
                ("comm", comm_arr, 32),
            ],
        );
        b.record(
            "css_set",
            false,
            16,
            &[("refcount", int_ty, 0), ("dfl_cgrp", cgroup_ptr, 8)],
        );
        b.record(
            "cgroup",
            false,
            32,
            &[("self", int_ty, 0), ("kn", kn_ptr, 24)],
        );
        b.record(
            "kernfs_node",
            false,
            64,
            &[("count", int_ty, 0), ("id", id_ty, 40)],
        );
        b.build()
    }

    #[test]
    fn finds_the_way_to_the_cgroup_id_and_does_without_it_on_old_kernels() {
        let btf = Btf::from_bytes(&cgroup_chain_btf(8)).unwrap();
        let offsets = task_offsets_in(&btf).unwrap();
        assert_eq!(
            offsets.cgroup,
            Some(CgroupOffsets {
                cgroups: 16,
                dfl_cgrp: 8,
                kn: 24,
                id: 40,
            })
        );
        assert_eq!((offsets.group_leader, offsets.comm), (8, 32));
        // Before Linux 5.5 the id was a union of two u32 (not modelled here:
        // any id that is not a 64-bit integer): the programs call the helper.
        let btf = Btf::from_bytes(&cgroup_chain_btf(4)).unwrap();
        assert_eq!(task_offsets_in(&btf).unwrap().cgroup, None);
        let task = named_struct(&btf, "task_struct").unwrap();
        assert_eq!(
            cgroup_offsets(&btf, &task),
            Err("kernfs_node.id is not a 64-bit integer (int, 4 bytes)".to_owned())
        );
    }

    #[test]
    fn refuses_a_comm_of_another_size() {
        let btf = Btf::from_bytes(&task_struct_btf(32)).unwrap();
        assert_eq!(
            task_offsets_in(&btf),
            Err("task_struct.comm has 32 bytes; the programs read 16".to_owned())
        );
    }

    #[test]
    fn names_what_is_missing() {
        let mut b = BtfBuilder::new();
        let int_ty = b.int("int", 4);
        b.record("task_struct", false, 8, &[("pid", int_ty, 0)]);
        let btf = Btf::from_bytes(&b.build()).unwrap();
        assert_eq!(
            task_offsets_in(&btf),
            Err("task_struct has no member group_leader".to_owned())
        );
        let err = task_offsets(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert_eq!(
            err,
            "/nonexistent/vmlinux does not exist (kernel built without CONFIG_DEBUG_INFO_BTF)"
        );
    }

    #[test]
    fn reads_this_kernels_btf_when_it_has_one() {
        let path = Path::new(VMLINUX_BTF);
        if !path.exists() {
            eprintln!("skipped: {VMLINUX_BTF} does not exist on this kernel");
            return;
        }
        let offsets = task_offsets(path).unwrap();
        // Both lie within task_struct, which is several KiB, and do not overlap.
        assert!(offsets.group_leader > 0 && offsets.comm > 0, "{offsets:?}");
        let netns = offsets
            .netns
            .expect("this kernel's BTF leads to net.ns.inum");
        assert!(
            netns.nsproxy > 0 && netns.net_ns > 0 && netns.inum > 0,
            "{netns:?}"
        );
        assert!(
            offsets.group_leader.abs_diff(offsets.comm) >= 8,
            "{offsets:?}"
        );
        let cgroup = offsets
            .cgroup
            .expect("this kernel's BTF leads to kernfs_node.id");
        assert!(cgroup.cgroups > 0 && cgroup.kn > 0, "{cgroup:?}");
    }
}
