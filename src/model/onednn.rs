//! Matrix products of the fused CPU forward through oneDNN, loaded at run
//! time (`libdnnl.so.2`, Debian's `libdnnl2`; oneDNN 2.x's C API).
//!
//! oneDNN is what PyTorch and OpenVINO run on Intel CPUs: its brgemm
//! kernels use AMX tiles (bf16, int8) where the CPU has them, AVX512-BF16
//! `vdpbf16ps` or AVX-512 VNNI `vpdpbusd` where it has those, and plain
//! AVX-512 or AVX2 otherwise. It picks the instruction set itself, at
//! primitive creation; setting `ONEDNN_MAX_CPU_ISA` (its own variable, for
//! example `AVX2`) caps it, which is how the AVX2 path is tested on a CPU
//! that has more.
//!
//! The library is opened with `dlopen`, not linked: a machine without it
//! runs this crate's own kernels. `--precision bf16` needs it (with a
//! message that says what to install); `f32`, `q8` and `auto` use it where
//! it loads and is the faster path here, and run without it otherwise;
//! `CLIPER_Q8=onednn` and `CLIPER_ATTENTION=bf16` (which applies to the
//! reduced precisions; f32 keeps f32 attention) insist on it.
//!
//! Threads: Debian builds oneDNN on OpenMP. OpenMP's threads beside the
//! model pool's oversubscribed the cores, so a product's rows are split
//! between the pool's threads ([`Linear::apply`]) and each runs oneDNN on
//! one OpenMP thread, its own (a primitive is created for the thread
//! count it runs on, since oneDNN fixes that at creation); a product too
//! small to split runs on the pool's count of OpenMP threads, which sleep
//! at once after it (`OMP_WAIT_POLICY=passive`, unless the user set it). Every primitive gets a scratchpad from the calling thread
//! (oneDNN's default shares one between all primitives, which concurrent
//! products overwrote).
//!
//! The weights are reordered once, at load, into the blocked layout the
//! kernel wants; a primitive is created per (rows, destination stride,
//! accumulate) and kept. Activations are rounded to bf16 per product
//! (nearest even, as oneDNN's own reorder does) for bf16 products, and
//! quantized to u8 per row for int8 ones ([`DataType::Int8`]).

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::{Mutex, OnceLock};

use crate::model::scratch::{Pool, Scratch};
use rayon::prelude::*;

/// Why the oneDNN path cannot run.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OneDnnError {
    #[error("oneDNN ({library}) could not be loaded: {reason}. Install it (Debian/Ubuntu: apt-get install libdnnl2), or set CLIPER_ONEDNN to its path; --precision q8 or f32 run without it (with CLIPER_Q8 and CLIPER_ATTENTION unset)")]
    Missing { library: String, reason: String },
    #[error("CLIPER_ONEDNN=off: oneDNN is switched off; --precision q8 or f32 run without it (with CLIPER_Q8 and CLIPER_ATTENTION unset)")]
    Off,
    #[error("{library} is oneDNN {version}; this build speaks oneDNN 2.x's C API (Debian 12's libdnnl2 is 2.6)")]
    Version { library: String, version: String },
    #[error("oneDNN {what} failed (status {status})")]
    Call { what: &'static str, status: i32 },
    #[error("oneDNN has only its reference kernel ({impl_name}) for this product here; use --precision q8 or f32")]
    Slow { impl_name: String },
    #[error("oneDNN may not use bf16 instructions here (this CPU lacks avx512_bf16 and amx_bf16, or ONEDNN_MAX_CPU_ISA caps them): emulated bf16 is slower than f32; use --precision q8")]
    NoBf16,
    #[error("oneDNN may not use VNNI or AMX int8 instructions here (oneDNN runs {isa}): its int8 products without them add u8 x s8 pairs in 16 bits, which saturate; unset CLIPER_Q8 (or set CLIPER_Q8=own) to run this crate's own 8-bit kernels")]
    NoInt8 { isa: &'static str },
}

/// The element type of a oneDNN product's weights and inputs; the output
/// the caller gets is always f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    F32,
    Bf16,
    /// 8 bits: weights s8, symmetric, one scale per output channel;
    /// inputs u8, asymmetric, one scale and zero point per row, quantized
    /// at each product. oneDNN sums in i32 (AMX-INT8 `tdpbusd` tiles, or
    /// VNNI `vpdpbusd`); the rescale, the zero point's correction and the
    /// bias are applied here ([`dequantize_row`]).
    Int8,
}

impl DataType {
    /// The type of the inputs (`src`) oneDNN reads.
    fn src_code(self) -> c_int {
        match self {
            DataType::F32 => DT_F32,
            DataType::Bf16 => DT_BF16,
            DataType::Int8 => DT_U8,
        }
    }

    /// The type of the weights oneDNN reads.
    fn weights_code(self) -> c_int {
        match self {
            DataType::Int8 => DT_S8,
            other => other.src_code(),
        }
    }

    /// The type oneDNN writes.
    fn dst_code(self) -> c_int {
        match self {
            DataType::Int8 => DT_S32,
            _ => DT_F32,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DataType::F32 => "f32",
            DataType::Bf16 => "bf16",
            DataType::Int8 => "q8",
        }
    }
}

// oneDNN 2.x constants (dnnl_types.h, dnnl_config.h).
const SUCCESS: c_int = 0;
const ENGINE_CPU: c_int = 1;
const STREAM_DEFAULT: c_uint = 1;
const DT_BF16: c_int = 2;
const DT_F32: c_int = 3;
const DT_S32: c_int = 4;
const DT_S8: c_int = 5;
const DT_U8: c_int = 6;
const TAG_ANY: c_int = 1;
const TAG_AB: c_int = 3;
const ARG_SRC: c_int = 1;
const ARG_DST: c_int = 17;
const ARG_WEIGHTS: c_int = 33;
const ARG_BIAS: c_int = 41;
const QUERY_IMPL_INFO_STR: c_int = 8;
const QUERY_WEIGHTS_MD: c_int = 131;
const QUERY_SCRATCHPAD_MD: c_int = 136;
const ARG_SCRATCHPAD: c_int = 80;
const SCRATCHPAD_MODE_USER: c_int = 1;
const MAX_NDIMS: usize = 12;

/// `dnnl_memory_desc_t`, opaque: 696 bytes in oneDNN 2.x (its ABI is
/// stable within a major version, and only 2.x is loaded); room is left.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct MemoryDesc([u8; 2048]);

/// Bytes of oneDNN 2.x's `dnnl_memory_desc_t`.
const MD_BYTES: usize = 696;

/// A copy of the descriptor at `md`, which oneDNN owns: only its own bytes
/// are read (a whole `MemoryDesc` would read past it).
///
/// # Safety
/// `md` points to a valid `dnnl_memory_desc_t` of oneDNN 2.x.
unsafe fn copy_md(md: *const MemoryDesc) -> Box<MemoryDesc> {
    let mut out = Box::new(MemoryDesc([0; 2048]));
    // SAFETY: the caller's descriptor holds MD_BYTES bytes; `out` more.
    unsafe { std::ptr::copy_nonoverlapping(md as *const u8, out.0.as_mut_ptr(), MD_BYTES) };
    out
}

/// `dnnl_matmul_desc_t`, opaque (2,800 bytes in 2.6).
#[repr(C, align(16))]
struct OpDesc([u8; 8192]);

type Dims = [i64; MAX_NDIMS];
type Handle = *mut c_void;

#[repr(C)]
struct ExecArg {
    arg: c_int,
    memory: Handle,
}

#[repr(C)]
struct Version {
    major: c_int,
    minor: c_int,
    patch: c_int,
    hash: *const c_char,
    cpu_runtime: c_uint,
    gpu_runtime: c_uint,
}

type Status = c_int;

/// The C functions used, resolved once.
struct Api {
    _lib: libloading::Library,
    engine: Handle,
    stream_create: unsafe extern "C" fn(*mut Handle, Handle, c_uint) -> Status,
    stream_wait: unsafe extern "C" fn(Handle) -> Status,
    md_by_tag: unsafe extern "C" fn(*mut MemoryDesc, c_int, *const i64, c_int, c_int) -> Status,
    md_by_strides:
        unsafe extern "C" fn(*mut MemoryDesc, c_int, *const i64, c_int, *const i64) -> Status,
    md_size: unsafe extern "C" fn(*const MemoryDesc) -> usize,
    matmul_desc: unsafe extern "C" fn(
        *mut OpDesc,
        *const MemoryDesc,
        *const MemoryDesc,
        *const MemoryDesc,
        *const MemoryDesc,
    ) -> Status,
    attr_create: unsafe extern "C" fn(*mut Handle) -> Status,
    attr_destroy: unsafe extern "C" fn(Handle) -> Status,
    attr_post_ops: unsafe extern "C" fn(Handle, Handle) -> Status,
    attr_scratchpad_mode: unsafe extern "C" fn(Handle, c_int) -> Status,
    post_ops_create: unsafe extern "C" fn(*mut Handle) -> Status,
    post_ops_destroy: unsafe extern "C" fn(Handle) -> Status,
    post_ops_sum: unsafe extern "C" fn(Handle, f32) -> Status,
    pd_create: unsafe extern "C" fn(*mut Handle, *const c_void, Handle, Handle, Handle) -> Status,
    pd_destroy: unsafe extern "C" fn(Handle) -> Status,
    pd_query: unsafe extern "C" fn(Handle, c_int, c_int, *mut c_void) -> Status,
    pd_query_md: unsafe extern "C" fn(Handle, c_int, c_int) -> *const MemoryDesc,
    reorder_pd: unsafe extern "C" fn(
        *mut Handle,
        *const MemoryDesc,
        Handle,
        *const MemoryDesc,
        Handle,
        Handle,
    ) -> Status,
    primitive_create: unsafe extern "C" fn(*mut Handle, Handle) -> Status,
    primitive_destroy: unsafe extern "C" fn(Handle) -> Status,
    execute: unsafe extern "C" fn(Handle, Handle, c_int, *const ExecArg) -> Status,
    memory_create: unsafe extern "C" fn(*mut Handle, *const MemoryDesc, Handle, Handle) -> Status,
    memory_destroy: unsafe extern "C" fn(Handle) -> Status,
    effective_isa: unsafe extern "C" fn() -> c_int,
    omp_set_num_threads: Option<unsafe extern "C" fn(c_int)>,
}

