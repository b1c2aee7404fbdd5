//! Which SHA-256 code the `sha2` crate runs on this machine, found the way `sha2` finds it.
//!
//! `sha2` 0.11 picks its SHA-256 compression function in two steps. At build time, the
//! `sha2_backend` / `sha2_256_backend` configuration flags (`RUSTFLAGS='--cfg
//! sha2_backend="soft"'`) force one backend; LoongArch64 always takes its assembly and WASM
//! with `simd128` its SIMD code. Otherwise, on x86 and x86-64 it asks `cpufeatures` at run
//! time for the SHA extensions (`sha` and `sse4.1`, CPUID) and on AArch64 for the `sha2`
//! crypto extension (`HWCAP`), and falls back to its portable code. The portable code is plain
//! Rust compiled for the target's baseline (SSE2 on x86-64): `sha2` has no AVX2 path for
//! SHA-256 (its AVX2 code is SHA-512's), so an x86 CPU without SHA-NI hashes at the portable
//! rate, about a third of SHA-NI's. The flags are configuration of the whole build, so this
//! crate sees the same `cfg` values `sha2` was compiled with; the run-time tests are the
//! standard library's, which read the same CPUID bits and `HWCAP` words as `cpufeatures`
//! (both honour a feature enabled at compile time).

/// The SHA-256 code that hashes a load's files on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Implementation {
    /// The x86 SHA extensions (SHA-NI: `sha256rnds2`, `sha256msg1/2`) with SSE4.1.
    ShaNi,
    /// The AArch64 cryptographic extension's SHA-256 instructions (`sha256h`, `sha256su0/1`).
    Aarch64Sha2,
    /// LoongArch64 assembly.
    Loongarch64Asm,
    /// WebAssembly `simd128`.
    Wasm32Simd128,
    /// The RISC-V `Zknh` scalar crypto instructions (forced at build time).
    RiscvZknh,
    /// Portable Rust (no SHA instructions found, or `soft` forced at build time).
    Portable,
}

impl Implementation {
    /// A short name for reports: `sha-ni`, `aarch64-sha2`, `loongarch64-asm`,
    /// `wasm32-simd128`, `riscv-zknh` or `portable`.
    pub fn name(self) -> &'static str {
        match self {
            Implementation::ShaNi => "sha-ni",
            Implementation::Aarch64Sha2 => "aarch64-sha2",
            Implementation::Loongarch64Asm => "loongarch64-asm",
            Implementation::Wasm32Simd128 => "wasm32-simd128",
            Implementation::RiscvZknh => "riscv-zknh",
            Implementation::Portable => "portable",
        }
    }

    /// How it was chosen, in words.
    pub fn reason(self) -> &'static str {
        match self {
            _ if FORCED => "forced at build time (sha2_backend / sha2_256_backend)",
            Implementation::ShaNi => {
                "the CPU has the SHA extensions, sha and sse4.1, detected at run time"
            }
            Implementation::Aarch64Sha2 => {
                "the CPU has the sha2 crypto extension, detected at run time"
            }
            Implementation::Loongarch64Asm | Implementation::Wasm32Simd128 => {
                "the only accelerated code for this target"
            }
            Implementation::RiscvZknh => "forced at build time (sha2_backend)",
            Implementation::Portable => {
                "no SHA instructions detected at run time (sha2 has no AVX2 SHA-256 code)"
            }
        }
    }
}

impl std::fmt::Display for Implementation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.reason())
    }
}

/// Whether the build forces `sha2`'s backend (`RUSTFLAGS='--cfg sha2_backend="..."'`).
const FORCED: bool = cfg!(any(
    sha2_backend = "soft",
    sha2_backend = "riscv-zknh",
    sha2_256_backend = "soft",
    sha2_256_backend = "riscv-zknh",
    sha2_256_backend = "x86-sha",
    sha2_256_backend = "aarch64-sha2",
));

/// The SHA-256 code `sha2` runs on this machine (and so the code that checks a load's files):
/// `sha2`'s own dispatch, repeated.
pub fn implementation() -> Implementation {
    if cfg!(any(sha2_backend = "soft", sha2_256_backend = "soft")) {
        return Implementation::Portable;
    }
    if cfg!(any(sha2_backend = "riscv-zknh", sha2_256_backend = "riscv-zknh")) {
        return Implementation::RiscvZknh;
    }
    if cfg!(sha2_256_backend = "x86-sha") {
        return Implementation::ShaNi;
    }
    if cfg!(sha2_256_backend = "aarch64-sha2") {
        return Implementation::Aarch64Sha2;
    }
    if cfg!(target_arch = "loongarch64") {
        return Implementation::Loongarch64Asm;
    }
    if cfg!(all(target_arch = "wasm32", target_feature = "simd128")) {
        return Implementation::Wasm32Simd128;
    }
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if std::arch::is_x86_feature_detected!("sha") && std::arch::is_x86_feature_detected!("sse4.1") {
        return Implementation::ShaNi;
    }
    #[cfg(target_arch = "aarch64")]
    if std::arch::is_aarch64_feature_detected!("sha2") {
        return Implementation::Aarch64Sha2;
    }
    Implementation::Portable
}
