//! The capture bench's floor: `capture-floor.o` (built by `hack/build-ebpf`
//! beside `itw.o`, never embedded in the agent), an empty program and a
//! minimal counter per hook, and the rounds that measure them beside the
//! agent's programs by the kernel's per-program run-time statistics.

use std::{fs::File, net::Ipv4Addr, path::Path};

use anyhow::{Context, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, TracePoint},
};
use itw_agent::capture::{
    self, CaptureMode, CaptureSettings, Kernel, KernelCounts, btf, cgroup, tracefs,
};
use itw_common::{Destination, Watch, dest_table::DestSlot, floor, programs};

use crate::{
    bench_support::{percentile, program_run_time, run},
    dest_table::{self, Fill, Layout},
};

#[cfg(target_arch = "x86_64")]
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../ebpf/artifacts/x86_64/capture-floor.o"
));
#[cfg(target_arch = "aarch64")]
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../ebpf/artifacts/aarch64/capture-floor.o"
));

/// What one round attaches alone and measures.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Subject {
    Empty,
    Counter,
    /// The counter, connects to the other destination (hash lookup miss).
    CounterMiss,
    /// The counter with the destination table (cgroup mode only).
    Table(Layout),
    /// The counter, then the task helper (cgroup mode only).
    CounterTask,
    /// The counter, then a per-CPU hash lookup of an `AttemptKey` (cgroup
    /// mode only).
    CounterSecondLookup,
    /// The counter, then the caller's identity as itw.o reads it (cgroup
    /// mode only).
    CounterIdentity,
    /// `CounterIdentity` with the destination table (cgroup mode only).
    IdentityTable(Layout),
    /// The agent's program, connects to the watched destination.
    Agent,
    /// The agent's program, connects to another destination (lookup miss).
    AgentMiss,
}

impl Subject {
    /// The subjects measured on `mode`'s hook.
    fn all(mode: CaptureMode) -> &'static [Self] {
        match mode {
            CaptureMode::Tracepoint => &[Self::Empty, Self::Counter, Self::Agent, Self::AgentMiss],
            _ => &[
                Self::Empty,
                Self::Counter,
                Self::CounterMiss,
                Self::Table(Layout::HitFirst),
                Self::Table(Layout::HitLast),
                Self::Table(Layout::MissFirst),
                Self::Table(Layout::MissLast),
                Self::CounterTask,
                Self::CounterSecondLookup,
                Self::CounterIdentity,
                Self::IdentityTable(Layout::HitFirst),
                Self::IdentityTable(Layout::HitLast),
                Self::IdentityTable(Layout::MissFirst),
                Self::IdentityTable(Layout::MissLast),
                Self::Agent,
                Self::AgentMiss,
            ],
        }
    }

    fn label(self, mode: CaptureMode) -> String {
        let agent = match mode {
            CaptureMode::Tracepoint => programs::INET_SOCK_SET_STATE,
            _ => programs::CONNECT4,
        };
        match self {
            Self::Empty => "empty program".to_owned(),
            Self::Counter => "minimal counter (the floor)".to_owned(),
            Self::CounterMiss => "  counter, other destination".to_owned(),
            Self::Table(layout) => format!("  counter, table: {}", layout.label()),
            Self::IdentityTable(layout) => format!("  + identity, table: {}", layout.label()),
            Self::CounterTask => "  counter + task helper".to_owned(),
            Self::CounterSecondLookup => "  counter + second hash lookup".to_owned(),
            Self::CounterIdentity => "  counter + task, leader comm, cgroup id".to_owned(),
            Self::Agent => format!("{agent}, watched"),
            Self::AgentMiss => format!("{agent}, other destination"),
        }
    }

    /// Connects to the other destination (a lookup miss)?
    fn misses(self) -> bool {
        match self {
            Self::CounterMiss | Self::AgentMiss => true,
            Self::Table(layout) | Self::IdentityTable(layout) => !layout.hits(),
            _ => false,
        }
    }
}

/// The goal for the agent's program, as a multiple of the minimal counter.
pub fn goal(mode: CaptureMode) -> f64 {
    match mode {
        CaptureMode::Tracepoint => 2.0,
        _ => 1.2,
    }
}