// SAFETY: oneDNN's engine, primitives and memory objects may be used from
// any thread; streams, which may not, are per thread (`STREAM`).
unsafe impl Send for Api {}
unsafe impl Sync for Api {}

static API: OnceLock<Result<Api, OneDnnError>> = OnceLock::new();

thread_local! {
    /// This thread's oneDNN stream (a CPU stream executes in the calling
    /// thread; one may not be shared by threads executing at once).
    static STREAM: std::cell::Cell<Handle> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

fn check(what: &'static str, status: Status) -> Result<(), OneDnnError> {
    if status == SUCCESS {
        Ok(())
    } else {
        Err(OneDnnError::Call { what, status })
    }
}

fn api() -> Result<&'static Api, OneDnnError> {
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}

/// Whether oneDNN can be loaded here (it is loaded by the first call).
pub fn available() -> Result<(), OneDnnError> {
    api().map(|_| ())
}

fn load() -> Result<Api, OneDnnError> {
    let library = match std::env::var("CLIPER_ONEDNN") {
        Ok(v) if v.trim().eq_ignore_ascii_case("off") => return Err(OneDnnError::Off),
        Ok(v) if !v.trim().is_empty() => v.trim().to_string(),
        _ => "libdnnl.so.2".to_string(),
    };
    request_amx_tiles();
    // libgomp reads its settings when it is loaded, which is now.
    if std::env::var_os("OMP_WAIT_POLICY").is_none() {
        std::env::set_var("OMP_WAIT_POLICY", "passive");
    }
    let missing = |reason: String| OneDnnError::Missing {
        library: library.clone(),
        reason,
    };
    // SAFETY: loading runs the library's initialisers; oneDNN's and
    // libgomp's have no preconditions.
    let lib = unsafe { libloading::Library::new(&library) }.map_err(|e| missing(e.to_string()))?;
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: the symbol is oneDNN 2.x's function of this signature
            // (dnnl.h); the version is checked below before any call but
            // `dnnl_version` itself.
            *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                .map_err(|e| missing(format!("{} is missing: {e}", $name)))?
        };
    }
    let version: unsafe extern "C" fn() -> *const Version = sym!("dnnl_version");
    // SAFETY: dnnl_version returns a pointer to a static struct.
    let v = unsafe { &*version() };
    if v.major != 2 {
        return Err(OneDnnError::Version {
            library,
            version: format!("{}.{}.{}", v.major, v.minor, v.patch),
        });
    }
    // The OpenMP runtime oneDNN was linked with (libgomp for Debian's,
    // libiomp5 for Intel's builds), found through oneDNN's own handle,
    // whose lookups search its dependencies.
    // SAFETY: omp_set_num_threads(int) of the OpenMP API.
    let omp_set_num_threads =
        unsafe { lib.get::<unsafe extern "C" fn(c_int)>(b"omp_set_num_threads\0") }
            .ok()
            .map(|f| *f);
    // dnnl_config.h: DNNL_RUNTIME_SEQ 1, DNNL_RUNTIME_OMP 2.
    if !matches!(v.cpu_runtime, 1 | 2) || (v.cpu_runtime == 2 && omp_set_num_threads.is_none()) {
        log::warn!(
            "{library}: oneDNN's CPU threading runtime ({}) cannot be limited per product here; products split between the model's threads may run more threads than cores",
            v.cpu_runtime
        );
    }
    let engine_create: unsafe extern "C" fn(*mut Handle, c_int, usize) -> Status =
        sym!("dnnl_engine_create");
    let mut engine = std::ptr::null_mut();
    // SAFETY: a valid out-pointer.
    check("engine creation", unsafe {
        engine_create(&mut engine, ENGINE_CPU, 0)
    })?;
    Ok(Api {
        engine,
        stream_create: sym!("dnnl_stream_create"),
        stream_wait: sym!("dnnl_stream_wait"),
        md_by_tag: sym!("dnnl_memory_desc_init_by_tag"),
        md_by_strides: sym!("dnnl_memory_desc_init_by_strides"),
        md_size: sym!("dnnl_memory_desc_get_size"),
        matmul_desc: sym!("dnnl_matmul_desc_init"),
        attr_create: sym!("dnnl_primitive_attr_create"),
        attr_destroy: sym!("dnnl_primitive_attr_destroy"),
        attr_post_ops: sym!("dnnl_primitive_attr_set_post_ops"),
        attr_scratchpad_mode: sym!("dnnl_primitive_attr_set_scratchpad_mode"),
        post_ops_create: sym!("dnnl_post_ops_create"),
        post_ops_destroy: sym!("dnnl_post_ops_destroy"),
        post_ops_sum: sym!("dnnl_post_ops_append_sum"),
        pd_create: sym!("dnnl_primitive_desc_create"),
        pd_destroy: sym!("dnnl_primitive_desc_destroy"),
        pd_query: sym!("dnnl_primitive_desc_query"),
        pd_query_md: sym!("dnnl_primitive_desc_query_md"),
        reorder_pd: sym!("dnnl_reorder_primitive_desc_create"),
        primitive_create: sym!("dnnl_primitive_create"),
        primitive_destroy: sym!("dnnl_primitive_destroy"),
        execute: sym!("dnnl_primitive_execute"),
        memory_create: sym!("dnnl_memory_create"),
        memory_destroy: sym!("dnnl_memory_destroy"),
        effective_isa: sym!("dnnl_get_effective_cpu_isa"),
        omp_set_num_threads,
        _lib: lib,
    })
}

