//! A persistent fork-join worker pool for the native kernels' shared parallel loop.
//!
//! [`Pool::run`] runs `f(0)` on the calling thread and `f(1..chunks)` on the pool's workers
//! (the caller also takes chunks that no worker took yet), and returns when every chunk ran.
//! A model is a sequence of short kernels (often 0.1-0.3 ms), so what matters is the cost of
//! starting a job on workers that finished the previous one microseconds ago: after a job a
//! worker spins on the job counter for [`SPIN`], then yields the core for up to [`YIELD`], and
//! only then parks until a dispatcher wakes it. A dispatcher unparks only parked workers, and
//! only as many as the job has chunks for the others; waking a parked worker (a futex wake,
//! and on a VM an idle vCPU) costs tens of microseconds, finding it spinning well under one.
//!
//! One job at a time per pool: a caller that finds the pool busy (a concurrent caller on
//! another thread, or a nested call from inside a chunk) runs all of its chunks itself.
//!
//! Only `std`: besides being a module of `kiln-targets`, this file is the crate root of the
//! `pool` test target (`cargo test -p kiln-targets`), which so needs no LLVM-linked binary.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long an idle worker spins (`spin_loop`) waiting for the next job.
const SPIN: Duration = Duration::from_micros(100);
/// How much longer it then waits yielding its core (`yield_now`) before it parks.
const YIELD: Duration = Duration::from_micros(100);

/// One `run` call's work, on the caller's stack; workers reach it through [`Shared::job`].
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync + 'a),
    chunks: usize,
    /// The next chunk index to take (chunk 0 is the caller's).
    next: AtomicUsize,
    /// The first panic of a chunk, raised again on the caller.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Job<'_> {
    /// Runs chunks until none is left.
    fn work(&self) {
        loop {
            let c = self.next.fetch_add(1, Relaxed);
            if c >= self.chunks {
                return;
            }
            self.chunk(c);
        }
    }

    fn chunk(&self, c: usize) {
        if let Err(p) = panic::catch_unwind(AssertUnwindSafe(|| (self.f)(c))) {
            self.panic.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(p);
        }
    }
}

/// What the caller and the workers of one pool share.
struct Shared {
    /// Bumped once per job (and at shutdown): workers wait for it to change.
    epoch: AtomicUsize,
    /// The job being run, or null. Its lifetime is erased: see [`Pool::run`].
    job: AtomicPtr<Job<'static>>,
    /// Workers between announcing they look at [`Shared::job`] and being done with it.
    active: AtomicUsize,
    /// Per worker: whether it is parked (or about to be) and needs an unpark to see a job.
    parked: Vec<AtomicBool>,
    /// Held by the caller whose job the workers run (a try-lock: see [`Pool::run`]).
    busy: AtomicBool,
    shutdown: AtomicBool,
}