/// The floor object loaded (nothing attached), its map holding `watched`,
/// its destination table filled.
struct FloorObject {
    ebpf: Ebpf,
    table_mask: u32,
    fill: Fill,
}

impl FloorObject {
    fn load(
        settings: &CaptureSettings,
        mode: CaptureMode,
        watched: &Destination,
        other: &Destination,
    ) -> anyhow::Result<Self> {
        let tp = if mode == CaptureMode::Tracepoint {
            // Before anything attaches a tracepoint in this process: aya
            // keeps a failed tracefs lookup for good.
            tracefs::ensure_mounted(&settings.tracefs_path)?;
            tracefs::set_state_offsets(&settings.tracefs_path)
                .context("reading the tracepoint's format file")?
        } else {
            // The tracepoint programs are loaded, never attached.
            tracefs::SetStateOffsets::UNATTACHED
        };
        let task = btf::task_offsets(Path::new(btf::VMLINUX_BTF))
            .map_err(anyhow::Error::msg)
            .context("task_struct offsets from the kernel's BTF")?;
        let cgroup = task
            .cgroup
            .context("the kernel's BTF has no cgroup id path for the identity variant")?;
        let slots = dest_table::slots_for(settings.max_destinations);
        let table_mask = slots - 1;
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .map_max_entries(floor::WATCHED, settings.max_destinations)
            .map_max_entries(floor::TABLE, slots)
            .override_global(floor::TABLE_MASK, &table_mask, true)
            .map_max_entries(floor::ATTEMPTS, settings.max_attempt_counters)
            .override_global(floor::TP_NEWSTATE_OFFSET, &tp.newstate, true)
            .override_global(floor::TP_DPORT_OFFSET, &tp.dport, true)
            .override_global(floor::TP_FAMILY_OFFSET, &tp.family, true)
            .override_global(floor::TP_DADDR_OFFSET, &tp.daddr, true)
            .override_global(floor::TASK_GROUP_LEADER_OFFSET, &task.group_leader, true)
            .override_global(floor::TASK_COMM_OFFSET, &task.comm, true)
            .override_global(floor::TASK_CGROUPS_OFFSET, &cgroup.cgroups, true)
            .override_global(floor::CSS_SET_DFL_CGRP_OFFSET, &cgroup.dfl_cgrp, true)
            .override_global(floor::CGROUP_KN_OFFSET, &cgroup.kn, true)
            .override_global(floor::KERNFS_NODE_ID_OFFSET, &cgroup.id, true)
            .load(OBJECT)
            .context("loading capture-floor.o")?;
        let mut map: HashMap<_, Destination, Watch> = HashMap::try_from(
            ebpf.map_mut(floor::WATCHED)
                .context("capture-floor.o has no watched map")?,
        )?;
        map.insert(
            watched,
            Watch {
                dest_id: 1,
                armed: 0,
                generation: 1,
            },
            0,
        )?;
        for name in [
            floor::CONNECT4_EMPTY,
            floor::CONNECT4_COUNTER,
            floor::CONNECT4_TASK,
            floor::CONNECT4_SECOND_LOOKUP,
            floor::CONNECT4_IDENTITY,
            floor::CONNECT4_TABLE,
            floor::CONNECT4_IDENTITY_TABLE,
        ] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?.try_into()?;
            prog.load().with_context(|| format!("loading {name}"))?;
        }
        for name in [floor::SET_STATE_EMPTY, floor::SET_STATE_COUNTER] {
            let prog: &mut TracePoint = program(&mut ebpf, name)?.try_into()?;
            prog.load().with_context(|| format!("loading {name}"))?;
        }
        let fill = dest_table::fill(&mut table(&mut ebpf)?, slots, watched, other)?;
        Ok(Self {
            ebpf,
            table_mask,
            fill,
        })
    }

    /// Lays the table out for `layout`.
    fn lay_out(
        &mut self,
        layout: Layout,
        watched: &Destination,
        other: &Destination,
    ) -> anyhow::Result<()> {
        let mask = self.table_mask;
        dest_table::apply(&mut table(&mut self.ebpf)?, mask, layout, watched, other)
    }

    /// The counter's hits so far (summed over CPUs), index 0 (cgroup) or 1.
    fn hits(&self, index: u32) -> anyhow::Result<u64> {
        let counts: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(floor::COUNTS)
                .context("capture-floor.o has no counts map")?,
        )?;
        Ok(counts.get(&index, 0)?.iter().sum())
    }

    fn id(&self, name: &str) -> anyhow::Result<u32> {
        let prog = self
            .ebpf
            .program(name)
            .with_context(|| format!("capture-floor.o has no program {name}"))?;
        Ok(prog.info()?.id())
    }
}