/// On a CPU with AMX tiles, asks Linux (5.16 and later) for the tile
/// state, which a process must do before its first tile instruction
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`; the permission
/// is the whole process's). oneDNN asks too in its recent releases; asking
/// here does not depend on which one is installed. A refusal is logged and
/// otherwise left to oneDNN, which then finds no AMX and runs AVX-512.
fn request_amx_tiles() {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        // CPUID leaf 7 (where leaf 0's EAX reaches it): EDX bit 24 is
        // AMX-TILE.
        let amx = std::arch::x86_64::__cpuid(0).eax >= 7
            && std::arch::x86_64::__cpuid_count(7, 0).edx & (1 << 24) != 0;
        if !amx {
            return;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with this request only changes the process's
        // permitted extended state; it takes no pointers.
        let status = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        if status != 0 {
            log::warn!(
                "this CPU has AMX tiles but Linux refused them ({}): oneDNN will run without AMX",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The instruction set oneDNN's kernels run on here (after
/// `ONEDNN_MAX_CPU_ISA`), as oneDNN names it.
pub fn isa() -> Result<&'static str, OneDnnError> {
    let api = api()?;
    // SAFETY: no arguments.
    let code = unsafe { (api.effective_isa)() };
    Ok(match code {
        0x1 => "sse41",
        0x3 => "avx",
        0x7 => "avx2",
        0x407 => "avx2_vnni",
        0x27 => "avx512_core",
        0x67 => "avx512_core_vnni",
        0xe7 => "avx512_core_bf16",
        0x3e7 => "avx512_core_amx",
        _ => "other",
    })
}

/// Whether this CPU runs bf16 products natively (AVX512-BF16 or AMX-BF16),
/// as far as oneDNN may use them (`ONEDNN_MAX_CPU_ISA`).
pub fn native_bf16() -> Result<bool, OneDnnError> {
    Ok(matches!(isa()?, "avx512_core_bf16" | "avx512_core_amx"))
}

/// Whether oneDNN runs u8 x s8 products here with instructions that sum in
/// 32 bits (AVX-512 VNNI or AMX-INT8), as far as it may use them. Without
/// them its int8 kernels pair products in 16 bits (`vpmaddubsw`), which
/// saturate on full-range u8 inputs. AVX-VNNI CPUs (`avx2_vnni`) are left
/// out: whether oneDNN 2.6's int8 matmul uses `vpdpbusd` there was not
/// measured (no such CPU was at hand), and this crate's `avx-vnni` kernel
/// runs there.
pub fn native_int8() -> Result<bool, OneDnnError> {
    Ok(matches!(
        isa()?,
        "avx512_core_vnni" | "avx512_core_bf16" | "avx512_core_amx"
    ))
}

fn with_stream<T>(f: impl FnOnce(Handle) -> Result<T, OneDnnError>) -> Result<T, OneDnnError> {
    let api = api()?;
    let mut s = STREAM.with(|s| s.get());
    if s.is_null() {
        // SAFETY: a valid out-pointer and engine. The stream lives as long
        // as the thread (a few hundred bytes; threads here are long-lived).
        check("stream creation", unsafe {
            (api.stream_create)(&mut s, api.engine, STREAM_DEFAULT)
        })?;
        STREAM.with(|c| c.set(s));
    }
    f(s)
}

/// An owned oneDNN object, destroyed on drop.
struct Owned {
    handle: Handle,
    destroy: unsafe extern "C" fn(Handle) -> Status,
}

// SAFETY: see `Api`: primitives and memory may be used from any thread.
unsafe impl Send for Owned {}
unsafe impl Sync for Owned {}

impl Drop for Owned {
    fn drop(&mut self) {
        // SAFETY: created by the matching create call, destroyed once.
        unsafe { (self.destroy)(self.handle) };
    }
}

fn md_by_tag(api: &Api, dims: &[i64], dt: c_int, tag: c_int) -> Result<MemoryDesc, OneDnnError> {
    let mut md = MemoryDesc([0; 2048]);
    let mut d: Dims = [0; MAX_NDIMS];
    d[..dims.len()].copy_from_slice(dims);
    // SAFETY: valid out-pointer and dims.
    check("memory descriptor", unsafe {
        (api.md_by_tag)(&mut md, dims.len() as c_int, d.as_ptr(), dt, tag)
    })?;
    Ok(md)
}

fn md_by_strides(
    api: &Api,
    dims: &[i64],
    strides: &[i64],
    dt: c_int,
) -> Result<MemoryDesc, OneDnnError> {
    let mut md = MemoryDesc([0; 2048]);
    let (mut d, mut s): (Dims, Dims) = ([0; MAX_NDIMS], [0; MAX_NDIMS]);
    d[..dims.len()].copy_from_slice(dims);
    s[..strides.len()].copy_from_slice(strides);
    // SAFETY: valid out-pointer, dims and strides.
    check("memory descriptor", unsafe {
        (api.md_by_strides)(&mut md, dims.len() as c_int, d.as_ptr(), dt, s.as_ptr())
    })?;
    Ok(md)
}

fn memory(api: &Api, md: &MemoryDesc, data: Handle) -> Result<Owned, OneDnnError> {
    let mut m = std::ptr::null_mut();
    // SAFETY: `data` is a buffer of at least `md`'s size that
    // outlives the memory object (callers keep it alive while it is used).
    check("memory creation", unsafe {
        (api.memory_create)(&mut m, md, api.engine, data)
    })?;
    Ok(Owned {
        handle: m,
        destroy: api.memory_destroy,
    })
}

/// A primitive and its descriptor's implementation name.
struct Primitive {
    prim: Owned,
    impl_name: String,
    /// Its scratchpad, which the caller provides (oneDNN's own, in its
    /// default "library" mode, is one buffer shared by every primitive:
    /// two threads running products at once overwrote each other's).
    scratchpad: Option<Box<MemoryDesc>>,
}

thread_local! {
    /// This thread's scratchpad for oneDNN's products, grown as needed.
    static SCRATCHPAD: std::cell::RefCell<Vec<CacheLine>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Sets this thread's OpenMP thread count (at least 1).
fn set_omp_threads(api: &Api, threads: usize) {
    if let Some(set) = api.omp_set_num_threads {
        // SAFETY: omp_set_num_threads only sets this thread's count.
        unsafe { set(threads.max(1) as c_int) };
    }
}

/// Runs `prim` with `args` (and its scratchpad) on this thread's stream,
/// on `omp_threads` OpenMP threads (1: this thread alone).
///
/// # Safety
/// The memories of `args` must match the primitive's descriptors and
/// wrap buffers alive and unaliased until this returns.
unsafe fn run_primitive(
    api: &Api,
    prim: &Primitive,
    mut args: Vec<ExecArg>,
    omp_threads: usize,
) -> Result<(), OneDnnError> {
    set_omp_threads(api, omp_threads);
    SCRATCHPAD.with(|buf| {
        let mut buf = buf.borrow_mut();
        let _scratch = match &prim.scratchpad {
            Some(md) => {
                // SAFETY: a valid descriptor.
                let bytes = unsafe { (api.md_size)(&**md) };
                if buf.len() * 64 < bytes {
                    buf.resize(bytes.div_ceil(64), CacheLine([0; 64]));
                }
                let m = memory(api, md, buf.as_mut_ptr() as Handle)?;
                args.push(ExecArg {
                    arg: ARG_SCRATCHPAD,
                    memory: m.handle,
                });
                Some(m)
            }
            None => None,
        };
        with_stream(|s| {
            // SAFETY: the caller vouches for `args`; the scratchpad is this
            // thread's, as large as the primitive asks, borrowed until the
            // stream is waited on.
            unsafe {
                check(
                    "matmul",
                    (api.execute)(prim.prim.handle, s, args.len() as c_int, args.as_ptr()),
                )?;
                check("stream wait", (api.stream_wait)(s))
            }
        })
    })
}

/// Creates the primitive of `op` for `omp_threads` OpenMP threads: oneDNN
/// fixes a primitive's thread count (and sizes its blocking and scratchpad
/// for it) when it is created, from the calling thread's setting.
fn create_primitive(
    api: &Api,
    op: *const c_void,
    post_sum: bool,
    omp_threads: usize,
) -> Result<(Owned, Primitive), OneDnnError> {
    set_omp_threads(api, omp_threads);
    let mut attr = std::ptr::null_mut();
    // SAFETY (this block): valid out-pointers; every object made here is
    // destroyed here or owned by the result.
    unsafe {
        check("attributes", (api.attr_create)(&mut attr))?;
        let attr = Owned {
            handle: attr,
            destroy: api.attr_destroy,
        };
        if post_sum {
            let mut ops = std::ptr::null_mut();
            check("post-ops", (api.post_ops_create)(&mut ops))?;
            let ops = Owned {
                handle: ops,
                destroy: api.post_ops_destroy,
            };
            check("sum post-op", (api.post_ops_sum)(ops.handle, 1.0))?;
            check(
                "post-op attribute",
                (api.attr_post_ops)(attr.handle, ops.handle),
            )?;
        }
        check(
            "scratchpad mode",
            (api.attr_scratchpad_mode)(attr.handle, SCRATCHPAD_MODE_USER),
        )?;
        let mut pd = std::ptr::null_mut();
        check(
            "matmul primitive descriptor",
            (api.pd_create)(&mut pd, op, attr.handle, api.engine, std::ptr::null_mut()),
        )?;
        let pd = Owned {
            handle: pd,
            destroy: api.pd_destroy,
        };
        let mut name: *const c_char = std::ptr::null();
        let impl_name = match (api.pd_query)(
            pd.handle,
            QUERY_IMPL_INFO_STR,
            0,
            &mut name as *mut _ as *mut c_void,
        ) {
            SUCCESS if !name.is_null() => std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned(),
            _ => "unknown".into(),
        };
        if impl_name.starts_with("ref") {
            // The reference kernel is hundreds of times slower: say so
            // rather than crawl.
            return Err(OneDnnError::Slow { impl_name });
        }
        let scratchpad = {
            let md = (api.pd_query_md)(pd.handle, QUERY_SCRATCHPAD_MD, 0);
            (!md.is_null() && (api.md_size)(md) > 0).then(|| copy_md(md))
        };
        let mut prim = std::ptr::null_mut();
        check(
            "matmul primitive",
            (api.primitive_create)(&mut prim, pd.handle),
        )?;
        Ok((
            pd,
            Primitive {
                prim: Owned {
                    handle: prim,
                    destroy: api.primitive_destroy,
                },
                impl_name,
                scratchpad,
            },
        ))
    }
}

/// 64 bytes aligned to 64: the unit of buffers handed to oneDNN, which
/// wants its operands on cache-line boundaries.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct CacheLine([u8; 64]);

/// The key of a cached primitive: rows, destination row stride,
/// accumulate, OpenMP threads.
type Key = (usize, usize, bool, usize);

/// A linear layer `y = x W^T + b` as a oneDNN matmul with its weights
/// reordered once into the kernel's layout.
pub struct Linear {
    n: usize,
    k: usize,
    dtype: DataType,
    bias: Option<Vec<f32>>,
    weights_md: Box<MemoryDesc>,
    /// The memory object over `weights_buf` (declared first: dropped
    /// before its buffer).
    weights: Owned,
    /// The reordered weights. Allocated here rather than by oneDNN, so that
    /// they come from the process's allocator (mimalloc), which reuses the
    /// pages of the f32 weights freed block by block as they are packed;
    /// oneDNN's own allocation (the C heap) could not, and the two copies
    /// stood side by side: `cliper bench --precision f32` peaked 330 MB
    /// higher.
    #[allow(dead_code)] // read and written by oneDNN, through `weights`
    weights_buf: Box<[CacheLine]>,
    /// The implementation oneDNN chose (for example `brg:avx512_core_amx`).
    impl_name: String,
    prims: Mutex<HashMap<Key, std::sync::Arc<Primitive>>>,
    /// For [`DataType::Int8`], the weights' scales and code sums.
    int8: Option<Int8Weights>,
}

/// What turns an int8 product's i32 sums back into f32, per output
/// channel: `y = scale_x * scale[n] * (sum - zero_x * col_sum[n]) + b[n]`.
pub struct Int8Weights {
    scales: Vec<f32>,
    col_sums: Vec<i32>,
}

impl std::fmt::Debug for Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "onednn::Linear([{}, {}] {} on {})",
            self.n,
            self.k,
            self.dtype.as_str(),
            self.impl_name
        )
    }
}

/// The fewest rows a product is split into per thread ([`Linear::apply`]).
const MIN_SPLIT_ROWS: usize = 64;

/// The rows a layer is first built for: one ViT-B/16 image's tokens.
const TYPICAL_ROWS: usize = 197;

impl Linear {
    /// `w`: the weight [n, k] row-major, or `W^T` [k, n] row-major when
    /// `transposed`; `bias` [n].
    pub fn new(
        w: &[f32],
        transposed: bool,
        bias: Option<&[f32]>,
        n: usize,
        k: usize,
        dtype: DataType,
    ) -> Result<Self, OneDnnError> {
        let api = api()?;
        if dtype == DataType::Bf16 && !native_bf16()? {
            return Err(OneDnnError::NoBf16);
        }
        if dtype == DataType::Int8 && !native_int8()? {
            return Err(OneDnnError::NoInt8 { isa: isa()? });
        }
        assert_eq!(w.len(), n * k, "onednn::Linear: weight length");
        if let Some(b) = bias {
            assert_eq!(b.len(), n, "onednn::Linear: bias length");
        }
        let (ni, ki) = (n as i64, k as i64);
        // 8 bits: the codes in [k, n] order, which the reorder reads.
        let (int8, codes) = if dtype == DataType::Int8 {
            let (q, codes) = quantize_weights(w, transposed, n, k);
            (Some(q), codes)
        } else {
            (None, Vec::new())
        };
        // The weights as the matmul reads them: logical [k, n], in the
        // layout they came in (the 8-bit codes keep it too).
        let (user_type, user_ptr) = match int8 {
            Some(_) => (DT_S8, codes.as_ptr() as Handle),
            None => (DT_F32, w.as_ptr() as Handle),
        };
        let user_strides = if transposed { [ni, 1] } else { [1, ki] };
        let user_md = md_by_strides(api, &[ki, ni], &user_strides, user_type)?;
        // The bias of 8-bit products is added with the rescale, not by oneDNN.
        let onednn_bias = if int8.is_some() { None } else { bias };
        let any_md = md_by_tag(api, &[ki, ni], dtype.weights_code(), TAG_ANY)?;
        let (pd, prim) = Self::matmul(
            api,
            TYPICAL_ROWS,
            n,
            k,
            dtype,
            &any_md,
            n,
            false,
            onednn_bias,
            1,
        )?;
        // SAFETY: a valid primitive descriptor; the returned descriptor is
        // copied before `pd` is destroyed.
        let weights_md = unsafe {
            let md = (api.pd_query_md)(pd.handle, QUERY_WEIGHTS_MD, 0);
            if md.is_null() {
                return Err(OneDnnError::Call {
                    what: "weights layout query",
                    status: -1,
                });
            }
            copy_md(md)
        };
        drop(pd);
        // SAFETY: a valid descriptor.
        let bytes = unsafe { (api.md_size)(&*weights_md) };
        let mut weights_buf = vec![CacheLine([0; 64]); bytes.div_ceil(64)].into_boxed_slice();
        let weights = memory(api, &weights_md, weights_buf.as_mut_ptr() as Handle)?;
        let src = memory(api, &user_md, user_ptr)?;
        // SAFETY (this block): valid descriptors and memories; the reorder
        // reads `w` or `codes` (alive here) and writes the owned weights.
        unsafe {
            let mut rpd = std::ptr::null_mut();
            check(
                "weights reorder descriptor",
                (api.reorder_pd)(
                    &mut rpd,
                    &user_md,
                    api.engine,
                    &*weights_md,
                    api.engine,
                    std::ptr::null_mut(),
                ),
            )?;
            let rpd = Owned {
                handle: rpd,
                destroy: api.pd_destroy,
            };
            let mut r = std::ptr::null_mut();
            check(
                "weights reorder",
                (api.primitive_create)(&mut r, rpd.handle),
            )?;
            let r = Owned {
                handle: r,
                destroy: api.primitive_destroy,
            };
            let args = [
                ExecArg {
                    arg: ARG_SRC,
                    memory: src.handle,
                },
                ExecArg {
                    arg: ARG_DST,
                    memory: weights.handle,
                },
            ];
            with_stream(|s| {
                check(
                    "weights reorder",
                    (api.execute)(r.handle, s, 2, args.as_ptr()),
                )?;
                check("stream wait", (api.stream_wait)(s))
            })?;
        }
        let impl_name = prim.impl_name.clone();
        let mut prims = HashMap::new();
        prims.insert((TYPICAL_ROWS, n, false, 1), std::sync::Arc::new(prim));
        Ok(Self {
            n,
            k,
            dtype,
            bias: bias.map(<[f32]>::to_vec),
            weights_md,
            weights,
            weights_buf,
            impl_name,
            prims: Mutex::new(prims),
            int8,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn matmul(
        api: &Api,
        m: usize,
        n: usize,
        k: usize,
        dtype: DataType,
        weights_md: &MemoryDesc,
        dst_rs: usize,
        add: bool,
        bias: Option<&[f32]>,
        omp_threads: usize,
    ) -> Result<(Owned, Primitive), OneDnnError> {
        let (mi, ni, ki) = (m as i64, n as i64, k as i64);
        let src_md = md_by_tag(api, &[mi, ki], dtype.src_code(), TAG_AB)?;
        let dst_md = md_by_strides(api, &[mi, ni], &[dst_rs as i64, 1], dtype.dst_code())?;
        let bias_md = md_by_tag(api, &[1, ni], DT_F32, TAG_AB)?;
        let mut op = Box::new(OpDesc([0; 8192]));
        // SAFETY: valid descriptors and out-pointer.
        check("matmul descriptor", unsafe {
            (api.matmul_desc)(
                &mut *op,
                &src_md,
                weights_md,
                if bias.is_some() {
                    &bias_md
                } else {
                    std::ptr::null()
                },
                &dst_md,
            )
        })?;
        create_primitive(
            api,
            &*op as *const OpDesc as *const c_void,
            add,
            omp_threads,
        )
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn dtype(&self) -> DataType {
        self.dtype
    }

    /// The implementation oneDNN runs, for example `brg:avx512_core_amx`.
    pub fn impl_name(&self) -> &str {
        &self.impl_name
    }

    /// Bytes of the reordered weights.
    pub fn weight_bytes(&self) -> usize {
        api().map_or(0, |api| {
            // SAFETY: a valid descriptor.
            unsafe { (api.md_size)(&*self.weights_md) }
        })
    }

    fn primitive(
        &self,
        api: &Api,
        m: usize,
        dst_rs: usize,
        add: bool,
        omp_threads: usize,
    ) -> Result<std::sync::Arc<Primitive>, OneDnnError> {
        let key = (m, dst_rs, add, omp_threads);
        let mut prims = self.prims.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = prims.get(&key) {
            return Ok(p.clone());
        }
        let (_, p) = Self::matmul(
            api,
            m,
            self.n,
            self.k,
            self.dtype,
            &self.weights_md,
            dst_rs,
            add,
            self.bias.as_deref().filter(|_| self.int8.is_none()),
            omp_threads,
        )?;
        let p = std::sync::Arc::new(p);
        // Batch sizes are few; a stream of odd ones must not grow it forever.
        if prims.len() >= 64 {
            prims.clear();
        }
        prims.insert(key, p.clone());
        Ok(p)
    }

    /// `dst[r, ..n] (+)= x[r] W^T + b` for the `m` rows of `x` [m, k]; rows
    /// of `dst` are `dst_rs` apart; `add`: accumulate into `dst`.
    pub fn apply(
        &self,
        x: &[f32],
        m: usize,
        dst: &mut [f32],
        dst_rs: usize,
        add: bool,
    ) -> Result<(), OneDnnError> {
        let (n, k) = (self.n, self.k);
        assert!(
            m > 0 && x.len() >= m * k && dst_rs >= n && dst.len() >= (m - 1) * dst_rs + n,
            "onednn::Linear::apply: buffers do not match [{m}, {k}] x [{n}, {k}]"
        );
        // The rows split between the model pool's threads, each running
        // oneDNN on one OpenMP thread (its own): OpenMP's threads beside
        // the pool's oversubscribed the cores, and the pool's idle threads
        // spun against them. On the 2-core EPYC, alternating runs of
        // `examples/encode_loop`, batch 1: q8 57.5 against 62.7-83.4 ms per
        // image, bf16 96-98 against 106-108, f32 168-173 against 173-183.
        //
        // Each chunk reads all the weights, so chunks keep at least
        // `MIN_SPLIT_ROWS` rows: with many threads and few rows (16 threads,
        // one image) 16 chunks of 13 rows would stream the weights 16 times;
        // there fewer chunks share the threads as OpenMP threads. (Measured
        // on 2 cores only, where every split is into chunks of 99 rows or
        // more.)
        let threads = rayon::current_num_threads().max(1);
        let chunks = threads.min(m / MIN_SPLIT_ROWS).max(1);
        if chunks > 1 {
            let rows = m.div_ceil(chunks);
            let omp = threads / chunks;
            return x[..m * k]
                .par_chunks(rows * k)
                .zip(dst.par_chunks_mut(rows * dst_rs))
                .try_for_each(|(x, d)| self.apply_rows(x, x.len() / k, d, dst_rs, add, omp));
        }
        self.apply_rows(x, m, dst, dst_rs, add, threads)
    }

    /// [`apply`](Self::apply) on `omp_threads` of oneDNN's OpenMP threads.
    fn apply_rows(
        &self,
        x: &[f32],
        m: usize,
        dst: &mut [f32],
        dst_rs: usize,
        add: bool,
        omp_threads: usize,
    ) -> Result<(), OneDnnError> {
        let (n, k) = (self.n, self.k);
        if self.int8.is_some() {
            // Rescaled here, straight into strided rows.
            return self.apply_int8(x, m, dst, dst_rs, add, omp_threads);
        }
        if dst_rs != n {
            // oneDNN 2.6 has only its reference kernel for a strided
            // destination: compute rows of `n` and copy them in.
            let mut tmp = vec![0f32; m * n];
            self.apply_rows(x, m, &mut tmp, n, false, omp_threads)?;
            dst.par_chunks_mut(dst_rs)
                .zip(tmp.par_chunks(n))
                .with_min_len(16)
                .for_each(|(d, t)| {
                    let d = &mut d[..n];
                    if add {
                        d.iter_mut().zip(t).for_each(|(d, t)| *d += t);
                    } else {
                        d.copy_from_slice(t);
                    }
                });
            return Ok(());
        }
        let api = api()?;
        let prim = self.primitive(api, m, dst_rs, add, omp_threads)?;
        let converted;
        let src_ptr = match self.dtype {
            DataType::Bf16 => {
                converted = to_bf16(&x[..m * k]);
                converted.as_ptr() as Handle
            }
            _ => x.as_ptr() as Handle,
        };
        self.execute(
            &prim,
            src_ptr,
            m,
            dst.as_mut_ptr() as Handle,
            dst_rs,
            omp_threads,
        )
    }

    /// The bf16 product of rows rounded beforehand (one [`Bf16Rows`]
    /// serves q, k and v; [`Bf16Rows::activated`] rounds fc1's activated
    /// rows for fc2 in the same pass as the activation): `dst[r, ..n] (+)=
    /// x[r] W^T + b`, rows `dst_rs` apart, split between the pool's threads
    /// as in [`apply`](Self::apply), so the same values to the bit. Only for
    /// [`DataType::Bf16`].
    pub fn apply_bf16_rows(
        &self,
        x: &Bf16Rows,
        dst: &mut [f32],
        dst_rs: usize,
        add: bool,
    ) -> Result<(), OneDnnError> {
        let (m, n, k) = (x.m, self.n, self.k);
        assert!(
            self.dtype == DataType::Bf16 && x.k == k && m > 0,
            "onednn::Linear::apply_bf16_rows: [{m}, {}] rows for a [{n}, {k}] {} product",
            x.k,
            self.dtype.as_str()
        );
        assert!(
            dst_rs >= n && dst.len() >= (m - 1) * dst_rs + n,
            "onednn::Linear::apply_bf16_rows: destination too small"
        );
        let threads = rayon::current_num_threads().max(1);
        let chunks = threads.min(m / MIN_SPLIT_ROWS).max(1);
        if chunks > 1 {
            let rows = m.div_ceil(chunks);
            let omp = threads / chunks;
            return x.values[..m * k]
                .par_chunks(rows * k)
                .zip(dst.par_chunks_mut(rows * dst_rs))
                .try_for_each(|(x, d)| self.bf16_chunk(x, x.len() / k, d, dst_rs, add, omp));
        }
        self.bf16_chunk(&x.values, m, dst, dst_rs, add, threads)
    }

    /// One thread's rows of [`apply_bf16_rows`](Self::apply_bf16_rows).
    fn bf16_chunk(
        &self,
        x: &[u16],
        m: usize,
        dst: &mut [f32],
        dst_rs: usize,
        add: bool,
        omp_threads: usize,
    ) -> Result<(), OneDnnError> {
        let n = self.n;
        if dst_rs != n {
            // As in `apply_rows`: rows of `n`, then copied in.
            let mut tmp = vec![0f32; m * n];
            self.bf16_chunk(x, m, &mut tmp, n, false, omp_threads)?;
            dst.par_chunks_mut(dst_rs)
                .zip(tmp.par_chunks(n))
                .with_min_len(16)
                .for_each(|(d, t)| {
                    let d = &mut d[..n];
                    if add {
                        d.iter_mut().zip(t).for_each(|(d, t)| *d += t);
                    } else {
                        d.copy_from_slice(t);
                    }
                });
            return Ok(());
        }
        let api = api()?;
        let prim = self.primitive(api, m, dst_rs, add, omp_threads)?;
        self.execute(
            &prim,
            x.as_ptr() as Handle,
            m,
            dst.as_mut_ptr() as Handle,
            dst_rs,
            omp_threads,
        )
    }

    /// The 8-bit product: `x` quantized per row, then [`apply_int8_rows`](Self::apply_int8_rows).
    fn apply_int8(
        &self,
        x: &[f32],
        m: usize,
        dst: &mut [f32],
        dst_rs: usize,
        add: bool,
        omp_threads: usize,
    ) -> Result<(), OneDnnError> {
        let xq = Int8Rows::new(&x[..m * self.k], m, self.k);
        self.int8_chunk(
            &xq.codes,
            &xq.params,
            m,
            ChunkOut::Rows {
                dst,
                rs: dst_rs,
                add,
            },
            omp_threads,
        )
    }

    /// The 8-bit product of rows quantized beforehand (one [`Int8Rows`]
    /// serves q, k and v), each row of the result handed to `out`: stored
    /// or accumulated as f32, or activated and quantized again as the next
    /// product's input, without an f32 pass over the whole result between
    /// them (fc1 -> GELU -> fc2). The rows are split between the pool's
    /// threads as in [`apply`](Self::apply). Only for [`DataType::Int8`].
    pub fn apply_int8_rows(&self, x: &Int8Rows, out: Int8Output) -> Result<(), OneDnnError> {
        let (m, k, n) = (x.m, self.k, self.n);
        assert!(
            self.int8.is_some() && x.k == k && m > 0,
            "onednn::Linear::apply_int8_rows: [{m}, {}] rows for a [{n}, {k}] {} product",
            x.k,
            self.dtype.as_str()
        );
        let threads = rayon::current_num_threads().max(1);
        let chunks = threads.min(m / MIN_SPLIT_ROWS).max(1);
        let rows = m.div_ceil(chunks);
        let omp = threads / chunks;
        let codes = x.codes.par_chunks(rows * k).zip(x.params.par_chunks(rows));
        match out {
            Int8Output::Rows { dst, rs, add } => {
                assert!(
                    rs >= n && dst.len() >= (m - 1) * rs + n,
                    "onednn::Linear::apply_int8_rows: destination too small"
                );
                codes
                    .zip(dst.par_chunks_mut(rows * rs))
                    .try_for_each(|((c, p), dst)| {
                        let out = ChunkOut::Rows { dst, rs, add };
                        self.int8_chunk(c, p, p.len(), out, omp)
                    })
            }
            Int8Output::Activated { act, next } => {
                assert!(
                    next.m == m && next.k == n,
                    "onednn::Linear::apply_int8_rows: [{}, {}] rows for a [{m}, {n}] result",
                    next.m,
                    next.k
                );
                codes
                    .zip(next.codes.par_chunks_mut(rows * n))
                    .zip(next.params.par_chunks_mut(rows))
                    .try_for_each(|(((c, p), codes), params)| {
                        let out = ChunkOut::Activated { act, codes, params };
                        self.int8_chunk(c, p, p.len(), out, omp)
                    })
            }
            Int8Output::Bf16Heads {
                dst,
                tokens,
                heads,
                scale,
            } => {
                assert!(
                    heads > 0
                        && n.is_multiple_of(heads)
                        && tokens > 0
                        && m.is_multiple_of(tokens)
                        && dst.len() >= m * n,
                    "onednn::Linear::apply_int8_rows: [{m}, {n}] rows do not fill {} values of {heads} heads of {tokens} tokens",
                    dst.len()
                );
                let dst = HeadsPtr(dst.as_mut_ptr());
                codes.enumerate().try_for_each(|(i, (c, p))| {
                    let out = ChunkOut::Bf16Heads {
                        dst,
                        first_row: i * rows,
                        tokens,
                        heads,
                        scale,
                    };
                    self.int8_chunk(c, p, p.len(), out, omp)
                })
            }
        }
    }

    /// One thread's rows of an 8-bit product: oneDNN's i32 sums into a
    /// scratch [m, n], then each row rescaled (and the bias added) into `out`.
    fn int8_chunk(
        &self,
        codes: &[u8],
        params: &[(f32, i32)],
        m: usize,
        out: ChunkOut,
        omp_threads: usize,
    ) -> Result<(), OneDnnError> {
        let n = self.n;
        let Some(w8) = &self.int8 else {
            unreachable!("int8_chunk on a {:?} product", self.dtype)
        };
        let api = api()?;
        let prim = self.primitive(api, m, n, false, omp_threads)?;
        let mut sums = SUMS.take(m * n);
        self.execute(
            &prim,
            codes.as_ptr() as Handle,
            m,
            sums.as_mut_ptr() as Handle,
            n,
            omp_threads,
        )?;
        let bias = self.bias.as_deref().unwrap_or(&[]);
        match out {
            ChunkOut::Rows { dst, rs, add } => dst
                .par_chunks_mut(rs)
                .zip(sums.par_chunks(n))
                .zip(params.par_iter())
                .with_min_len(8)
                .for_each(|((d, s), &row)| dequantize_row(s, &mut d[..n], row, w8, bias, add)),
            ChunkOut::Activated {
                act,
                codes,
                params: params_out,
            } => codes
                .par_chunks_mut(n)
                .zip(params_out.par_iter_mut())
                .zip(sums.par_chunks(n))
                .zip(params.par_iter())
                .with_min_len(8)
                .for_each_init(
                    || ROW.take(n),
                    |y, (((q, p), s), &row)| {
                        // The row stays in L1 from the rescale to its codes.
                        dequantize_row(s, y, row, w8, bias, false);
                        act(y);
                        crate::model::gemm_i8::quantize_whole_row(y, q, p);
                    },
                ),
            ChunkOut::Bf16Heads {
                dst,
                first_row,
                tokens,
                heads,
                scale,
            } => {
                let hd = n / heads;
                sums.par_chunks(n)
                    .zip(params.par_iter())
                    .enumerate()
                    .with_min_len(8)
                    .for_each_init(
                        || ROW.take(n),
                        |y, (j, (s, &row))| {
                            dequantize_row(s, y, row, w8, bias, false);
                            let r = first_row + j;
                            let (image, token) = (r / tokens, r % tokens);
                            for (h, part) in y.chunks_exact(hd).enumerate() {
                                let at = ((image * heads + h) * tokens + token) * hd;
                                // SAFETY: `apply_int8_rows` checked that the
                                // buffer holds all `m` rows' heads; row `r`'s
                                // heads are written by this task alone.
                                let out = unsafe { dst.slice(at, hd) };
                                to_bf16_scaled(part, out, scale);
                            }
                        },
                    )
            }
        }
        Ok(())
    }

    /// Runs `prim` on `m` rows at `src` (in the product's input type) into
    /// `dst` (in its output type, rows `dst_rs` apart).
    fn execute(
        &self,
        prim: &Primitive,
        src_ptr: Handle,
        m: usize,
        dst_ptr: Handle,
        dst_rs: usize,
        omp_threads: usize,
    ) -> Result<(), OneDnnError> {
        let api = api()?;
        let (n, k) = (self.n, self.k);
        let (mi, ni, ki) = (m as i64, n as i64, k as i64);
        let src_md = md_by_tag(api, &[mi, ki], self.dtype.src_code(), TAG_AB)?;
        let dst_md = md_by_strides(api, &[mi, ni], &[dst_rs as i64, 1], self.dtype.dst_code())?;
        let src = memory(api, &src_md, src_ptr)?;
        let out = memory(api, &dst_md, dst_ptr)?;
        let bias = match self.bias.as_ref().filter(|_| self.int8.is_none()) {
            Some(b) => Some(memory(
                api,
                &md_by_tag(api, &[1, ni], DT_F32, TAG_AB)?,
                b.as_ptr() as Handle,
            )?),
            None => None,
        };
        let mut args = vec![
            ExecArg {
                arg: ARG_SRC,
                memory: src.handle,
            },
            ExecArg {
                arg: ARG_WEIGHTS,
                memory: self.weights.handle,
            },
            ExecArg {
                arg: ARG_DST,
                memory: out.handle,
            },
        ];
        if let Some(b) = &bias {
            args.push(ExecArg {
                arg: ARG_BIAS,
                memory: b.handle,
            });
        }
        // SAFETY: the memories wrap the caller's input (`x`, or its bf16 or
        // u8 copy), output and the bias, all alive until this returns, and
        // match the primitive's descriptors (same dims, types and strides).
        unsafe { run_primitive(api, prim, args, omp_threads) }
    }
}