impl Shared {
    /// Worker `me`'s wait for an epoch other than `seen` (spin, then yield, then park);
    /// returns the epoch it saw.
    fn wait(&self, me: usize, seen: usize) -> usize {
        let start = Instant::now();
        let (mut i, mut yielding) = (0u32, false);
        loop {
            let e = self.epoch.load(Acquire);
            if e != seen {
                return e;
            }
            i = i.wrapping_add(1);
            if i % 64 == 0 {
                let t = start.elapsed();
                if t >= SPIN + YIELD {
                    break;
                }
                yielding = t >= SPIN;
            }
            if yielding {
                thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        // Park. The flag is set before the epoch is read again, and a dispatcher bumps the
        // epoch before it reads the flag (all SeqCst): either this thread sees the new epoch
        // or the dispatcher sees the flag and unparks it (an unpark before `park` makes `park`
        // return at once).
        self.parked[me].store(true, SeqCst);
        loop {
            let e = self.epoch.load(SeqCst);
            if e != seen {
                self.parked[me].store(false, Relaxed);
                return e;
            }
            thread::park();
        }
    }
}

fn worker(shared: Arc<Shared>, me: usize) {
    // The epoch the pool was built with, not the current one: jobs (and the shutdown) may
    // come before this thread first runs.
    let mut seen = 0;
    loop {
        seen = shared.wait(me, seen);
        if shared.shutdown.load(Acquire) {
            return;
        }
        // Announce, then look (both SeqCst, against the caller's "clear, then read `active`").
        shared.active.fetch_add(1, SeqCst);
        let job = shared.job.load(SeqCst);
        if !job.is_null() {
            // SAFETY: `job` was read non-null after `active` counted this worker, so the
            // caller that published it reads `active` after clearing `job` (SeqCst order)
            // and sees this worker counted; it waits for the decrement below before it
            // returns, and the job (on its stack) and everything `f` borrows outlive that.
            unsafe { &*job }.work();
        }
        // Release: the chunks' writes happen before the caller's read of `active` == 0.
        shared.active.fetch_sub(1, SeqCst);
    }
}

/// Ends a job's publication: clears [`Shared::job`], then waits until no worker is in it.
struct Retire<'a>(&'a Shared);

impl Drop for Retire<'_> {
    fn drop(&mut self) {
        self.0.job.store(ptr::null_mut(), SeqCst);
        let mut i = 0u32;
        while self.0.active.load(SeqCst) != 0 {
            // The workers still in run their last chunk; yield if one is descheduled.
            if i < 1 << 12 {
                i += 1;
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
    }
}

/// A set of worker threads that run chunks of one job at a time besides its caller.
pub(crate) struct Pool {
    /// The worker count asked for.
    size: usize,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    /// A pool of `workers` threads named `{name}-{i}` (fewer if the OS refuses threads).
    pub(crate) fn new(workers: usize, name: &str) -> Pool {
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            job: AtomicPtr::new(ptr::null_mut()),
            active: AtomicUsize::new(0),
            parked: (0..workers).map(|_| AtomicBool::new(false)).collect(),
            busy: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
        });
        let mut handles = Vec::with_capacity(workers);
        for i in 0..workers {
            let s = shared.clone();
            match thread::Builder::new().name(format!("{name}-{i}")).spawn(move || worker(s, i)) {
                Ok(h) => handles.push(h),
                Err(_) => break,
            }
        }
        Pool { size: workers, shared, workers: handles }
    }

