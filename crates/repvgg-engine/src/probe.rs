//! What the engine reads about the machine it runs on, once per process. The instruction
//! set is [`repvgg_kernels::Isa::best`].

use std::sync::OnceLock;

use crate::tuning::DEFAULT_L2_BYTES;

/// The L2 cache of CPU 0 as Linux reports it, else [`DEFAULT_L2_BYTES`].
pub fn l2_bytes() -> usize {
    static L2: OnceLock<usize> = OnceLock::new();
    *L2.get_or_init(|| read_l2_bytes().unwrap_or(DEFAULT_L2_BYTES))
}

/// Whether this processor runs 512-bit instructions on 256-bit units (AMD's Zen 4, family
/// 19h with AVX-512): its AVX-512 kernels then multiply no faster than AVX2's, half the rate
/// of a full-width core, so trading memory reads for fewer products pays where it would not
/// on a full-width one.
pub fn avx512_on_256_bit_units() -> bool {
    static HALF: OnceLock<bool> = OnceLock::new();
    *HALF.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::__cpuid;
            let vendor = __cpuid(0);
            let amd = (vendor.ebx, vendor.edx, vendor.ecx)
                == (
                    u32::from_le_bytes(*b"Auth"),
                    u32::from_le_bytes(*b"enti"),
                    u32::from_le_bytes(*b"cAMD"),
                );
            let signature = __cpuid(1).eax;
            let base = (signature >> 8) & 0xf;
            let family = if base == 0xf {
                base + ((signature >> 20) & 0xff)
            } else {
                base
            };
            amd && family == 0x19 && std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

fn read_l2_bytes() -> Option<usize> {
    // Linux numbers a CPU's caches index0, index1, ...: find the one whose level is 2.
    let dir = "/sys/devices/system/cpu/cpu0/cache";
    let read = |index: usize, file: &str| {
        std::fs::read_to_string(format!("{dir}/index{index}/{file}")).ok()
    };
    let size = (0..8)
        .find(|&i| read(i, "level").is_some_and(|level| level.trim() == "2"))
        .and_then(|i| read(i, "size"))?;
    parse_cache_size(&size).filter(|&bytes| bytes >= 64 << 10)
}

/// sysfs's `2048K` or `2M` (or plain bytes) in bytes.
fn parse_cache_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let (digits, scale) = match text.strip_suffix('K') {
        Some(d) => (d, 1 << 10),
        None => match text.strip_suffix('M') {
            Some(d) => (d, 1 << 20),
            None => (text, 1),
        },
    };
    digits.parse::<usize>().ok().map(|n| n * scale)
}

/// Memory this process can still take, in bytes: the kernel's MemAvailable, lowered to what a
/// cgroup (a container's limit) leaves; `None` where neither can be read.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let available = meminfo.as_deref().and_then(|text| {
        let kb: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    });
    let read_u64 =
        |path: &str| -> Option<u64> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
    let cgroup = match (
        read_u64("/sys/fs/cgroup/memory.max"),
        read_u64("/sys/fs/cgroup/memory.current"),
    ) {
        (Some(max), Some(current)) => Some(max.saturating_sub(current)),
        _ => None,
    };
    match (available, cgroup) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_sizes_parse_in_sysfs_units() {
        assert_eq!(parse_cache_size("2048K\n"), Some(2 << 20));
        assert_eq!(parse_cache_size("1M"), Some(1 << 20));
        assert_eq!(parse_cache_size("65536"), Some(65536));
        assert_eq!(parse_cache_size("lots"), None);
        assert!(l2_bytes() >= 64 << 10);
    }
}
