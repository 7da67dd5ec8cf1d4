//! Per-CPU steering: the two small kernel programs that send each packet to the TUN queue or
//! UDP socket of the CPU it is processed on (like RSS/XPS), so a device worker pinned to that
//! CPU is woken without a cross-CPU wake-up.
//!
//! - TUN: an eBPF `BPF_PROG_TYPE_SOCKET_FILTER` program, attached with `TUNSETSTEERINGEBPF`,
//!   that returns the packet's flow hash when its socket set one (TCP, connected UDP: one
//!   flow, one queue, so no worker reorders it, as XPS keeps a flow on its queue), else
//!   `bpf_get_smp_processor_id()` (ICMP, unconnected UDP); the kernel takes the result modulo
//!   the number of queues.
//! - UDP: a classic BPF program for a `SO_REUSEPORT` group (`SO_ATTACH_REUSEPORT_CBPF`):
//!   `ld #cpu; mod #queues; ret a`, the index of the socket (in bind order) that gets the
//!   datagram.
//!
//! The raw system calls are here, each behind a small safe function.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::sys::socket::{setsockopt, sockopt};

/// One eBPF instruction, `struct bpf_insn`: opcode, destination and source registers (4 bits
/// each, destination in the low nibble on little-endian), offset, immediate.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BpfInsn {
    pub code: u8,
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

/// `BPF_ALU64 | BPF_MOV | BPF_K`: `dst = imm`.
const BPF_MOV64_K: u8 = 0xb7;
/// `BPF_LDX | BPF_MEM | BPF_W`: `dst = *(u32 *)(src + off)`.
const BPF_LDX_MEM_W: u8 = 0x61;
/// `BPF_JMP | BPF_JNE | BPF_K`: `if dst != imm goto pc + off`.
const BPF_JNE_K: u8 = 0x55;
/// `offsetof(struct __sk_buff, hash)`: after len, pkt_type, mark, queue_mapping, protocol,
/// vlan_present, vlan_tci, vlan_proto, priority, ingress_ifindex, ifindex, tc_index (4 bytes
/// each) and cb[5].
const SK_BUFF_HASH_OFFSET: i16 = 68;
/// `BPF_JMP | BPF_CALL`: call the helper numbered `imm`; the result is in r0.
const BPF_CALL: u8 = 0x85;
/// `BPF_JMP | BPF_EXIT`: return r0.
const BPF_EXIT: u8 = 0x95;
/// `BPF_FUNC_get_smp_processor_id` (not GPL-only).
const BPF_FUNC_GET_SMP_PROCESSOR_ID: i32 = 8;
/// `bpf(2)` command.
const BPF_PROG_LOAD: libc::c_long = 5;
/// `enum bpf_prog_type`.
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
/// The program's license string (the helper it calls is not GPL-only).
const LICENSE: &std::ffi::CStr = c"Apache-2.0";

/// The TUN steering program: a packet whose socket gave it a flow hash (TCP, connected UDP)
/// goes by that hash, so one flow keeps one queue and its packets stay in order; any other
/// (ICMP, forwarded packets without a hash) goes to the queue of the CPU that sent it:
/// `r0 = skb->hash; if r0 != 0 goto out; r0 = bpf_get_smp_processor_id(); out: return r0`.
pub fn cpu_ebpf_program() -> [BpfInsn; 4] {
    [
        BpfInsn {
            code: BPF_LDX_MEM_W,
            // dst r0 (low nibble), src r1 (the context, high nibble).
            regs: 0x10,
            off: SK_BUFF_HASH_OFFSET,
            imm: 0,
        },
        BpfInsn {
            code: BPF_JNE_K,
            regs: 0,
            off: 1,
            imm: 0,
        },
        BpfInsn {
            code: BPF_CALL,
            regs: 0,
            off: 0,
            imm: BPF_FUNC_GET_SMP_PROCESSOR_ID,
        },
        BpfInsn {
            code: BPF_EXIT,
            regs: 0,
            off: 0,
            imm: 0,
        },
    ]
}

/// One classic BPF instruction, as `(code, jt, jf, k)` (the fields of `struct sock_filter`).
pub type CbpfInsn = (u16, u8, u8, u32);

