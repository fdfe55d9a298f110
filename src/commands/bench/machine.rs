//! What the benchmark says of the machine it ran on: the CPU and its
//! features, and the process's peak memory.

/// The CPU's model name and the features our kernels and the peers' use,
/// as Linux names them, e.g. `AMD EPYC (avx2 fma avx512f avx512_vnni
/// avx512_bf16)`. The features are what CPUID says to this process (what
/// the kernels dispatch on, so a CPUID mask such as
/// `tools/cpuid_mask` shows here), not `/proc/cpuinfo`'s list.
pub fn cpu_summary() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let name = info
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let features = cpu_features();
    if features.is_empty() {
        name
    } else {
        format!("{name} ({})", features.join(" "))
    }
}

/// The x86 features that choose a kernel here, in Linux's spelling.
#[cfg(target_arch = "x86_64")]
fn cpu_features() -> Vec<&'static str> {
    use std::arch::is_x86_feature_detected as has;
    // AMX has no stable detection macro: CPUID leaf 7, EDX bits 22
    // (amx_bf16) and 25 (amx_int8).
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    [
        ("avx2", has!("avx2")),
        ("fma", has!("fma")),
        ("avx_vnni", has!("avxvnni")),
        ("avx512f", has!("avx512f")),
        ("avx512_vnni", has!("avx512vnni")),
        ("avx512_bf16", has!("avx512bf16")),
        ("amx_bf16", leaf7.edx & (1 << 22) != 0),
        ("amx_int8", leaf7.edx & (1 << 25) != 0),
    ]
    .into_iter()
    .filter_map(|(name, present)| present.then_some(name))
    .collect()
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_features() -> Vec<&'static str> {
    Vec::new()
}

/// Peak resident memory of this process (`VmHWM`), in MB.
pub fn peak_memory_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
