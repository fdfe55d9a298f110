//! The model's thread pool (rayon's global pool, whose threads spin
//! rather than yield), what the CPU kernels share to split one output
//! buffer across its tasks, and how the stages beside the model give way
//! to it.

/// A raw pointer to an output buffer that rayon tasks writing disjoint
/// parts of it may share.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);

// SAFETY: every user hands each task a region of the buffer no other task
// touches, and the buffer outlives the tasks (a `scope` or a blocking
// `for_each` that returns only when all tasks are done).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Through a method, so that closures capture the whole (Send) struct
    /// rather than its raw pointer field.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// How the stages beside the model (capture, face detection, the window)
/// give way to it in the CPU scheduler.
#[derive(Clone, Copy, Debug)]
pub(crate) enum GiveWay {
    /// Linux's `SCHED_IDLE`: run only on a core the model leaves; a model
    /// thread that wakes takes its core back at once.
    Idle,
    /// Niceness 10 (a tenth of a normal thread's weight; a thread already
    /// at 10 or beyond stays as it is); the waking model thread still waits
    /// for the current slice to end.
    Nice,
}

/// Starts rayon's global pool, where the model's forward runs, from the
/// calling thread: new threads inherit their creator's scheduling, so this
/// must run before the caller gives way ([`give_way`]).
pub(crate) fn start_model_pool() {
    let _ = build_model_pool(None);
    let _ = rayon::current_num_threads();
}

/// Builds rayon's global pool as the model's: `threads` threads (`None`:
/// `RAYON_NUM_THREADS`, else one per core), named `cliper-model-N`, whose
/// waits spin rather than yield the core ([`sched_yield`]). Fails where the
/// global pool has started already (anything that used rayon before starts
/// the default pool, without the names or the spinning): call it first.
pub fn build_model_pool(threads: Option<usize>) -> Result<(), rayon::ThreadPoolBuildError> {
    model_pool_builder(threads).build_global()
}

fn model_pool_builder(threads: Option<usize>) -> rayon::ThreadPoolBuilder {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .thread_name(|i| format!("cliper-model-{i}"))
        .start_handler(|_| SPIN_FOR_YIELD.with(|s| s.set(true)))
}