/// The reuseport program for `queues` sockets: `ld #cpu; mod #queues; ret a`. `queues` must
/// be at least 1 (the kernel refuses a constant division by zero).
pub fn reuseport_cpu_program(queues: u32) -> [CbpfInsn; 3] {
    // SKF_AD_OFF + SKF_AD_CPU, the "current CPU" ancillary load, as the u32 the kernel reads.
    let cpu = (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32;
    [
        (
            (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            0,
            0,
            cpu,
        ),
        (
            (libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16,
            0,
            0,
            queues,
        ),
        ((libc::BPF_RET | libc::BPF_A) as u16, 0, 0, 0),
    ]
}

/// The leading fields of `union bpf_attr` for `BPF_PROG_LOAD` (the kernel zero-fills the
/// rest when the size passed is smaller than its own).
#[repr(C)]
struct BpfProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

/// The TUN program for a device under bulk load: every packet to the first queue (`r0 = 0`).
pub fn first_queue_ebpf_program() -> [BpfInsn; 2] {
    [
        BpfInsn {
            code: BPF_MOV64_K,
            regs: 0,
            off: 0,
            imm: 0,
        },
        BpfInsn {
            code: BPF_EXIT,
            regs: 0,
            off: 0,
            imm: 0,
        },
    ]
}

/// Loads [`cpu_ebpf_program`] into the kernel; the descriptor keeps it alive.
pub fn load_cpu_ebpf_program() -> io::Result<OwnedFd> {
    load_socket_filter(&cpu_ebpf_program())
}

/// Loads an eBPF socket-filter program; the descriptor keeps it alive.
fn load_socket_filter(insns: &[BpfInsn]) -> io::Result<OwnedFd> {
    let attr = BpfProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SOCKET_FILTER,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
    };
    // SAFETY: `attr` is a fully initialised `#[repr(C)]` prefix of `union bpf_attr` whose
    // size we pass; its pointers (`insns`, `license`) point at live locals that outlive the
    // call, and the kernel only reads them during it. No log buffer is passed (size 0).
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const BpfProgLoadAttr,
            std::mem::size_of::<BpfProgLoadAttr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd).map_err(|_| io::Error::other("bpf() fd out of range"))?;
    // SAFETY: a successful BPF_PROG_LOAD returns a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `TUNSETSTEERINGEBPF`: the TUN (any of its queues' descriptors) picks each packet's queue
/// with `program` (the TUN takes its own reference; `program` may be closed afterwards).
pub fn set_tun_steering(tun: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let fd: libc::c_int = program.as_raw_fd();
    // SAFETY: `tun` is a live descriptor (borrowed for the call); TUNSETSTEERINGEBPF reads one
    // `int` (a BPF program descriptor) through the pointer, which points at a live local.
    let result = unsafe {
        libc::ioctl(
            tun.as_raw_fd(),
            libc::TUNSETSTEERINGEBPF,
            &fd as *const libc::c_int,
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `SO_ATTACH_REUSEPORT_CBPF` with [`reuseport_cpu_program`] on `socket`, a member of a bound
/// `SO_REUSEPORT` group of `queues` sockets: the program applies to the whole group.
pub fn attach_reuseport_cpu_program(socket: &impl AsFd, queues: u32) -> io::Result<()> {
    attach_reuseport_program(socket, &reuseport_cpu_program(queues))
}

/// The reuseport program for a device under bulk load: every datagram to the first socket.
pub fn reuseport_first_program() -> [CbpfInsn; 1] {
    [((libc::BPF_RET | libc::BPF_K) as u16, 0, 0, 0)]
}

fn attach_reuseport_program(socket: &impl AsFd, program: &[CbpfInsn]) -> io::Result<()> {
    let mut filter: Vec<libc::sock_filter> = program
        .iter()
        .map(|&(code, jt, jf, k)| libc::sock_filter { code, jt, jf, k })
        .collect();
    let program = libc::sock_fprog {
        len: filter.len() as libc::c_ushort,
        filter: filter.as_mut_ptr(),
    };
    // The kernel copies the program during the call; `filter` outlives it.
    setsockopt(socket, sockopt::AttachReusePortCbpf, &program).map_err(io::Error::from)
}

/// Switches a steered device between spreading packets over its workers (by CPU, or by flow
/// hash) and sending every packet to the first worker: the kernel re-reads its steering
/// program for each packet, so a switch takes effect at once.
pub struct SteeringSwitch {
    /// Duplicates of the first TUN queue's and the first socket's descriptors.
    tun: OwnedFd,
    socket: OwnedFd,
    spread_program: OwnedFd,
    first_program: OwnedFd,
    queues: u32,
}

/// Switches the kernel's steering between spreading packets over the workers and sending
/// them all to the first (see [`crate::cpus::ModePolicy`]); a trait so the device's tests can
/// watch the switching without BPF.
pub trait Steer: Send + Sync {
    fn spread(&self, on: bool) -> io::Result<()>;
}

impl Steer for SteeringSwitch {
    fn spread(&self, on: bool) -> io::Result<()> {
        SteeringSwitch::spread(self, on)
    }
}

/// Where the kernel sends packets: spread over the workers, or all to the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SteeringMode {
    Spread,
    First,
}

impl SteeringMode {
    pub const ALL: [SteeringMode; 2] = [Self::Spread, Self::First];

    pub fn spread(on: bool) -> Self {
        if on { Self::Spread } else { Self::First }
    }

    /// The `to` label of `trellis_gateway_steering_changes_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Spread => "spread",
            Self::First => "first",
        }
    }
}

/// A steered device's switch, and where its first worker (thread `first`) runs in each mode:
/// its home CPUs while spread, anywhere while it takes everything.
pub struct SteeringControl {
    pub switch: Box<dyn Steer>,
    pub first: nix::unistd::Pid,
    pub home: Vec<usize>,
    pub anywhere: Vec<usize>,
}

/// Which step of attaching the steering programs the kernel refused.
#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    #[error("load the TUN steering eBPF program")]
    LoadProgram(#[source] io::Error),
    #[error("dup the TUN queue")]
    DupTun(#[source] io::Error),
    #[error("dup the UDP socket")]
    DupSocket(#[source] io::Error),
    #[error("TUNSETSTEERINGEBPF")]
    SetTunSteering(#[source] io::Error),
    #[error("SO_ATTACH_REUSEPORT_CBPF")]
    AttachReuseport(#[source] io::Error),
}

impl SteeringSwitch {
    /// Loads both TUN programs and attaches the spreading ones to the TUN (any queue) and the
    /// `SO_REUSEPORT` group (any member).
    pub fn attach(
        tun: BorrowedFd<'_>,
        socket: BorrowedFd<'_>,
        queues: u32,
    ) -> Result<Self, SteeringError> {
        let spread_program = load_cpu_ebpf_program().map_err(SteeringError::LoadProgram)?;
        let first_program =
            load_socket_filter(&first_queue_ebpf_program()).map_err(SteeringError::LoadProgram)?;
        let switch = Self {
            tun: tun.try_clone_to_owned().map_err(SteeringError::DupTun)?,
            socket: socket
                .try_clone_to_owned()
                .map_err(SteeringError::DupSocket)?,
            spread_program,
            first_program,
            queues,
        };
        set_tun_steering(switch.tun.as_fd(), switch.spread_program.as_fd())
            .map_err(SteeringError::SetTunSteering)?;
        attach_reuseport_cpu_program(&switch.socket, queues)
            .map_err(SteeringError::AttachReuseport)?;
        Ok(switch)
    }

    /// Spreads packets over every worker (`true`) or sends them all to the first (`false`).
    pub fn spread(&self, on: bool) -> io::Result<()> {
        if on {
            set_tun_steering(self.tun.as_fd(), self.spread_program.as_fd())?;
            attach_reuseport_cpu_program(&self.socket, self.queues)
        } else {
            set_tun_steering(self.tun.as_fd(), self.first_program.as_fd())?;
            attach_reuseport_program(&self.socket, &reuseport_first_program())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ebpf_program_returns_the_flow_hash_else_the_cpu() {
        let program = cpu_ebpf_program();
        assert_eq!(std::mem::size_of::<BpfInsn>(), 8);
        assert_eq!(std::mem::size_of::<BpfProgLoadAttr>(), 48);
        assert_eq!(
            program,
            [
                // r0 = *(u32 *)(r1 + 68): skb->hash
                BpfInsn {
                    code: 0x61,
                    regs: 0x10,
                    off: 68,
                    imm: 0
                },
                // if r0 != 0 goto +1 (exit)
                BpfInsn {
                    code: 0x55,
                    regs: 0,
                    off: 1,
                    imm: 0
                },
                BpfInsn {
                    code: 0x85,
                    regs: 0,
                    off: 0,
                    imm: 8
                },
                BpfInsn {
                    code: 0x95,
                    regs: 0,
                    off: 0,
                    imm: 0
                },
            ]
        );
    }

    #[test]
    fn the_reuseport_program_is_cpu_modulo_queues() {
        // ld [SKF_AD_OFF + SKF_AD_CPU]; mod #3; ret a
        assert_eq!(
            reuseport_cpu_program(3),
            [(0x20, 0, 0, 0xffff_f024), (0x94, 0, 0, 3), (0x16, 0, 0, 0)]
        );
        assert_eq!(reuseport_cpu_program(2)[1], (0x94, 0, 0, 2));
    }

    #[test]
    fn the_ebpf_program_loads() {
        trellis_test_support::skip_unless_root!();
        // Needs root (or CAP_BPF); the gateway runs as root, and so do these tests.
        load_cpu_ebpf_program().unwrap();
    }
}
