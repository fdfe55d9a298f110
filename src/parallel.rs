//! What the CPU kernels share to split one output buffer across rayon
//! tasks.

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
    let _ = rayon::current_num_threads();
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
