//! What the kernel says the CPU offers, as the independent reference for the SHA-256 code
//! `sha2` picks (shared by the engine's and the CLI's tests).

/// The SHA-256 code `sha2` should pick on this CPU, from the kernel's `/proc/cpuinfo` (x86:
/// `flags` with `sha_ni` and `sse4_1`; AArch64: `Features` with `sha2`) as the independent
/// reference, or `None` when cpuinfo cannot be read or names neither field.
pub fn implementation_from_cpuinfo() -> Option<&'static str> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let words = |field: &str| -> Option<Vec<String>> {
        let line =
            cpuinfo.lines().find(|l| l.split(':').next().is_some_and(|k| k.trim() == field))?;
        Some(line.split(':').nth(1)?.split_whitespace().map(str::to_owned).collect())
    };
    let has = |list: &[String], w: &str| list.iter().any(|f| f == w);
    if let Some(flags) = words("flags") {
        let sha_ni = has(&flags, "sha_ni") && has(&flags, "sse4_1");
        return Some(if sha_ni { "sha-ni" } else { "portable" });
    }
    let features = words("Features")?;
    Some(if has(&features, "sha2") { "aarch64-sha2" } else { "portable" })
}
