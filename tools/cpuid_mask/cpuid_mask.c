/*
 * cpuid_mask.so: run an unmodified program as if its CPU lacked AVX-512 (and
 * AMX, AVX512-BF16, AVX512-VNNI, ...), so that every engine in
 * tools/bench_reference.py (ONNX Runtime's MLAS, oneDNN in PyTorch and
 * OpenVINO, cliper's own kernels and the gemm crate) takes the AVX2 path it
 * would take on a laptop, on the same machine and in the same run.
 *
 *     gcc -O2 -shared -fPIC -o cpuid_mask.so tools/cpuid_mask/cpuid_mask.c -ldl
 *     CPUID_MASK=avx2 LD_PRELOAD=$PWD/cpuid_mask.so python3 ...
 *
 * CPUID_MASK=avx2: AVX2 and FMA only (AVX-VNNI cleared too, so the result
 * is the same on every CPU); avx2-vnni: the same but AVX-VNNI is left as
 * the CPU reports it (a recent laptop, on a CPU that has AVX-VNNI).
 *
 * How: Linux's CPUID faulting (arch_prctl(ARCH_SET_CPUID, 0); the CPU flag
 * `cpuid_fault` in /proc/cpuinfo, on Intel CPUs and on KVM/Firecracker
 * guests) turns every CPUID instruction of the process into a SIGSEGV. The
 * handler runs the real CPUID with faulting briefly off, clears the feature
 * bits of the mask, writes the registers back and steps over the instruction.
 * The setting is inherited by threads and forks and reset by execve, which
 * runs this constructor again through LD_PRELOAD.
 *
 * Limits: the dynamic loader reads CPUID before any preloaded constructor, so
 * glibc's own string functions keep their AVX-512 variants; XGETBV is not
 * intercepted (programs check the CPUID bits first). A handler the program
 * installs for SIGSEGV is kept and called for every other fault: sigaction()
 * and signal() are wrapped so that this one stays in front.
 *
 * Written for this project: Intel's SDE does this by emulation, but it is
 * not redistributable and times nothing faithfully.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

/* Bits cleared for CPUID_MASK=avx2. Leaf 7 subleaf 0: */
#define L7_EBX_AVX512 ((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31))
/* avx512vbmi, avx512_vbmi2, avx512_vnni, avx512_bitalg, avx512_vpopcntdq */
#define L7_ECX_AVX512 ((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14))
/* avx512_4vnniw, avx512_4fmaps, avx512_vp2intersect, amx-bf16, avx512_fp16, amx-tile, amx-int8 */
#define L7_EDX_AVX512 ((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25))
/* Leaf 7 subleaf 1 EAX: avx512_bf16 (5), amx_fp16 (21); avx_vnni (4) and
 * avx_ifma (23) too unless the mask is avx2-vnni. EDX: avx_vnni_int8 (4). */
#define L7S1_EAX_AVX512 ((1u << 5) | (1u << 21))
#define L7S1_EAX_VNNI ((1u << 4) | (1u << 23))
#define L7S1_EDX_VNNI (1u << 4)
/* Leaf 0xD subleaf 0 EAX: the opmask/ZMM (5-7) and AMX tile (17-18) state
 * components, so that a program reading the XSAVE layout agrees. */
#define LD_EAX_AVX512 ((1u << 5) | (1u << 6) | (1u << 7) | (1u << 17) | (1u << 18))

static struct sigaction next_segv; /* the program's own SIGSEGV handler */
static int mask_on;
static int keep_vnni; /* CPUID_MASK=avx2-vnni: AVX-VNNI stays as the CPU has it */

static long set_cpuid(int on) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, on); }

static void masked_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    set_cpuid(1);
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
    set_cpuid(0);
    if (leaf == 7 && sub == 0) {
        r[1] &= ~L7_EBX_AVX512;
        r[2] &= ~L7_ECX_AVX512;
        r[3] &= ~L7_EDX_AVX512;
    } else if (leaf == 7 && sub == 1) {
        r[0] &= ~L7S1_EAX_AVX512;
        if (!keep_vnni) {
            r[0] &= ~L7S1_EAX_VNNI;
            r[3] &= ~L7S1_EDX_VNNI;
        }
    } else if (leaf == 0xd && sub == 0) {
        r[0] &= ~LD_EAX_AVX512;
    }
}

static void on_segv(int sig, siginfo_t *si, void *ctx) {
    ucontext_t *uc = ctx;
    greg_t *g = uc->uc_mcontext.gregs;
    /* A CPUID fault is a #GP: si_code SI_KERNEL, at an instruction 0F A2. */
    if (si->si_code == SI_KERNEL) {
        const unsigned char *ip = (const unsigned char *)g[REG_RIP];
        if (ip[0] == 0x0f && ip[1] == 0xa2) {
            uint32_t r[4];
            masked_cpuid((uint32_t)g[REG_RAX], (uint32_t)g[REG_RCX], r);
            g[REG_RAX] = r[0];
            g[REG_RBX] = r[1];
            g[REG_RCX] = r[2];
            g[REG_RDX] = r[3];
            g[REG_RIP] += 2;
            return;
        }
    }
    if ((next_segv.sa_flags & SA_SIGINFO) && next_segv.sa_sigaction) {
        next_segv.sa_sigaction(sig, si, ctx);
    } else if (next_segv.sa_handler != SIG_DFL && next_segv.sa_handler != SIG_IGN) {
        next_segv.sa_handler(sig);
    } else {
        /* Nobody else wants it: the default action on the re-executed fault. */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        int (*real)(int, const struct sigaction *, struct sigaction *) = dlsym(RTLD_NEXT, "sigaction");
        real(SIGSEGV, &dfl, NULL);
    }
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    static int (*real)(int, const struct sigaction *, struct sigaction *);
    if (!real) real = dlsym(RTLD_NEXT, "sigaction");
    if (sig != SIGSEGV || !mask_on) return real(sig, act, old);
    if (old) *old = next_segv;
    if (act) next_segv = *act;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    static sighandler_t (*real)(int, sighandler_t);
    if (!real) real = dlsym(RTLD_NEXT, "signal");
    if (sig != SIGSEGV || !mask_on) return real(sig, handler);
    sighandler_t before = next_segv.sa_handler;
    memset(&next_segv, 0, sizeof next_segv);
    next_segv.sa_handler = handler;
    return before;
}

__attribute__((constructor)) static void start(void) {
    const char *which = getenv("CPUID_MASK");
    if (!which || (strcmp(which, "avx2") != 0 && strcmp(which, "avx2-vnni") != 0)) {
        if (which && *which)
            fprintf(stderr, "cpuid_mask: CPUID_MASK=%s is not known (avx2, avx2-vnni); nothing masked\n", which);
        return;
    }
    keep_vnni = strcmp(which, "avx2-vnni") == 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    int (*real)(int, const struct sigaction *, struct sigaction *) = dlsym(RTLD_NEXT, "sigaction");
    if (real(SIGSEGV, &sa, &next_segv) != 0 || set_cpuid(0) != 0) {
        fprintf(stderr, "cpuid_mask: this CPU or kernel has no CPUID faulting (no `cpuid_fault` in /proc/cpuinfo); nothing masked\n");
        real(SIGSEGV, &next_segv, NULL);
        return;
    }
    mask_on = 1;
}
