//! Human-readable byte counts, and the bounds of the numeric options: every size typed in MiB
//! is checked against its limit when the command line is parsed (clap reports the option and
//! the range), and turned into bytes with checked arithmetic, so no value wraps or overflows.

use clap::builder::RangedU64ValueParser;

/// The largest read, GET or buffered read in MiB: 1 GiB (`CHUNK_BYTES_MAX`).
pub const READ_MIB_MAX: u64 = (gantry::config::CHUNK_BYTES_MAX >> 20) as u64;
/// The largest staging ring in MiB: 64 GiB of pinned host memory.
pub const STAGING_MIB_MAX: u64 = 64 << 10;
/// The largest `--window-mib`: 1 TiB, more scratch than any GPU holds.
pub const WINDOW_MIB_MAX: u64 = 1 << 20;
/// The largest `--piece-mib`: 1 GiB.
pub const PIECE_MIB_MAX: u64 = 1 << 10;
/// The longest `--rank-timeout-s`: a day.
pub const RANK_TIMEOUT_S_MAX: u64 = 86_400;
/// The most `bench --repeat` measurements.
pub const REPEAT_MAX: u64 = 100;

/// A parser of an option taking 1 to `max`.
pub fn one_to<T>(max: u64) -> RangedU64ValueParser<T>
where
    T: TryFrom<u64> + Clone + Send + Sync + 'static,
    <T as TryFrom<u64>>::Error: std::error::Error + Send + Sync + 'static,
{
    RangedU64ValueParser::<T>::new().range(1..=max)
}

/// `mib` MiB in bytes; an error naming `option` where that does not fit (never a wrap).
pub fn mib_bytes(option: &str, mib: u64) -> Result<u64, String> {
    mib.checked_mul(1 << 20).ok_or_else(|| format!("{option} {mib}: too large"))
}

/// [`mib_bytes`] as a `usize`.
pub fn mib_usize(option: &str, mib: usize) -> Result<usize, String> {
    mib.checked_mul(1 << 20).ok_or_else(|| format!("{option} {mib}: too large"))
}

/// `1536` -> `"1.50 KiB"`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats() {
        assert_eq!(super::bytes(0), "0 B");
        assert_eq!(super::bytes(1023), "1023 B");
        assert_eq!(super::bytes(1536), "1.50 KiB");
        assert_eq!(super::bytes(16 << 30), "16.00 GiB");
    }

    #[test]
    fn sizes_never_wrap() {
        assert_eq!(super::mib_bytes("--x", 3), Ok(3 << 20));
        assert!(super::mib_bytes("--x", u64::MAX >> 19).is_err());
        assert!(super::mib_usize("--x", usize::MAX).unwrap_err().contains("--x"));
    }
}