    /// Worker threads (besides the caller).
    #[cfg(test)]
    fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Runs `f(c)` for every `c` in `0..chunks`, each exactly once: `f(0)` on this thread,
    /// the others on the workers or on this thread, whichever takes them first. Returns when
    /// all have run (their effects visible to the caller); a panic in any is raised again
    /// here after all have run. If another call holds the pool (a concurrent caller, or a
    /// call from inside a chunk), this thread runs all the chunks, in order.
    pub(crate) fn run(&self, chunks: usize, f: &(dyn Fn(usize) + Sync)) {
        let s = &*self.shared;
        if chunks <= 1 || self.workers.is_empty() || s.busy.compare_exchange(false, true, Acquire, Relaxed).is_err() {
            (0..chunks).for_each(f);
            return;
        }
        struct Unlock<'a>(&'a AtomicBool);
        impl Drop for Unlock<'_> {
            fn drop(&mut self) {
                self.0.store(false, Release);
            }
        }
        let _unlock = Unlock(&s.busy);
        let job = Job { f, chunks, next: AtomicUsize::new(1), panic: Mutex::new(None) };
        // Lifetime erasure. Invariant: a worker dereferences `job` only between counting
        // itself in `active` and uncounting itself, and only if it read the pointer non-null
        // after counting itself. `retire` (dropped before `job`, also on an unwind) clears the
        // pointer and then waits for `active` to be 0, so no worker touches `job` or what `f`
        // borrows after they go out of scope; a worker that counts itself after the clear
        // reads null.
        s.job.store(&job as *const Job<'_> as *mut Job<'static>, SeqCst);
        let retire = Retire(s);
        s.epoch.fetch_add(1, SeqCst);
        self.wake(chunks - 1);
        job.chunk(0);
        job.work();
        drop(retire);
        let panic = job.panic.into_inner().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = panic {
            panic::resume_unwind(p);
        }
    }

    /// Makes sure `want` workers (at most) will see the epoch just published: those still
    /// spinning count, parked ones are unparked.
    fn wake(&self, want: usize) {
        for (flag, h) in self.shared.parked.iter().zip(&self.workers).take(want) {
            if flag.load(SeqCst) && flag.swap(false, SeqCst) {
                h.thread().unpark();
            }
        }
    }

    /// Workers parked now.
    #[cfg(test)]
    fn parked(&self) -> usize {
        self.shared.parked.iter().filter(|p| p.load(SeqCst)).count()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, SeqCst);
        self.shared.epoch.fetch_add(1, SeqCst);
        for h in self.workers.drain(..) {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

/// The process's pool of `workers` threads (named `kiln-cpu-{i}`), built once per count
/// and kept for the process's lifetime.
pub(crate) fn shared(workers: usize) -> &'static Pool {
    static LAST: AtomicPtr<Pool> = AtomicPtr::new(ptr::null_mut());
    static POOLS: Mutex<Vec<&'static Pool>> = Mutex::new(Vec::new());
    let last = LAST.load(Acquire);
    // SAFETY: `LAST` only ever holds null or a leaked (never freed) pool.
    if let Some(p) = unsafe { last.as_ref() } {
        if p.size == workers {
            return p;
        }
    }
    let mut pools = POOLS.lock().unwrap_or_else(PoisonError::into_inner);
    let p = match pools.iter().find(|p| p.size == workers) {
        Some(p) => *p,
        None => {
            let p: &'static Pool = Box::leak(Box::new(Pool::new(workers, "kiln-cpu")));
            pools.push(p);
            p
        }
    };
    LAST.store(p as *const Pool as *mut Pool, Release);
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::sync::Barrier;

    /// Runs `chunks` chunks on `pool`, each counting itself; checks each ran exactly once.
    fn each_once(pool: &Pool, chunks: usize) {
        let counts: Vec<AtomicU32> = (0..chunks).map(|_| AtomicU32::new(0)).collect();
        pool.run(chunks, &|c| {
            counts[c].fetch_add(1, Relaxed);
        });
        for (c, n) in counts.iter().enumerate() {
            assert_eq!(n.load(Relaxed), 1, "chunk {c} of {chunks}");
        }
    }

    #[test]
    fn every_chunk_runs_once() {
        let pool = Pool::new(3, "test-once");
        assert_eq!(pool.workers(), 3);
        for chunks in [0, 1, 2, 3, 4, 5, 9, 100] {
            for _ in 0..50 {
                each_once(&pool, chunks);
            }
        }
    }

    #[test]
    fn caller_runs_chunk_zero() {
        let pool = Pool::new(2, "test-zero");
        let me = thread::current().id();
        for _ in 0..100 {
            let ok = AtomicBool::new(false);
            pool.run(3, &|c| {
                if c == 0 {
                    ok.store(thread::current().id() == me, Relaxed);
                }
            });
            assert!(ok.load(Relaxed));
        }
    }

    #[test]
    fn results_visible_after_return() {
        let pool = Pool::new(3, "test-visible");
        let mut data = vec![0u64; 4096];
        for round in 1..200u64 {
            let chunks = 1 + round as usize % 6;
            let n = data.len();
            let base = data.as_mut_ptr() as usize;
            // Plain (non-atomic) writes to disjoint ranges, as the kernels do.
            pool.run(chunks, &|c| {
                for i in n * c / chunks..n * (c + 1) / chunks {
                    // SAFETY: chunk `c` writes only its own range of `data`, which outlives the run.
                    unsafe { *(base as *mut u64).add(i) = round * 1_000_000 + i as u64 };
                }
            });
            assert!(data.iter().enumerate().all(|(i, &v)| v == round * 1_000_000 + i as u64), "round {round}");
        }
    }

    /// Workers that first run after the pool is dropped (or after its first jobs) still
    /// see the shutdown.
    #[test]
    fn drop_before_workers_start() {
        for _ in 0..200 {
            drop(Pool::new(3, "test-drop"));
        }
        for _ in 0..200 {
            let pool = Pool::new(3, "test-drop");
            each_once(&pool, 4);
        }
    }

    #[test]
    fn no_workers_runs_inline() {
        let pool = Pool::new(0, "test-none");
        each_once(&pool, 5);
    }

    #[test]
    fn concurrent_callers() {
        let pool = Pool::new(2, "test-conc");
        let threads = 4;
        let start = Barrier::new(threads);
        thread::scope(|s| {
            for t in 0..threads {
                let (pool, start) = (&pool, &start);
                s.spawn(move || {
                    start.wait();
                    for i in 0..300 {
                        each_once(pool, 1 + (t + i) % 5);
                    }
                });
            }
        });
    }

    #[test]
    fn nested_calls_run_inline() {
        let pool = Pool::new(2, "test-nest");
        let total = AtomicU32::new(0);
        pool.run(3, &|_| {
            pool.run(4, &|_| {
                total.fetch_add(1, Relaxed);
            });
        });
        assert_eq!(total.load(Relaxed), 12);
    }

    #[test]
    fn panic_propagates_and_pool_is_reusable() {
        let pool = Pool::new(2, "test-panic");
        for bad in [0, 1, 2, 4] {
            let ran = AtomicU32::new(0);
            let r = panic::catch_unwind(AssertUnwindSafe(|| {
                pool.run(5, &|c| {
                    ran.fetch_add(1, Relaxed);
                    if c == bad {
                        panic!("chunk {c} failed");
                    }
                })
            }));
            let msg = r.expect_err("the panic propagates");
            assert_eq!(msg.downcast_ref::<String>().map(String::as_str), Some(&*format!("chunk {bad} failed")));
            assert_eq!(ran.load(Relaxed), 5, "every chunk ran before the panic was raised again");
            each_once(&pool, 3);
        }
    }

    /// Idle workers park after the spin budget and then use no CPU.
    #[test]
    fn idle_workers_park() {
        let pool = Pool::new(2, "test-idle");
        each_once(&pool, 3);
        let deadline = Instant::now() + Duration::from_secs(5);
        while pool.parked() != 2 {
            assert!(Instant::now() < deadline, "workers did not park");
            thread::sleep(Duration::from_millis(1));
        }
        #[cfg(target_os = "linux")]
        {
            let before = cpu_ns("test-idle");
            assert_eq!(before.len(), 2, "two worker threads in /proc/self/task");
            thread::sleep(Duration::from_millis(200));
            let spent: u64 = cpu_ns("test-idle").iter().zip(&before).map(|(a, b)| a - b).sum();
            assert!(spent < 2_000_000, "parked workers used {spent} ns of CPU in 200 ms");
        }
        // Parked workers wake for the next job.
        for chunks in [2, 3, 7] {
            each_once(&pool, chunks);
        }
    }

    /// CPU time (ns, from schedstat) of this process's threads whose name starts with `prefix`,
    /// in thread-id order.
    #[cfg(target_os = "linux")]
    fn cpu_ns(prefix: &str) -> Vec<u64> {
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc/self/task").unwrap() {
            let dir = e.unwrap().path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if comm.starts_with(prefix) {
                let tid: u64 = dir.file_name().unwrap().to_str().unwrap().parse().unwrap();
                let stat = std::fs::read_to_string(dir.join("schedstat")).unwrap();
                found.push((tid, stat.split_whitespace().next().unwrap().parse::<u64>().unwrap()));
            }
        }
        found.sort();
        found.into_iter().map(|(_, ns)| ns).collect()
    }

    #[test]
    fn shared_pools_per_count() {
        let a = shared(2);
        assert_eq!(a.workers(), 2);
        assert!(ptr::eq(a, shared(2)));
        let b = shared(1);
        assert_eq!(b.workers(), 1);
        assert!(ptr::eq(a, shared(2)) && ptr::eq(b, shared(1)));
        each_once(shared(1), 4);
    }

    /// Dispatch latency with spinning workers: `cargo test --release -p kiln-targets --test
    /// pool -- --ignored --nocapture latency`.
    #[test]
    #[ignore]
    fn latency() {
        let pool = Pool::new(1, "test-lat");
        let iters = 20_000;
        for gap_us in [0u64, 20, 50, 150, 300, 1000] {
            let mut starts = Vec::with_capacity(iters);
            let mut rounds = Vec::with_capacity(iters);
            for _ in 0..if gap_us >= 150 { 2000 } else { iters } {
                let gap = Instant::now();
                while gap.elapsed() < Duration::from_micros(gap_us) {}
                let t0 = Instant::now();
                let started = Mutex::new(None);
                let me = thread::current().id();
                pool.run(2, &|c| {
                    if c == 1 && thread::current().id() != me {
                        *started.lock().unwrap() = Some(t0.elapsed());
                    } else {
                        // The caller's share: long enough that the worker takes chunk 1.
                        let t = Instant::now();
                        while t.elapsed() < Duration::from_micros(10) {}
                    }
                });
                rounds.push(t0.elapsed());
                // None: the caller took chunk 1 itself.
                starts.extend(started.into_inner().unwrap());
            }
            starts.sort();
            rounds.sort();
            let pct = |v: &Vec<Duration>, p: usize| v.get(v.len() * p / 100).copied().unwrap_or_default();
            println!(
                "gap {gap_us:>5} us: worker took chunk 1 in {}/{} runs; start p50 {:?} p90 {:?}; run() p50 {:?} p90 {:?}",
                starts.len(),
                rounds.len(),
                pct(&starts, 50),
                pct(&starts, 90),
                pct(&rounds, 50),
                pct(&rounds, 90)
            );
        }
    }
}