thread_local! {
    /// Set on the model pool's threads: their `sched_yield` spins.
    static SPIN_FOR_YIELD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// How many spin-loop hints stand for one yield on a model thread: 1-3 µs
/// (a `pause` is 60-140 cycles). rayon yields 33 times before it sleeps,
/// so a model thread that runs out of work spins about 50-100 µs, long
/// enough to bridge the gaps between the forward's parallel loops.
const YIELD_SPINS: u32 = 64;

/// `sched_yield` in place of libc's, for the whole process: the program
/// defines the symbol, so std's `yield_now` (and so rayon's idle loop)
/// binds here, and so do shared libraries that call it (Mesa, OpenMP). On
/// every thread but the model pool's it is the same system call as libc's.
///
/// Why: a rayon thread that finds no work, as at the end of each of the
/// forward's few hundred parallel loops per image, yields before it
/// sleeps. With another runnable thread on its core (the window, detection,
/// a background program) a yield hands that thread the core for a whole
/// time slice, and the forward waits for it at the next loop's join. So on
/// the model's threads a yield spins instead (as OpenMP's threads do while
/// they wait), and every other thread yields as before. Measured on the
/// 2-core EPYC, `examples/encode_loop q8 1 30 2` beside a busy loop at
/// niceness 10: medians 122.7-131.0 ms per image with yields, 64.1-69.4
/// with spins (58 alone either way); the README's "The model's threads do
/// not yield" and "Speed" have the rest.
#[cfg(target_os = "linux")]
#[no_mangle]
pub extern "C" fn sched_yield() -> libc::c_int {
    if SPIN_FOR_YIELD.try_with(|s| s.get()).unwrap_or(false) {
        #[cfg(test)]
        tests::SPUN.with(|s| s.set(s.get() + 1));
        for _ in 0..YIELD_SPINS {
            std::hint::spin_loop();
        }
        return 0;
    }
    // SAFETY: a system call without arguments.
    unsafe { libc::syscall(libc::SYS_sched_yield) as libc::c_int }
}

/// Starts a thread at the model pool's priority, whatever the caller's:
/// a thread inherits its creator's niceness and cannot take it back once
/// lowered, so a pool thread creates it. For the stage that drives the
/// model's forward (its serial parts run on that thread; niced, they waited
/// behind the window and detection while the pool idled).
pub(crate) fn spawn_beside_model<F>(
    name: &str,
    f: F,
) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let builder = std::thread::Builder::new().name(name.to_string());
    // On a rayon pool thread already, which would wait for itself below:
    // started from there.
    if rayon::current_thread_index().is_some() {
        return builder.spawn(f);
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rayon::spawn(move || {
        let _ = tx.send(builder.spawn(f));
    });
    rx.recv().unwrap_or_else(|_| {
        Err(std::io::Error::other(
            "the model pool did not start the thread",
        ))
    })
}

/// Lowers the calling thread's CPU priority (threads it starts afterwards
/// inherit it), so that the model's threads win the cores when both want
/// them. `SCHED_IDLE` rather than niceness for work that must not slow
/// the model at all: the forward's parallel loops wake their threads a few
/// hundred times per image, and with a niced busy thread beside them each
/// wake waited for the other thread's slice (measured with `cliper bench`
/// beside a busy loop; figures in the README's "Benchmarks"). Linux only (scheduling is per thread there); best
/// effort elsewhere and on error: a thread that cannot give way runs as before.
pub(crate) fn give_way(how: GiveWay) {
    #[cfg(target_os = "linux")]
    // SAFETY: plain system calls on this thread's id; the one pointer
    // passed is to a live local.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::pid_t;
        match how {
            GiveWay::Idle => {
                let param = libc::sched_param { sched_priority: 0 };
                let _ = libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param);
            }
            GiveWay::Nice => {
                let tid = tid as libc::id_t;
                // -1 is also a valid niceness: clear errno to tell them apart.
                *libc::__errno_location() = 0;
                let now = libc::getpriority(libc::PRIO_PROCESS, tid);
                if now == -1 && *libc::__errno_location() != 0 {
                    return;
                }
                let _ = libc::setpriority(libc::PRIO_PROCESS, tid, now.max(10));
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = how;
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    thread_local! {
        /// This thread's yields that spun.
        pub(super) static SPUN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    /// This thread's spun yields among `n` calls of std's `yield_now`,
    /// which is what rayon's idle loop calls.
    fn spun_of(n: u64) -> u64 {
        let before = SPUN.with(|s| s.get());
        for _ in 0..n {
            std::thread::yield_now();
        }
        SPUN.with(|s| s.get()) - before
    }

    #[test]
    fn the_model_pools_threads_spin_where_others_yield() {
        let pool = model_pool_builder(Some(2)).build().unwrap();
        let (name, spun) = pool.install(|| {
            let name = std::thread::current().name().map(str::to_string);
            (name, spun_of(10))
        });
        assert!(
            name.as_deref()
                .is_some_and(|n| n.starts_with("cliper-model-")),
            "{name:?}"
        );
        // It must reach this program's sched_yield, not libc's.
        assert_eq!(spun, 10, "a model thread's yield_now did not spin");
        let plain = std::thread::spawn(|| spun_of(10)).join().unwrap();
        assert_eq!(plain, 0, "a plain thread's yields spun");
    }

    fn niceness() -> i32 {
        // SAFETY: plain system calls on this thread's id.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::getpriority(libc::PRIO_PROCESS, tid)
        }
    }

    #[test]
    fn a_thread_started_beside_the_model_has_the_pools_priority_not_its_callers() {
        start_model_pool();
        let (tx, rx) = std::sync::mpsc::channel();
        rayon::spawn(move || tx.send(niceness()).unwrap());
        let pool = rx.recv().unwrap();
        let caller = std::thread::spawn(|| {
            give_way(GiveWay::Nice);
            let mine = niceness();
            let (tx, rx) = std::sync::mpsc::channel();
            let h =
                spawn_beside_model("test-beside", move || tx.send(niceness()).unwrap()).unwrap();
            h.join().unwrap();
            (mine, rx.recv().unwrap())
        });
        let (caller, started) = caller.join().unwrap();
        assert!(caller >= 10, "the caller gave way: {caller}");
        assert_eq!(started, pool, "caller at {caller}");
    }
}