/// A oneDNN matmul over batch dimensions, each operand read with its own
/// strides (attention's products; dense operands get oneDNN's brgemm
/// kernels, strided ones in 2.6 its older `gemm:jit`): `dst[i] = src[i] x
/// weights[i]` for every batch index `i`, bf16 operands, f32 output, on one
/// OpenMP thread per call.
pub struct Batched {
    prim: Primitive,
    src_md: Box<MemoryDesc>,
    weights_md: Box<MemoryDesc>,
    dst_md: Box<MemoryDesc>,
}

/// One operand of a [`Batched`] product: its dims and strides (in
/// elements), the same number of each.
#[derive(Clone, Copy, Debug)]
pub struct Operand<'a> {
    pub dims: &'a [i64],
    pub strides: &'a [i64],
}

impl Batched {
    /// A bf16 x bf16 -> f32 product of `src` [.., M, K] by `weights`
    /// [.., K, N] into `dst` [.., M, N]. Fails when oneDNN has only its
    /// reference kernel for these layouts ([`OneDnnError::Slow`]) or no
    /// bf16 instructions here.
    pub fn bf16(src: Operand, weights: Operand, dst: Operand) -> Result<Self, OneDnnError> {
        let api = api()?;
        if !native_bf16()? {
            return Err(OneDnnError::NoBf16);
        }
        let src_md = Box::new(md_by_strides(api, src.dims, src.strides, DT_BF16)?);
        let weights_md = Box::new(md_by_strides(api, weights.dims, weights.strides, DT_BF16)?);
        let dst_md = Box::new(md_by_strides(api, dst.dims, dst.strides, DT_F32)?);
        let mut op = Box::new(OpDesc([0; 8192]));
        // SAFETY: valid descriptors and out-pointer.
        check("matmul descriptor", unsafe {
            (api.matmul_desc)(&mut *op, &*src_md, &*weights_md, std::ptr::null(), &*dst_md)
        })?;
        // Run on one OpenMP thread per caller (attention's tasks).
        let (_pd, prim) = create_primitive(api, &*op as *const OpDesc as *const c_void, false, 1)?;
        Ok(Self {
            prim,
            src_md,
            weights_md,
            dst_md,
        })
    }

