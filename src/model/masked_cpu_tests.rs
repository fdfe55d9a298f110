//! The CPU paths of a laptop, tested on a server: the model's own unit
//! tests run again in a child process whose CPUID says "no AVX-512, no
//! AVX512-BF16/VNNI, no AMX" (`tools/cpuid_mask`, through Linux's CPUID
//! faulting), so the dispatch of every kernel (the 8-bit path, the f32
//! products, the vectorised element-wise loops, oneDNN's choice) is checked
//! on the path an AVX2 CPU takes, against the same references.

use std::path::{Path, PathBuf};
use std::process::Command;

const CHILD: &str = "CLIPER_TEST_CPUID_MASKED";

/// Builds the mask library, or says why it cannot be used here.
fn build_mask() -> Result<PathBuf, Box<dyn std::error::Error>> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default();
    if !flags.split_whitespace().any(|f| f == "avx512f") {
        return Err("this CPU has no AVX-512: the other tests already run its AVX2 path".into());
    }
    if !flags.split_whitespace().any(|f| f == "cpuid_fault") {
        return Err("this CPU or kernel has no CPUID faulting (`cpuid_fault`)".into());
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/cpuid_mask/cpuid_mask.c");
    let out = std::env::temp_dir().join(format!("cliper-cpuid-mask-{}.so", std::process::id()));
    let status = Command::new("cc")
        .args(["-O2", "-shared", "-fPIC", "-o"])
        .arg(&out)
        .arg(&src)
        .arg("-ldl")
        .status()
        .map_err(|e| format!("no C compiler (`cc`): {e}"))?;
    if !status.success() {
        return Err(format!("`cc` could not build {}", src.display()).into());
    }
    Ok(out)
}

#[test]
fn model_tests_pass_on_the_avx2_path() {
    if std::env::var_os(CHILD).is_some() {
        return;
    }
    let lib = match build_mask() {
        Ok(lib) => lib,
        Err(why) => {
            eprintln!("NOTICE: the AVX2 path under a CPUID mask is not tested: {why}");
            return;
        }
    };
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = Command::new(exe)
        .args([
            "model::vision_cpu::",
            "model::gemm_i8::",
            "model::gemm_f32::",
            "model::onednn::",
            "vision::resize::",
            "vision::cnn::",
            "model::vision::",
            "model::masked_cpu_tests::kernels_follow_the_masked_cpuid",
            "--test-threads",
            "2",
            // The probe's line must reach this process.
            "--nocapture",
        ])
        .env("LD_PRELOAD", &lib)
        .env("CPUID_MASK", "avx2")
        .env(CHILD, "1")
        .env_remove("CLIPER_ISA")
        .env_remove("CLIPER_F32")
        .output()
        .expect("the test binary runs again");
    let _ = std::fs::remove_file(&lib);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the model's tests failed on the AVX2 path:\n{stdout}\n{stderr}"
    );
    // The probe below ran (not filtered away) and saw the mask, and the
    // kernels' own tests ran with it.
    assert!(
        stderr.contains("masked CPUID seen: q8 avx2"),
        "the masked child did not see an AVX2-only CPU:\n{stdout}\n{stderr}"
    );
    let passed: usize = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("test result: ok. "))
        .filter_map(|l| l.split_whitespace().next()?.parse::<usize>().ok())
        .sum();
    assert!(
        passed >= 15,
        "only {passed} tests ran under the mask:\n{stdout}"
    );
}

/// Run by the test above in the masked child: every dispatcher must see
/// the CPU the mask describes, or the other tests would not test its path.
#[test]
fn kernels_follow_the_masked_cpuid() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    use std::arch::is_x86_feature_detected as has;
    assert!(!has!("avx512f") && !has!("avx512vnni") && !has!("avx512bf16"));
    assert!(has!("avx2") && has!("fma"));
    assert_eq!(super::gemm_i8::Isa::best(), Some(super::gemm_i8::Isa::Avx2));
    assert_eq!(super::vision_cpu::f32_isa(), "avx2");
    if let Ok(isa) = super::onednn::isa() {
        assert!(!isa.starts_with("avx512"), "oneDNN still runs {isa}");
        assert!(!super::onednn::native_bf16().unwrap_or(false));
    }
    eprintln!("masked CPUID seen: q8 avx2, f32 avx2");
}