fn table(ebpf: &mut Ebpf) -> anyhow::Result<Array<&mut aya::maps::MapData, DestSlot>> {
    Ok(Array::try_from(
        ebpf.map_mut(floor::TABLE)
            .context("capture-floor.o has no destination table")?,
    )?)
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .with_context(|| format!("capture-floor.o has no program {name}"))
}

/// Per subject, the run time per program run of each round, in ns.
pub struct FloorRuns {
    pub mode: CaptureMode,
    fill: Option<Fill>,
    ns_per_run: Vec<(Subject, Vec<f64>)>,
}

/// Rounds of `seconds` each; in each round every subject runs alone on the
/// hook (each round starting one subject later), connects to `watched` (or
/// `other` for the lookup miss), its run time read from the kernel's
/// statistics, which are on for the whole measurement.
pub fn measure(
    mode: CaptureMode,
    settings: &CaptureSettings,
    watched: Ipv4Addr,
    other: Ipv4Addr,
    port: u16,
    rounds: usize,
    seconds: f64,
) -> anyhow::Result<FloorRuns> {
    let dest = Destination::v4(watched.octets(), port);
    let other_dest = Destination::v4(other.octets(), port);
    let mut object = FloorObject::load(settings, mode, &dest, &other_dest)?;
    let root = cgroup::find_root(settings.cgroup_root.as_deref()).map_err(anyhow::Error::msg)?;
    let cgroup_dir =
        File::open(&root.path).with_context(|| format!("opening {}", root.path.display()))?;
    let (empty, counter, index) = match mode {
        CaptureMode::Tracepoint => (floor::SET_STATE_EMPTY, floor::SET_STATE_COUNTER, 1),
        _ => (floor::CONNECT4_EMPTY, floor::CONNECT4_COUNTER, 0),
    };
    let stats_fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling BPF run-time statistics")?;
    let subjects = Subject::all(mode);
    let mut ns_per_run: Vec<(Subject, Vec<f64>)> =
        subjects.iter().map(|s| (*s, Vec::new())).collect();
    for round in 0..rounds {
        for k in 0..subjects.len() {
            let i = (k + round) % subjects.len();
            let subject = subjects[i];
            let target = if subject.misses() { other } else { watched };
            let (runs, ns) = match subject {
                Subject::Empty
                | Subject::Counter
                | Subject::CounterMiss
                | Subject::Table(_)
                | Subject::CounterTask
                | Subject::CounterSecondLookup
                | Subject::CounterIdentity
                | Subject::IdentityTable(_) => {
                    let name = match subject {
                        Subject::Empty => empty,
                        Subject::CounterTask => floor::CONNECT4_TASK,
                        Subject::CounterSecondLookup => floor::CONNECT4_SECOND_LOOKUP,
                        Subject::CounterIdentity => floor::CONNECT4_IDENTITY,
                        Subject::Table(_) => floor::CONNECT4_TABLE,
                        Subject::IdentityTable(_) => floor::CONNECT4_IDENTITY_TABLE,
                        _ => counter,
                    };
                    if let Subject::Table(layout) | Subject::IdentityTable(layout) = subject {
                        object.lay_out(layout, &dest, &other_dest)?;
                    }
                    let id = object.id(name)?;
                    let hits_before = object.hits(index)?;
                    let before = program_run_time(&[id])?;
                    let made = attached_floor(&mut object, name, mode, &cgroup_dir, || {
                        run(target, port, 1, seconds).made
                    })?;
                    let after = program_run_time(&[id])?;
                    let hits = object.hits(index)? - hits_before;
                    let expected = match subject {
                        Subject::Empty => hits,
                        s if s.misses() => 0,
                        _ => made,
                    };
                    if hits != expected {
                        bail!(
                            "{}: {hits} hits for {made} connects, expected {expected}",
                            subject.label(mode)
                        );
                    }
                    (after.0 - before.0, after.1 - before.1)
                }
                Subject::Agent | Subject::AgentMiss => {
                    let started = capture::start(&CaptureSettings {
                        mode,
                        ..settings.clone()
                    })
                    .with_context(|| format!("starting {mode}"))?;
                    let agent = match mode {
                        CaptureMode::Tracepoint => programs::INET_SOCK_SET_STATE,
                        _ => programs::CONNECT4,
                    };
                    let ids: Vec<u32> = started
                        .objects
                        .programs
                        .iter()
                        .filter(|(name, _)| *name == agent)
                        .map(|(_, id)| *id)
                        .collect();
                    let mut kernel: Box<dyn Kernel> = started.kernel;
                    kernel.watch(&dest, 1)?;
                    let before = program_run_time(&ids)?;
                    let made = run(target, port, 1, seconds).made;
                    let after = program_run_time(&ids)?;
                    let mut counts = KernelCounts::default();
                    kernel.read(&mut counts)?;
                    let counted: u64 = counts.attempts.iter().map(|(_, n)| n).sum::<u64>()
                        + counts.overflow.iter().map(|(_, n)| n).sum::<u64>();
                    let expected = if target == watched { made } else { 0 };
                    if counted != expected {
                        bail!("{agent}: counted {counted}, expected {expected}");
                    }
                    (after.0 - before.0, after.1 - before.1)
                }
            };
            if runs == 0 {
                bail!("{}: the kernel counted no runs", subject.label(mode));
            }
            ns_per_run[i].1.push(ns as f64 / runs as f64);
        }
    }
    drop(stats_fd);
    let fill = (mode != CaptureMode::Tracepoint).then_some(object.fill);
    Ok(FloorRuns {
        mode,
        fill,
        ns_per_run,
    })
}