    /// The implementation oneDNN chose.
    pub fn impl_name(&self) -> &str {
        &self.prim.impl_name
    }

    /// Runs the product.
    ///
    /// # Safety
    /// `src` and `weights` must be readable and `dst` writable at every
    /// offset their operand's dims and strides reach (bf16 elements for
    /// the inputs, f32 for the output), and `dst` must not overlap them.
    /// oneDNN runs it on `omp_threads` OpenMP threads (1: the caller's).
    pub unsafe fn run(
        &self,
        src: *const u16,
        weights: *const u16,
        dst: *mut f32,
        omp_threads: usize,
    ) -> Result<(), OneDnnError> {
        let api = api()?;
        let s = memory(api, &self.src_md, src as Handle)?;
        let w = memory(api, &self.weights_md, weights as Handle)?;
        let d = memory(api, &self.dst_md, dst as Handle)?;
        let args = [
            ExecArg {
                arg: ARG_SRC,
                memory: s.handle,
            },
            ExecArg {
                arg: ARG_WEIGHTS,
                memory: w.handle,
            },
            ExecArg {
                arg: ARG_DST,
                memory: d.handle,
            },
        ];
        // SAFETY: the caller vouches for the buffers; the memories match
        // the primitive's descriptors.
        unsafe { run_primitive(api, &self.prim, args.into(), omp_threads) }
    }
}

