//! vCPUs: CPUID, MSRs, boot register state, and the run loop.

pub mod cpuid;
pub mod msrs;
pub mod pause;
pub mod regs;
pub mod vcpu;

pub use vcpu::{Vcpu, VcpuContext, VcpuError};