/// Runs `work` with floor program `name` alone attached to its hook; returns
/// what `work` returns.
fn attached_floor(
    object: &mut FloorObject,
    name: &str,
    mode: CaptureMode,
    cgroup_dir: &File,
    work: impl FnOnce() -> u64,
) -> anyhow::Result<u64> {
    let prog = program(&mut object.ebpf, name)?;
    let made = if mode == CaptureMode::Tracepoint {
        let prog: &mut TracePoint = prog.try_into()?;
        let link = prog.attach(tracefs::CATEGORY, tracefs::EVENT)?;
        let made = work();
        prog.detach(link)?;
        made
    } else {
        let prog: &mut CgroupSockAddr = prog.try_into()?;
        let link = prog.attach(cgroup_dir, CgroupAttachMode::Single)?;
        let made = work();
        prog.detach(link)?;
        made
    };
    Ok(made)
}

impl FloorRuns {
    /// Prints each subject's median ns per run, its ratio to the minimal
    /// counter, and the agent program's against the goal; returns that ratio.
    pub fn print(&self) -> f64 {
        let median = |s: Subject| {
            let mut v = self
                .ns_per_run
                .iter()
                .find(|(x, _)| *x == s)
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            if v.is_empty() {
                f64::NAN
            } else {
                percentile(&mut v, 0.5)
            }
        };
        let floor = median(Subject::Counter);
        let goal = goal(self.mode);
        let hook = match self.mode {
            CaptureMode::Tracepoint => "tracepoint sock:inet_sock_set_state",
            _ => "cgroup/connect4",
        };
        println!("  {hook} (median of {} rounds):", self.rounds());
        if let Some(fill) = &self.fill {
            fill.print();
        }
        let mut ratio = f64::NAN;
        for (subject, values) in &self.ns_per_run {
            let ns = median(*subject);
            let line = format!(
                "    {:<44} {:>6.0} ns/run {:>6.2}x the minimal counter",
                subject.label(self.mode),
                ns,
                ns / floor
            );
            if *subject == Subject::Agent {
                ratio = ns / floor;
                let verdict = if ratio <= goal { "met" } else { "missed" };
                println!("{line}  (goal <= {goal}x: {verdict})");
            } else {
                println!("{line}");
            }
            let list: Vec<String> = values.iter().map(|v| format!("{v:.0}")).collect();
            println!("      per round: {}", list.join(" "));
        }
        ratio
    }

    fn rounds(&self) -> usize {
        self.ns_per_run.first().map_or(0, |(_, v)| v.len())
    }
}