/// `w` ([n, k], or [k, n] when `transposed`) as s8 codes in the same
/// layout, symmetric, one scale per output channel (`max |w| / 127`), and
/// each channel's sum of codes (the zero point's correction).
fn quantize_weights(w: &[f32], transposed: bool, n: usize, k: usize) -> (Int8Weights, Vec<i8>) {
    let code = |v: f32, scale: f32| (v / scale).round().clamp(-127.0, 127.0) as i8;
    let scale_of = |amax: f32| if amax > 0.0 { amax / 127.0 } else { 1.0 };
    let mut codes = vec![0i8; n * k];
    if !transposed {
        // A row per output channel.
        let (scales, col_sums) = codes
            .par_chunks_mut(k)
            .zip(w.par_chunks(k))
            .map(|(q, w)| {
                let scale = scale_of(w.iter().fold(0f32, |a, v| a.max(v.abs())));
                let mut sum = 0i32;
                for (q, &v) in q.iter_mut().zip(w) {
                    *q = code(v, scale);
                    sum += *q as i32;
                }
                (scale, sum)
            })
            .unzip();
        return (Int8Weights { scales, col_sums }, codes);
    }
    // A column per output channel.
    let mut amax = vec![0f32; n];
    for row in w.chunks_exact(n) {
        for (a, v) in amax.iter_mut().zip(row) {
            *a = a.max(v.abs());
        }
    }
    let scales: Vec<f32> = amax.into_iter().map(scale_of).collect();
    codes
        .par_chunks_mut(n)
        .zip(w.par_chunks(n))
        .for_each(|(q, w)| {
            for ((q, &v), &s) in q.iter_mut().zip(w).zip(&scales) {
                *q = code(v, s);
            }
        });
    let mut col_sums = vec![0i32; n];
    for row in codes.chunks_exact(n) {
        for (s, &q) in col_sums.iter_mut().zip(row) {
            *s += q as i32;
        }
    }
    (Int8Weights { scales, col_sums }, codes)
}

multiversion! {
    /// One row of an 8-bit product back to f32:
    /// `dst (+)= scale * w_scales * (sums - zero * col_sums) + bias` (no
    /// bias when it is empty). The difference is exact in i32: a row of
    /// `k` products of at most 255 x 127 fits for `k` up to 66,000.
    pub fn dequantize_row(
        sums: &[i32],
        dst: &mut [f32],
        row: (f32, i32),
        w: &Int8Weights,
        bias: &[f32],
        add: bool
    ) {
        let (scale, zero) = row;
        let it = dst.iter_mut().zip(sums).zip(w.scales.iter().zip(&w.col_sums));
        match (bias.is_empty(), add) {
            (true, false) => it.for_each(|((d, &s), (&ws, &cs))| {
                *d = scale * ws * (s - zero * cs) as f32;
            }),
            (true, true) => it.for_each(|((d, &s), (&ws, &cs))| {
                *d += scale * ws * (s - zero * cs) as f32;
            }),
            (false, false) => it.zip(bias).for_each(|(((d, &s), (&ws, &cs)), &b)| {
                *d = scale * ws * (s - zero * cs) as f32 + b;
            }),
            (false, true) => it.zip(bias).for_each(|(((d, &s), (&ws, &cs)), &b)| {
                *d += scale * ws * (s - zero * cs) as f32 + b;
            }),
        }
    }
}

/// `x` rounded to bf16 (nearest, ties to even; NaN stays NaN).
fn to_bf16(x: &[f32]) -> Vec<u16> {
    let mut out = vec![0u16; x.len()];
    out.par_chunks_mut(16 * 1024)
        .zip(x.par_chunks(16 * 1024))
        .for_each(|(o, x)| to_bf16_scaled(x, o, 1.0));
    out
}

