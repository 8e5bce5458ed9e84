//! The kept eBPF objects' kprobe programs read their argument from the
//! register the CPU passes it in. `pt_regs` is laid out per architecture and
//! aya-ebpf picks the layout when the object is built (`bpf_target_arch`), so
//! an object built for the wrong CPU loads and runs, and reads a wrong
//! register: on a kernel with kprobes it would count garbage, and nothing on a
//! machine without kprobes would notice. This reads the bytecode of both
//! objects, whatever the host, so either one built wrong fails here.

use std::collections::BTreeSet;

use aya_obj::{Object, generated::bpf_insn};
use itw_common::programs;

static X86_64: &[u8] = aya::include_bytes_aligned!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../ebpf/artifacts/x86_64/itw.o"
));
static AARCH64: &[u8] = aya::include_bytes_aligned!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../ebpf/artifacts/aarch64/itw.o"
));

/// Where the second argument (`uaddr` of `tcp_v{4,6}_connect(sk, uaddr,
/// addr_len)`) sits in the kernel's `struct pt_regs` at a kprobe.
/// x86_64 (arch/x86/include/asm/ptrace.h): r15 r14 r13 r12 bp bx r11 r10 r9
/// r8 ax cx dx si di ..., 8 bytes each, and the System V ABI passes the
/// second argument in si: 13 * 8.
const X86_64_SECOND_ARG: i16 = 13 * 8;
/// arm64 (arch/arm64/include/asm/ptrace.h): `regs[31]` first, and the AAPCS64
/// passes the second argument in x1: 1 * 8.
const AARCH64_SECOND_ARG: i16 = 8;

const BPF_LDX: u8 = 0x01;
const BPF_MEM: u8 = 0x60;
const BPF_DW: u8 = 0x18;
const BPF_ALU64_MOV_X: u8 = 0xbf;
const BPF_CALL: u8 = 0x85;

/// The (offset, size code) of every load from the context pointer: r1 on
/// entry, and the registers it is copied to until they are written again or
/// a call clobbers r1-r5. Straight-line tracking is enough for these
/// programs, which read their argument first; a load through a register that
/// is the context on one path only would show up as a second offset.
fn context_loads(instructions: &[bpf_insn]) -> BTreeSet<(i16, u8)> {
    let mut context = [false; 11];
    context[1] = true;
    let mut loads = BTreeSet::new();
    for insn in instructions {
        let (dst, src) = (usize::from(insn.dst_reg()), usize::from(insn.src_reg()));
        if insn.code & 0x07 == BPF_LDX && insn.code & 0xe0 == BPF_MEM {
            if context.get(src).copied().unwrap_or(false) {
                loads.insert((insn.off, insn.code & 0x18));
            }
            if let Some(slot) = context.get_mut(dst) {
                *slot = false;
            }
        } else if insn.code == BPF_ALU64_MOV_X {
            let from = context.get(src).copied().unwrap_or(false);
            if let Some(slot) = context.get_mut(dst) {
                *slot = from;
            }
        } else if insn.code == BPF_CALL {
            context[1..=5].fill(false);
        } else if insn.code & 0x07 >= 0x04 || insn.code & 0x07 == 0x00 {
            // ALU, ALU64 and LD (imm64) write dst.
            if let Some(slot) = context.get_mut(dst) {
                *slot = false;
            }
        }
    }
    loads
}

fn kprobe_loads(object: &[u8], program: &str) -> BTreeSet<(i16, u8)> {
    let object = Object::parse(object).expect("parsing the kept object");
    let prog = object
        .programs
        .get(program)
        .unwrap_or_else(|| panic!("no program {program} in the object"));
    let function = object
        .functions
        .get(&prog.function_key())
        .unwrap_or_else(|| panic!("no function for {program}"));
    context_loads(&function.instructions)
}

fn assert_reads_second_argument(object: &[u8], arch: &str, offset: i16) {
    for program in [programs::TCP_V4_CONNECT, programs::TCP_V6_CONNECT] {
        assert_eq!(
            kprobe_loads(object, program),
            BTreeSet::from([(offset, BPF_DW)]),
            "{arch}: {program} must read only uaddr, the second argument, \
             at pt_regs offset {offset}"
        );
    }
}

#[test]
fn x86_64_kprobes_read_uaddr_from_si() {
    assert_reads_second_argument(X86_64, "x86_64", X86_64_SECOND_ARG);
}

#[test]
fn aarch64_kprobes_read_uaddr_from_x1() {
    assert_reads_second_argument(AARCH64, "aarch64", AARCH64_SECOND_ARG);
}

/// The check itself can fail: each object read with the other's layout.
#[test]
fn the_layouts_differ_so_a_swapped_object_would_fail() {
    for (object, wrong) in [(X86_64, AARCH64_SECOND_ARG), (AARCH64, X86_64_SECOND_ARG)] {
        assert_ne!(
            kprobe_loads(object, programs::TCP_V4_CONNECT),
            BTreeSet::from([(wrong, BPF_DW)])
        );
    }
}

#[test]
fn context_loads_follow_copies_and_stop_at_calls() {
    let insn = |code: u8, dst: u8, src: u8, off: i16| {
        // SAFETY: bpf_insn is plain integers (a bindgen struct), for which
        // all zeroes is a valid value.
        let mut i: bpf_insn = unsafe { std::mem::zeroed() };
        i.code = code;
        i.off = off;
        i.set_dst_reg(dst);
        i.set_src_reg(src);
        i
    };
    let ldx_dw = BPF_LDX | BPF_MEM | BPF_DW;
    let program = [
        insn(BPF_ALU64_MOV_X, 6, 1, 0), // r6 = r1
        insn(ldx_dw, 3, 6, 112),        // r3 = *(u64 *)(r6 + 112): counted
        insn(BPF_CALL, 0, 0, 0),        // r1 clobbered, r6 kept
        insn(ldx_dw, 2, 1, 8),          // r1 is no longer the context
        insn(ldx_dw, 4, 6, 104),        // counted
        insn(0xb7, 6, 0, 0),            // r6 = 0
        insn(ldx_dw, 5, 6, 96),         // not the context any more
    ];
    assert_eq!(
        context_loads(&program),
        BTreeSet::from([(104, BPF_DW), (112, BPF_DW)])
    );
}