multiversion! {
    /// `out = bf16(x * scale)` ([`bf16`]), vectorised for the CPU (as a
    /// plain closure it stayed scalar: a twentieth of a forward with bf16
    /// attention).
    pub fn to_bf16_scaled(x: &[f32], out: &mut [u16], scale: f32) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = bf16(v * scale);
        }
    }
}

/// `v` rounded to bf16 (nearest, ties to even; NaN stays NaN), as oneDNN's
/// own reorder rounds.
#[inline(always)]
pub fn bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        ((bits >> 16) | 0x40) as u16
    } else {
        ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
    }
}

/// The 8-bit products' scratch: activation codes [m, k], each row's scale
/// and zero point, oneDNN's i32 sums [m, n].
static CODES: Pool<u8> = Pool::new();
static ROW_PARAMS: Pool<(f32, i32)> = Pool::new();
static SUMS: Pool<i32> = Pool::new();

/// One row of an activated 8-bit result before it is quantized again.
static ROW: Pool<f32> = Pool::new();

/// Rows of activations quantized for [`Linear`]'s 8-bit products: u8 codes
/// over each row's own range, with the row's scale and zero point
/// ([`crate::model::gemm_i8::quantize_whole_row`]).
pub struct Int8Rows {
    codes: Scratch<'static, u8>,
    params: Scratch<'static, (f32, i32)>,
    m: usize,
    k: usize,
}

impl Int8Rows {
    /// The `m` rows of `x` [m, k], quantized.
    pub fn new(x: &[f32], m: usize, k: usize) -> Self {
        assert!(
            x.len() >= m * k,
            "Int8Rows::new: [{m}, {k}] from {} values",
            x.len()
        );
        let mut rows = Self::unset(m, k);
        rows.codes
            .par_chunks_mut(k)
            .zip(rows.params.par_iter_mut())
            .zip(x.par_chunks(k))
            .with_min_len(8)
            .for_each(|((q, p), x)| crate::model::gemm_i8::quantize_whole_row(x, q, p));
        rows
    }

    /// Room for `m` rows of `k` (stale contents: a product's
    /// [`Int8Output::Activated`] writes them all).
    pub fn unset(m: usize, k: usize) -> Self {
        Self {
            codes: CODES.take(m * k),
            params: ROW_PARAMS.take(m),
            m,
            k,
        }
    }
}

/// Rows of activations rounded to bf16 (nearest even, as
/// [`to_bf16_scaled`]) for [`Linear`]'s bf16 products.
pub struct Bf16Rows {
    values: Scratch<'static, u16>,
    m: usize,
    k: usize,
}

/// The values of [`Bf16Rows`].
static BF16_ROWS: Pool<u16> = Pool::new();

impl Bf16Rows {
    /// The `m` rows of `x` [m, k], rounded.
    pub fn new(x: &[f32], m: usize, k: usize) -> Self {
        assert!(
            x.len() >= m * k,
            "Bf16Rows::new: [{m}, {k}] from {} values",
            x.len()
        );
        let mut values = BF16_ROWS.take(m * k);
        values
            .par_chunks_mut(16 * 1024)
            .zip(x[..m * k].par_chunks(16 * 1024))
            .for_each(|(o, x)| to_bf16_scaled(x, o, 1.0));
        Self { values, m, k }
    }

    /// `act` applied to each row of `x` [m, k] in place, and the row then
    /// rounded while it is in cache (one pass instead of two).
    pub fn activated(x: &mut [f32], m: usize, k: usize, act: &(dyn Fn(&mut [f32]) + Sync)) -> Self {
        assert!(
            x.len() >= m * k,
            "Bf16Rows::activated: [{m}, {k}] from {} values",
            x.len()
        );
        let mut values = BF16_ROWS.take(m * k);
        values
            .par_chunks_mut(k)
            .zip(x[..m * k].par_chunks_mut(k))
            .with_min_len(8)
            .for_each(|(o, x)| {
                act(x);
                to_bf16_scaled(x, o, 1.0);
            });
        Self { values, m, k }
    }
}

/// Where the rows of an 8-bit product go.
pub enum Int8Output<'a> {
    /// `dst[r, ..n] (+)= y[r]` (`add`: accumulate), rows `rs` apart.
    Rows {
        dst: &'a mut [f32],
        rs: usize,
        add: bool,
    },
    /// `act(y[r])` quantized into `next`, the next product's input: the
    /// same values as storing, activating and [`Int8Rows::new`], to the bit.
    Activated {
        act: &'a (dyn Fn(&mut [f32]) + Sync),
        next: &'a mut Int8Rows,
    },
    /// Attention's bf16 operands: each row's `heads` slices of `n / heads`
    /// values, times `scale`, rounded to bf16 ([`to_bf16_scaled`]) into
    /// `dst` laid out [image, head, token, head width], `tokens` rows an
    /// image: the values of storing the rows and rounding them from there.
    Bf16Heads {
        dst: &'a mut [u16],
        tokens: usize,
        heads: usize,
        scale: f32,
    },
}

/// One thread's rows of an 8-bit product's output.
enum ChunkOut<'a> {
    Rows {
        dst: &'a mut [f32],
        rs: usize,
        add: bool,
    },
    Activated {
        act: &'a (dyn Fn(&mut [f32]) + Sync),
        codes: &'a mut [u8],
        params: &'a mut [(f32, i32)],
    },
    /// Rows `first_row..` of an [`Int8Output::Bf16Heads`].
    Bf16Heads {
        dst: HeadsPtr,
        first_row: usize,
        tokens: usize,
        heads: usize,
        scale: f32,
    },
}

/// The start of an [`Int8Output::Bf16Heads`] buffer, shared by the threads
/// that write its disjoint rows.
#[derive(Clone, Copy)]
struct HeadsPtr(*mut u16);

// SAFETY: only `int8_chunk` writes through it, each thread the heads of its
// own rows, inside the buffer (checked in `apply_int8_rows`).
unsafe impl Send for HeadsPtr {}
unsafe impl Sync for HeadsPtr {}

impl HeadsPtr {
    /// `len` values from `at`.
    ///
    /// # Safety
    /// They lie inside the buffer, and no one else reads or writes them
    /// while the slice lives.
    unsafe fn slice<'a>(self, at: usize, len: usize) -> &'a mut [u16] {
        // SAFETY: as the caller promises.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(at), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(e: &OneDnnError) {
        eprintln!("NOTICE: oneDNN path skipped: {e}");
    }

    fn reference(w: &[f32], x: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for r in 0..m {
            for c in 0..n {
                let mut s = b[c] as f64;
                for i in 0..k {
                    s += x[r * k + i] as f64 * w[c * k + i] as f64;
                }
                y[r * n + c] = s as f32;
            }
        }
        y
    }

    /// Products run from several threads at once (the model pool splits
    /// rows between its threads): each gets its own result. With oneDNN's
    /// shared "library" scratchpad they overwrote each other's.
    #[test]
    fn products_from_several_threads_at_once_stay_apart() {
        if let Err(e) = available() {
            return notice(&e);
        }
        let (n, k, m) = (192, 256, 97);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 60.0)
            .collect();
        let mut dtypes = vec![DataType::F32];
        if native_bf16().unwrap_or(false) {
            dtypes.push(DataType::Bf16);
        }
        if native_int8().unwrap_or(false) {
            dtypes.push(DataType::Int8);
        }
        for dt in dtypes {
            let lin = Linear::new(&w, false, None, n, k, dt).unwrap();
            let inputs: Vec<Vec<f32>> = (0..4)
                .map(|j| {
                    (0..m * k)
                        .map(|i| ((i * 7 + j * 31) % 23) as f32 / 11.0 - 1.0)
                        .collect()
                })
                .collect();
            let alone: Vec<Vec<f32>> = inputs
                .iter()
                .map(|x| {
                    let mut y = vec![0f32; m * n];
                    lin.apply(x, m, &mut y, n, false).unwrap();
                    y
                })
                .collect();
            for _ in 0..20 {
                std::thread::scope(|scope| {
                    let handles: Vec<_> = inputs
                        .iter()
                        .map(|x| {
                            let lin = &lin;
                            scope.spawn(move || {
                                let mut y = vec![0f32; m * n];
                                lin.apply(x, m, &mut y, n, false).unwrap();
                                y
                            })
                        })
                        .collect();
                    for (h, want) in handles.into_iter().zip(&alone) {
                        assert_eq!(&h.join().unwrap(), want, "{dt:?}");
                    }
                });
            }
        }
    }

    /// An MLP's two layers in `dtype`, `[hidden, d]` and `[d, hidden]`, the
    /// second from `W^T` (both weight layouts), with biases.
    fn mlp(d: usize, hidden: usize, dtype: DataType) -> (Linear, Linear) {
        let w1: Vec<f32> = (0..hidden * d)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 70.0)
            .collect();
        let b1: Vec<f32> = (0..hidden).map(|i| i as f32 / 100.0 - 1.0).collect();
        let w2t: Vec<f32> = (0..hidden * d)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 90.0)
            .collect();
        let b2: Vec<f32> = (0..d).map(|i| 0.5 - i as f32 / 60.0).collect();
        (
            Linear::new(&w1, false, Some(&b1), hidden, d, dtype).unwrap(),
            Linear::new(&w2t, true, Some(&b2), d, hidden, dtype).unwrap(),
        )
    }

    fn quick_gelu(y: &mut [f32]) {
        y.iter_mut().for_each(|v| *v /= 1.0 + (-1.702 * *v).exp());
    }

    /// Checks `fused` against the separate passes, to the bit, on one to
    /// three threads (rows split or not) and 1 to 300 rows. `fused(fc1, fc2,
    /// h, m, y, b)` adds the MLP of `h` [m, d] onto `y` (quick GELU between
    /// the layers), and writes fc1 of `h` into columns `hidden..2 * hidden`
    /// of `b`, rows `3 * hidden` apart (as q, k and v share a buffer).
    fn matches_separate_passes(
        dtype: DataType,
        fused: impl Fn(&Linear, &Linear, &[f32], usize, &mut [f32], &mut [f32]) + Sync,
    ) {
        let (d, hidden) = (64, 256);
        let (fc1, fc2) = mlp(d, hidden, dtype);
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for m in [1usize, 7, 197, 300] {
                let h: Vec<f32> = (0..m * d)
                    .map(|i| ((i * 13 % 29) as f32 - 14.0) / 9.0)
                    .collect();
                let x0: Vec<f32> = (0..m * d).map(|i| (i % 5) as f32 - 2.0).collect();
                let rs = 3 * hidden;
                let (separate, fused) = pool.install(|| {
                    let mut f = vec![0f32; m * hidden];
                    fc1.apply(&h, m, &mut f, hidden, false).unwrap();
                    quick_gelu(&mut f);
                    let mut x = x0.clone();
                    fc2.apply(&f, m, &mut x, d, true).unwrap();
                    let mut a = vec![7f32; m * rs];
                    fc1.apply(&h, m, &mut a[hidden..], rs, false).unwrap();

                    let (mut y, mut b) = (x0.clone(), vec![7f32; m * rs]);
                    fused(&fc1, &fc2, &h, m, &mut y, &mut b);
                    ((x, a), (y, b))
                });
                assert_eq!(
                    separate.0, fused.0,
                    "{dtype:?}, {threads} threads, {m} rows"
                );
                assert!(separate.0 != x0, "the MLP changed nothing");
                assert_eq!(
                    separate.1, fused.1,
                    "{dtype:?}, {threads} threads, {m} rows, strided"
                );
                assert!(separate.1.iter().filter(|&&v| v == 7.0).count() == 2 * m * hidden);
            }
        }
    }

    /// fc1 -> activation -> fc2 on rows quantized once, each of fc1's rows
    /// activated and quantized again as it comes out of the product, gives
    /// fc2 the codes, and so the sums, of the three separate passes; q, k
    /// and v from one [`Int8Rows`] are the products of each quantizing its
    /// input itself.
    #[test]
    fn rows_quantized_once_and_activated_as_they_come_give_the_separate_passes_to_the_bit() {
        match native_int8() {
            Ok(true) => {}
            Ok(false) => {
                return eprintln!(
                    "NOTICE: no VNNI or AMX here: oneDNN's int8 product is not tested"
                )
            }
            Err(e) => return notice(&e),
        }
        matches_separate_passes(DataType::Int8, |fc1, fc2, h, m, y, b| {
            let (d, hidden) = (fc1.k(), fc1.n());
            let hq = Int8Rows::new(h, m, d);
            let mut fq = Int8Rows::unset(m, hidden);
            let next = Int8Output::Activated {
                act: &quick_gelu,
                next: &mut fq,
            };
            fc1.apply_int8_rows(&hq, next).unwrap();
            let dst = Int8Output::Rows {
                dst: y,
                rs: d,
                add: true,
            };
            fc2.apply_int8_rows(&fq, dst).unwrap();
            let dst = Int8Output::Rows {
                dst: &mut b[hidden..],
                rs: 3 * hidden,
                add: false,
            };
            fc1.apply_int8_rows(&hq, dst).unwrap();
        });
    }

    /// q, k or v straight from the 8-bit sums to attention's bf16 operands
    /// ([image, head, token, head width], scaled) are the stored rows
    /// rearranged and rounded, to the bit, rows split or not.
    #[test]
    fn int8_rows_go_to_bf16_heads_as_stored_rows_rounded() {
        match native_int8() {
            Ok(true) => {}
            Ok(false) => {
                return eprintln!(
                    "NOTICE: no VNNI or AMX here: oneDNN's int8 product is not tested"
                )
            }
            Err(e) => return notice(&e),
        }
        let (d, n, heads) = (64, 96, 3);
        let hd = n / heads;
        let w: Vec<f32> = (0..n * d)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 70.0)
            .collect();
        let b: Vec<f32> = (0..n).map(|i| i as f32 / 100.0 - 0.4).collect();
        let lin = Linear::new(&w, false, Some(&b), n, d, DataType::Int8).unwrap();
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for (images, tokens) in [(1, 5), (2, 197), (3, 50)] {
                let m = images * tokens;
                let h: Vec<f32> = (0..m * d)
                    .map(|i| ((i * 13 % 29) as f32 - 14.0) / 9.0)
                    .collect();
                let scale = 0.125;
                let (want, got) = pool.install(|| {
                    let mut rows = vec![0f32; m * n];
                    lin.apply(&h, m, &mut rows, n, false).unwrap();
                    let mut want = vec![0u16; m * n];
                    for r in 0..m {
                        let (image, token) = (r / tokens, r % tokens);
                        for hh in 0..heads {
                            let at = ((image * heads + hh) * tokens + token) * hd;
                            let src = &rows[r * n + hh * hd..r * n + (hh + 1) * hd];
                            to_bf16_scaled(src, &mut want[at..at + hd], scale);
                        }
                    }
                    let hq = Int8Rows::new(&h, m, d);
                    let mut got = vec![0xffffu16; m * n];
                    let out = Int8Output::Bf16Heads {
                        dst: &mut got,
                        tokens,
                        heads,
                        scale,
                    };
                    lin.apply_int8_rows(&hq, out).unwrap();
                    (want, got)
                });
                assert_eq!(want, got, "{threads} threads, {images} x {tokens}");
            }
        }
    }

    /// The bf16 products on rows rounded once ([`Bf16Rows`]; fc1's output
    /// activated and rounded in one pass) give the values of each product
    /// rounding its input itself.
    #[test]
    fn bf16_rows_rounded_once_give_the_separate_passes_to_the_bit() {
        match native_bf16() {
            Ok(true) => {}
            Ok(false) => {
                return eprintln!(
                    "NOTICE: no native bf16 here: oneDNN's bf16 product is not tested"
                )
            }
            Err(e) => return notice(&e),
        }
        matches_separate_passes(DataType::Bf16, |fc1, fc2, h, m, y, b| {
            let (d, hidden) = (fc1.k(), fc1.n());
            let hb = Bf16Rows::new(h, m, d);
            let mut g = vec![0f32; m * hidden];
            fc1.apply_bf16_rows(&hb, &mut g, hidden, false).unwrap();
            let gb = Bf16Rows::activated(&mut g, m, hidden, &quick_gelu);
            fc2.apply_bf16_rows(&gb, y, d, true).unwrap();
            fc1.apply_bf16_rows(&hb, &mut b[hidden..], 3 * hidden, false)
                .unwrap();
        });
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        let x = [
            1.0f32,
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            -2.5,
        ];
        let y = to_bf16(&x);
        assert_eq!(y, vec![0x3f80, 0x3f80, 0x3f82, 0xc020]);
        assert!(f32::from_bits((to_bf16(&[f32::NAN])[0] as u32) << 16).is_nan());
    }

    #[test]
    fn products_match_f64_in_both_layouts_strides_and_row_counts() {
        if let Err(e) = available() {
            return notice(&e);
        }
        let (n, k) = (80, 96);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 70.0)
            .collect();
        let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
        let b: Vec<f32> = (0..n).map(|i| i as f32 / 40.0 - 1.0).collect();
        let mut dtypes = vec![DataType::F32];
        match native_bf16() {
            Ok(true) => dtypes.push(DataType::Bf16),
            _ => eprintln!("NOTICE: no native bf16 here: oneDNN's bf16 product is not tested"),
        }
        match native_int8() {
            Ok(true) => dtypes.push(DataType::Int8),
            _ => eprintln!("NOTICE: no VNNI or AMX here: oneDNN's int8 product is not tested"),
        }
        for dt in dtypes {
            // Sums of 96 products of values up to 1.6 x 0.7: bf16 keeps 8
            // bits of each operand, int8 a 255th of each row's range and a
            // 127th of each channel's.
            let tol = match dt {
                DataType::F32 => 1e-4,
                DataType::Bf16 => 0.1,
                DataType::Int8 => 0.15,
            };
            for transposed in [false, true] {
                let wsrc = if transposed { &wt } else { &w };
                let lin = Linear::new(wsrc, transposed, Some(&b), n, k, dt).unwrap();
                for m in [1usize, 7, 197, 300] {
                    let x: Vec<f32> = (0..m * k)
                        .map(|i| ((i * 13 % 29) as f32 - 14.0) / 9.0)
                        .collect();
                    let want = reference(&w, &x, &b, m, n, k);
                    // Into every other row of a wider buffer, accumulating
                    // onto 1.0.
                    let rs = n + 16;
                    let mut dst = vec![1f32; m * rs];
                    lin.apply(&x, m, &mut dst, rs, true).unwrap();
                    let mut worst = 0f32;
                    for r in 0..m {
                        for c in 0..n {
                            worst = worst.max((dst[r * rs + c] - 1.0 - want[r * n + c]).abs());
                        }
                        assert!(dst[r * rs + n..(r + 1) * rs].iter().all(|&v| v == 1.0));
                    }
                    assert!(worst < tol, "{dt:?} transposed={transposed} m={m}: {worst}");
                    let mut dst = vec![f32::NAN; m * n];
                    lin.apply(&x, m, &mut dst, n, false).unwrap();
                    let worst = dst
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(worst < tol, "{dt:?} set m={m}: {worst}");
                }
            }
        }
    }
}
