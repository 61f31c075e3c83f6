//! NCCL collectives on raw CUDA device pointers (a libtorch tensor's `data_ptr()`), through
//! cudarc with the libraries opened at run time. The crate therefore builds, and this module's
//! checks run, on machines with no GPU and no CUDA driver: there every entry point returns an
//! error that says what is missing and what to configure instead. Nothing here panics.
//!
//! # Libraries
//! cudarc (`dynamic-loading`) `dlopen`s each library under the names that
//! `cudarc::get_lib_name_candidates(stem)` builds (cudarc 0.19.10, `src/lib.rs`; the list is
//! tried in order in `src/{driver,nccl}/sys/mod.rs`, `culib()` and `is_culib_present()`). For
//! the `cuda-13000` build (major 13, minor 0) and stem `S` these are `libS.so`, `libS64.so`,
//! `libS64_13.so`, `libS64_130.so`, `libS64_130_0.so`, `libS64_10.so`, `libS64_11.so`,
//! `libS64_12.so`, `libS64_9.so`, `libS.so.13`, `libS.so.12`, `libS.so.11`, `libS.so.10`,
//! `libS.so.9`, `libS.so.1`.
//! - CUDA driver: stems `cuda` then `nvcuda`; the driver's `libcuda.so.1` is found by the last
//!   name (or by `libcuda.so` where the driver's development link is installed).
//! - NCCL: stem `nccl`, so `libnccl.so` ... `libnccl.so.1`, never `libnccl.so.2`, the only name
//!   the `nvidia-nccl-cu13` wheel ships (`site-packages/nvidia/nccl/lib`). A
//!   `libnccl.so -> libnccl.so.2` symlink in a directory on `LD_LIBRARY_PATH` or on the
//!   binary's rpath is needed. glibc recognises the file libtorch already mapped through its
//!   `libnccl.so.2` (same inode), so one NCCL is loaded, not two.
//!
//! cudarc *panics* when a library or a symbol cannot be loaded, so [`probe`] asks
//! `cudarc::{driver,nccl}::sys::is_culib_present()` first, and every cudarc call is also run
//! under `catch_unwind` as a last resort, the panic becoming an error.
//!
//! # Streams and ordering
//! Collectives are enqueued on CUDA's legacy default stream (the null stream), which is the
//! stream libtorch's default stream uses. Issued from the thread that ran backward, they are
//! ordered after the kernels that wrote the gradients and before the ones that read them, and
//! they return before the data has moved: read results through libtorch (a copy to the host
//! waits) or call [`NcclComm::synchronize`].
//!
//! # Non-blocking, and bounded
//! The communicator is made non-blocking (`ncclCommInitRankConfig` with `blocking = 0`): NCCL
//! answers a call it has not finished with `ncclInProgress` and carries on in its own
//! threads, and this module polls `ncclCommGetAsyncError` until it is done, for at most
//! `dist.timeout_s` (src/parallel/nccl/wait.rs). So a rank whose peer never joins the init, or
//! never makes the same call, gives up by itself with an error naming the phase, and aborts
//! the communicator (`ncclCommAbort`). While a collective is in flight, the watchdog's thread
//! polls the same error (src/parallel/watchdog.rs, [`Health`]).
//!
//! Built against NCCL 2.28 (cudarc feature `nccl-02028`, whose `ncclConfig_t` layout is the
//! one nccl.h 2.28 has); any NCCL 2.14 or later (non-blocking communicators) that has the
//! symbols used here works.

use std::any::Any;
use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt;
use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use cudarc::driver::result::DriverError;
use cudarc::driver::{self, CudaContext};
use cudarc::nccl::sys as nccl;

use super::phase::{self, Phase};
use super::watchdog::{Health, Registration, HEALTH};
use wait::{wait_until_done, Poll, Step, SystemClock, Waiting};

mod wait;

/// What to configure instead of NCCL, appended to every "cannot be used" message.
const FALLBACK_HINT: &str = "Use `dist.backend: mpi` (gradients averaged on the CPU through MPI) \
                             or `device: cpu` in the config.";

/// The oldest driver the CUDA 13 builds of NCCL and libtorch run on (`cuDriverGetVersion`).
const MIN_DRIVER_CUDA: i32 = 13000;

/// Non-blocking communicators (`ncclConfig_t`'s `blocking`) appeared in NCCL 2.14, after
/// `ncclAvg` (2.10).
const MIN_NCCL: (u32, u32) = (2, 14);

/// The legacy default stream: libtorch's default stream, and what stream 0 means to NCCL.
const DEFAULT_STREAM: nccl::cudaStream_t = std::ptr::null_mut();

/// Why NCCL cannot be used on this machine. [`check_available`] and [`NcclComm::new`] return it
/// inside their `anyhow::Error`; `downcast_ref::<Unavailable>()` tells it from a failure of NCCL
/// itself (useful for `dist.backend: auto`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    #[error(
        "NCCL cannot be used: no CUDA driver was found (libcuda.so.1 could not be loaded), so this \
         machine has no usable NVIDIA GPU. {hint}",
        hint = FALLBACK_HINT
    )]
    NoDriver,
    #[error(
        "NCCL cannot be used: the NCCL library could not be loaded. cudarc opens `libnccl.so` \
         (never `libnccl.so.2`, the only name the nvidia-nccl-cu13 wheel ships in \
         site-packages/nvidia/nccl/lib): create a `libnccl.so -> libnccl.so.2` symlink there and \
         put that directory on LD_LIBRARY_PATH or the binary's rpath. {hint}",
        hint = FALLBACK_HINT
    )]
    NoNccl,
    #[error("NCCL cannot be used: the CUDA driver failed to initialize ({0}). {hint}", hint = FALLBACK_HINT)]
    DriverInit(String),
    #[error(
        "NCCL cannot be used: the CUDA driver found no GPU (CUDA_VISIBLE_DEVICES={visible}). \
         {hint}",
        hint = FALLBACK_HINT
    )]
    NoGpu { visible: String },
    #[error(
        "NCCL cannot be used: the CUDA driver supports CUDA {major}.{minor}, but the CUDA 13 \
         builds of NCCL and libtorch need 13.0 or later (NVIDIA driver 580 or later). \
         {hint}",
        hint = FALLBACK_HINT
    )]
    OldDriver { major: i32, minor: i32 },
    #[error("NCCL cannot be used: NCCL {0} is older than 2.14, which introduced non-blocking communicators. {hint}", hint = FALLBACK_HINT)]
    OldNccl(String),
    #[error("NCCL cannot be used: {0}. {hint}", hint = FALLBACK_HINT)]
    Failed(String),
}

/// What [`probe`] found: enough for a start-up line such as "NCCL ✓ 2.28.9, 8 GPUs".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcclInfo {
    /// `major.minor.patch` of the loaded NCCL.
    pub nccl_version: (u32, u32, u32),
    /// CUDA version the driver supports, e.g. (13, 0).
    pub driver_cuda_version: (i32, i32),
    /// GPUs the driver shows this process (after CUDA_VISIBLE_DEVICES).
    pub gpus: usize,
}

impl fmt::Display for NcclInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (a, b, c) = self.nccl_version;
        let (d, e) = self.driver_cuda_version;
        write!(f, "NCCL {a}.{b}.{c}, CUDA driver {d}.{e}, {} GPU(s)", self.gpus)
    }
}

/// Why NCCL cannot be used here, or Ok: libcuda (driver), libnccl loadable and at least one GPU
/// visible. Never panics.
pub fn check_available() -> anyhow::Result<()> {
    probe()?;
    Ok(())
}

/// Checks, in order, that the CUDA driver library loads, that the NCCL library loads, that the
/// driver initializes, supports CUDA 13 and shows at least one GPU, and that NCCL is 2.14 or
/// later. Never panics.
pub fn probe() -> Result<NcclInfo, Unavailable> {
    // SAFETY: is_culib_present only dlopens and closes the candidate names.
    let driver_lib = guarded("looking for the CUDA driver library", || unsafe { driver::sys::is_culib_present() })
        .map_err(|e| Unavailable::Failed(format!("{e:#}")))?;
    if !driver_lib {
        return Err(Unavailable::NoDriver);
    }
    // SAFETY: as above.
    let nccl_lib = guarded("looking for the NCCL library", || unsafe { nccl::is_culib_present() })
        .map_err(|e| Unavailable::Failed(format!("{e:#}")))?;
    if !nccl_lib {
        return Err(Unavailable::NoNccl);
    }
    guarded("probing the CUDA driver and NCCL", probe_loaded).map_err(|e| Unavailable::Failed(format!("{e:#}")))?
}

/// The part of [`probe`] that calls into libraries known to be loadable.
fn probe_loaded() -> Result<NcclInfo, Unavailable> {
    let mut version: c_int = 0;
    // SAFETY: cuDriverGetVersion writes one int; it may be called before cuInit.
    let code = unsafe { driver::sys::cuDriverGetVersion(&mut version) };
    if let Err(e) = code.result() {
        return Err(Unavailable::DriverInit(format!("cuDriverGetVersion: {}", cuda_error(&e))));
    }
    match driver::result::init() {
        Ok(()) => {}
        Err(e) if e.0 == driver::sys::CUresult::CUDA_ERROR_NO_DEVICE => return Err(Unavailable::NoGpu { visible: visible_devices() }),
        Err(e) => return Err(Unavailable::DriverInit(format!("cuInit: {}", cuda_error(&e)))),
    }
    if version < MIN_DRIVER_CUDA {
        return Err(Unavailable::OldDriver { major: version / 1000, minor: version % 1000 / 10 });
    }
    let gpus = driver::result::device::get_count().map_err(|e| Unavailable::DriverInit(format!("cuDeviceGetCount: {}", cuda_error(&e))))?;
    if gpus <= 0 {
        return Err(Unavailable::NoGpu { visible: visible_devices() });
    }
    let nccl_version = loaded_nccl_version().map_err(|e| Unavailable::Failed(format!("{e:#}")))?;
    if (nccl_version.0, nccl_version.1) < MIN_NCCL {
        let (a, b, c) = nccl_version;
        return Err(Unavailable::OldNccl(format!("{a}.{b}.{c}")));
    }
    Ok(NcclInfo { nccl_version, driver_cuda_version: (version / 1000, version % 1000 / 10), gpus: gpus as usize })
}

/// `major.minor.patch` of the NCCL library cudarc loads. Needs only that library, not a driver.
pub fn nccl_version() -> anyhow::Result<(u32, u32, u32)> {
    // SAFETY: is_culib_present only dlopens and closes the candidate names.
    if !guarded("looking for the NCCL library", || unsafe { nccl::is_culib_present() })? {
        return Err(Unavailable::NoNccl.into());
    }
    guarded("asking NCCL for its version", loaded_nccl_version)?
}

fn loaded_nccl_version() -> anyhow::Result<(u32, u32, u32)> {
    let mut code: c_int = 0;
    // SAFETY: ncclGetVersion writes one int.
    let res = unsafe { nccl::ncclGetVersion(&mut code) };
    nccl_check(res, "ncclGetVersion", std::ptr::null_mut())?;
    Ok(decode_nccl_version(code))
}

/// NCCL_VERSION_CODE: `major*10000 + minor*100 + patch` since 2.9, `major*1000 + minor*100 +
/// patch` before.
fn decode_nccl_version(code: c_int) -> (u32, u32, u32) {
    let code = code.max(0) as u32;
    if code >= 10000 {
        (code / 10000, code % 10000 / 100, code % 100)
    } else {
        (code / 1000, code % 1000 / 100, code % 100)
    }
}

/// 128-byte NCCL unique id, created on rank 0 (the caller broadcasts it with MPI). Checks
/// [`probe`] first, so it fails, without panicking, where [`NcclComm::new`] would.
pub fn unique_id() -> anyhow::Result<[u8; 128]> {
    probe().context("the NCCL unique id could not be created")?;
    let id = guarded("creating the NCCL unique id", || {
        let mut id = MaybeUninit::<nccl::ncclUniqueId>::uninit();
        // SAFETY: ncclGetUniqueId fills the 128-byte struct it is given.
        let res = unsafe { nccl::ncclGetUniqueId(id.as_mut_ptr()) };
        // SAFETY: on success the struct is initialized.
        nccl_check(res, "ncclGetUniqueId", std::ptr::null_mut()).map(|()| unsafe { id.assume_init() })
    })?
    .context("the NCCL unique id could not be created (NCCL_DEBUG=INFO shows why; a missing network interface is common: NCCL_SOCKET_IFNAME picks one)")?;
    Ok(id.internal.map(|c| c as u8))
}

/// One rank's member of an NCCL communicator, bound to one GPU. Collectives are blocking on the
/// host only until enqueued; they run on the legacy default stream of the GPU's primary context,
/// the context libtorch uses.
///
/// The communicator is non-blocking (`blocking = 0`): every call that NCCL answers with
/// `ncclInProgress` is polled here until done, within the deadline given to
/// [`NcclComm::new_within`] (`dist.timeout_s`), so callers see calls that return when
/// enqueued, as before. A call that fails or runs out of time aborts the communicator
/// (`ncclCommAbort`); the calls after it fail saying why.
///
/// Not `Sync`: NCCL communicators must not be used from two threads at once. `Send`: each call
/// makes the GPU's context current on the calling thread first. The watchdog's thread polls
/// it for asynchronous errors (src/parallel/watchdog.rs) under the same lock as every call here.
pub struct NcclComm {
    rank: usize,
    world: usize,
    device: usize,
    /// How long one call may stay in progress.
    timeout: Duration,
    shared: Arc<Shared>,
    /// The primary context of `device` (retained; released after the communicator is destroyed,
    /// since `Drop::drop` runs before the fields drop).
    ctx: Arc<CudaContext>,
    /// This communicator in the watchdog's list; taken out first thing on drop.
    registration: Option<Registration<'static>>,
    /// Not Sync (a group is per thread in NCCL); Send.
    _one_thread_at_a_time: PhantomData<Cell<()>>,
}

/// The raw communicator and what is known of it, shared by the owner's thread and the
/// watchdog's. Every NCCL call on the communicator is made under `state`'s lock, and the
/// pointer is nulled under that lock when the communicator is freed (aborted or destroyed),
/// so neither thread can use it after the other freed it.
struct Shared {
    /// "NCCL rank R of W on GPU D".
    who: String,
    ctx: Arc<CudaContext>,
    state: Mutex<State>,
}

struct State {
    /// Null once aborted or destroyed.
    comm: nccl::ncclComm_t,
    /// Why it was aborted, for the calls after.
    aborted: Option<String>,
    /// A collective was enqueued that may not have run yet: the watchdog polls for its errors.
    in_flight: bool,
    /// Between ncclGroupStart and ncclGroupEnd on the owner's thread, NCCL's (thread-local)
    /// group refers to the communicator: it must not be freed then.
    group_open: bool,
}

// SAFETY: an NCCL communicator may be used from any thread, one at a time; State is only
// reached through its Mutex.
unsafe impl Send for State {}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// The live communicator, or why there is none.
    fn live(&self, who: &str, what: &str) -> anyhow::Result<nccl::ncclComm_t> {
        if !self.comm.is_null() {
            return Ok(self.comm);
        }
        match &self.aborted {
            Some(why) => bail!("{who}: {what} on a communicator aborted after an earlier failure: {why}"),
            None => bail!("{who}: {what} on an aborted communicator"),
        }
    }

    /// Aborts the communicator (the caller made the GPU's context current), unless a group
    /// on the owner's thread still holds it: that group's end fails, and aborts it then.
    fn abort_now(&mut self) {
        if self.group_open || self.comm.is_null() {
            return;
        }
        let comm = std::mem::replace(&mut self.comm, std::ptr::null_mut());
        self.in_flight = false;
        if let Err(e) = abort_comm(comm) {
            eprintln!("warning: {e:#}");
        }
    }
}

/// The watchdog's view: an error NCCL recorded while a collective was in flight.
impl Health for Shared {
    fn failure(&self) -> Option<String> {
        // Never wait: the owner holds the lock only while it calls NCCL, or polls a call of
        // its own (bounded, and reporting the same errors).
        let st = match self.state.try_lock() {
            Ok(st) => st,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        if st.comm.is_null() || !st.in_flight || st.group_open {
            return None;
        }
        match poll_async(st.comm) {
            Poll::Failed(why) => Some(format!("{}: a collective in flight failed: {why}", self.who)),
            Poll::Done | Poll::InProgress => None,
        }
    }

    fn abort(&self) {
        let _ = guarded("binding the CUDA context", || self.ctx.bind_to_thread());
        let mut st = self.lock();
        st.abort_now();
        if st.comm.is_null() {
            st.aborted.get_or_insert_with(|| "NCCL reported an asynchronous error (see the watchdog's message)".into());
        }
    }
}

impl fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.device)
            // Never wait for the lock: this may be formatted while a call holds it.
            .field("aborted", &self.shared.state.try_lock().map(|st| st.comm.is_null()).ok())
            .finish()
    }
}

/// How long [`NcclComm::new`] waits for every rank to join: `dist.timeout_s`'s default.
pub const DEFAULT_JOIN_TIMEOUT: Duration = Duration::from_secs(600);

/// `NCCL_VERSION(2, 28, 0)`: the nccl.h whose `ncclConfig_t` layout cudarc's `nccl-02028`
/// binding has (`ncclConfig_v22800`).
const CONFIG_VERSION: u32 = 22800;

/// nccl.h's `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: the struct's size, the magic
/// 0xcafebeef and the version of the header its layout comes from, then every field
/// "undefined" (`NCCL_CONFIG_UNDEF_INT` is INT_MIN, `NCCL_CONFIG_UNDEF_PTR` NULL) so that
/// NCCL picks its default. NCCL copies `size` bytes and reads the fields that `version`
/// has (init.cc, `parseCommConfig`), so a newer NCCL takes it too.
fn non_blocking_config() -> nccl::ncclConfig_t {
    const UNDEF_INT: c_int = c_int::MIN;
    const UNDEF_PTR: *const c_char = std::ptr::null();
    nccl::ncclConfig_t {
        size: std::mem::size_of::<nccl::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: CONFIG_VERSION,
        blocking: 0,
        cgaClusterSize: UNDEF_INT,
        minCTAs: UNDEF_INT,
        maxCTAs: UNDEF_INT,
        netName: UNDEF_PTR,
        splitShare: UNDEF_INT,
        trafficClass: UNDEF_INT,
        commName: UNDEF_PTR,
        collnetEnable: UNDEF_INT,
        CTAPolicy: UNDEF_INT,
        shrinkShare: UNDEF_INT,
        nvlsCTAs: UNDEF_INT,
        nChannelsPerNetPeer: UNDEF_INT,
        nvlinkCentricSched: UNDEF_INT,
    }
}

/// A rank a test chose never to join (`ALGPT2_FAULT=nccl_never_join`): it makes no CUDA or
/// NCCL call at all, so it needs no GPU of its own (launch/gpu-checks.sh runs it on the CPU
/// beside a rank on a machine's only GPU). It waits twice the others' deadline, so that
/// theirs is what ends the job, then fails naming the phase as they do.
fn never_join(who: &str, timeout: Duration) -> anyhow::Error {
    let waiting = Waiting { phase: Phase::NcclInit, who, step: Step::Join, allowed: timeout.saturating_mul(2) };
    let poll = || {
        phase::progress_made();
        Poll::InProgress
    };
    let waited = wait_until_done(&waiting, &mut SystemClock, poll, || {});
    let e = waited.err().map_or_else(|| anyhow!("the init was skipped"), anyhow::Error::new);
    e.context("ALGPT2_FAULT=nccl_never_join: this rank made no CUDA or NCCL call")
}

/// "rank R of W (GPU D)", as the wait's messages name a rank.
fn rank_text(rank: usize, world: usize, device: usize) -> String {
    format!("rank {rank} of {world} (GPU {device})")
}

impl NcclComm {
    /// [`Self::new_within`] with [`DEFAULT_JOIN_TIMEOUT`].
    pub fn new(id: [u8; 128], rank: usize, world: usize, device: usize) -> anyhow::Result<NcclComm> {
        Self::new_within(id, rank, world, device, DEFAULT_JOIN_TIMEOUT)
    }

    /// Joins the communicator: every rank calls this with the same id; binds to GPU `device`.
    ///
    /// Makes `device`'s primary context current on the calling thread (as `cudaSetDevice`
    /// would) and waits until all `world` ranks have called it with the same id, for at most
    /// `timeout`: then it aborts its init and fails naming the phase ("start-up: NCCL init:
    /// rank R of W (GPU D) did not join the NCCL communicator within N s"). `timeout` also
    /// bounds each later call that NCCL leaves in progress. `device` is an ordinal among the
    /// GPUs CUDA_VISIBLE_DEVICES leaves visible.
    pub fn new_within(id: [u8; 128], rank: usize, world: usize, device: usize, timeout: Duration) -> anyhow::Result<NcclComm> {
        Self::join(id, rank, world, device, timeout, crate::faults::never_joins_nccl(rank))
            .with_context(|| format!("NCCL rank {rank} of {world} on GPU {device} could not join the communicator"))
    }

    /// `never_joins`: the rank makes no call at all (a test's fault, see [`never_join`]).
    fn join(id: [u8; 128], rank: usize, world: usize, device: usize, timeout: Duration, never_joins: bool) -> anyhow::Result<NcclComm> {
        if world == 0 || rank >= world {
            bail!("rank {rank} is not in a world of {world}");
        }
        let nranks = c_int::try_from(world).map_err(|_| anyhow!("a world of {world} ranks is more than NCCL takes"))?;
        if id.iter().all(|&b| b == 0) {
            bail!("the NCCL unique id is all zeros: it must be created by unique_id() on rank 0 and broadcast to every rank");
        }
        if never_joins {
            return Err(never_join(&rank_text(rank, world, device), timeout));
        }
        let info = probe()?;
        if device >= info.gpus {
            bail!("GPU {device} does not exist: the driver shows {} GPU(s) (CUDA_VISIBLE_DEVICES={})", info.gpus, visible_devices());
        }
        let ctx = guarded("creating the CUDA context", || CudaContext::new(device))?
            .map_err(|e| anyhow!("the primary CUDA context of GPU {device} failed: {}", cuda_error(&e)))?;
        let uid = nccl::ncclUniqueId { internal: id.map(|b| b as c_char) };
        let mut comm: nccl::ncclComm_t = std::ptr::null_mut();
        let mut config = non_blocking_config();
        // SAFETY: `comm` and `config` are valid for the call (NCCL copies the config);
        // NCCL uses the device current on this thread, which CudaContext::new just made
        // `device`.
        let res = guarded("calling ncclCommInitRankConfig", || unsafe {
            nccl::ncclCommInitRankConfig(&mut comm, nranks, uid, rank as c_int, &mut config)
        })?;
        let first = first_poll(res, "ncclCommInitRankConfig", comm);
        let who = rank_text(rank, world, device);
        let waiting = Waiting { phase: Phase::NcclInit, who: &who, step: Step::Join, allowed: timeout };
        let mut first = Some(first);
        let poll = || {
            // Within its deadline this wait is progress: the watchdog, which would end the
            // rank before it could say why, stays quiet unless the abort hangs.
            phase::progress_made();
            match first.take() {
                Some(p) => p,
                None if comm.is_null() => Poll::Failed("ncclCommInitRankConfig returned no communicator".into()),
                None => poll_async(comm),
            }
        };
        let abort = || {
            if !comm.is_null() {
                if let Err(e) = abort_comm(comm) {
                    eprintln!("warning: {e:#}");
                }
            }
        };
        wait_until_done(&waiting, &mut SystemClock, poll, abort)?;
        if comm.is_null() {
            bail!("ncclCommInitRankConfig succeeded but returned no communicator");
        }
        let state = State { comm, aborted: None, in_flight: false, group_open: false };
        let shared = Arc::new(Shared {
            who: format!("NCCL rank {rank} of {world} on GPU {device}"),
            ctx: Arc::clone(&ctx),
            state: Mutex::new(state),
        });
        let health: Weak<dyn Health> = Arc::downgrade(&shared) as Weak<dyn Health>;
        let out = NcclComm {
            rank,
            world,
            device,
            timeout,
            shared,
            ctx,
            registration: Some(HEALTH.register(health)),
            _one_thread_at_a_time: PhantomData,
        };
        out.verify()?; // on error `out` drops here and destroys the communicator
        Ok(out)
    }

    /// Asks NCCL what it made of us: a mismatch means a wrong id, device or rank upstream.
    fn verify(&self) -> anyhow::Result<()> {
        let (mut n, mut r, mut d): (c_int, c_int, c_int) = (0, 0, 0);
        let st = self.shared.lock();
        let comm = st.live(&self.who(), "querying the communicator")?;
        guarded("querying the communicator", || -> anyhow::Result<()> {
            // SAFETY: valid communicator and out pointers.
            unsafe {
                nccl_check(nccl::ncclCommCount(comm, &mut n), "ncclCommCount", comm)?;
                nccl_check(nccl::ncclCommUserRank(comm, &mut r), "ncclCommUserRank", comm)?;
                nccl_check(nccl::ncclCommCuDevice(comm, &mut d), "ncclCommCuDevice", comm)?;
            }
            Ok(())
        })??;
        if (n as usize, r as usize, d as usize) != (self.world, self.rank, self.device) {
            bail!("NCCL made rank {r} of {n} on GPU {d} where rank {} of {} on GPU {} was asked for", self.rank, self.world, self.device);
        }
        Ok(())
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world(&self) -> usize {
        self.world
    }
    /// The CUDA device ordinal this rank's collectives run on.
    pub fn device(&self) -> usize {
        self.device
    }
    /// The primary context of [`Self::device`] (the one libtorch uses too).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// In-place average over ranks of `count` f32 values (elements, not bytes) at CUDA device
    /// address `ptr` (a libtorch tensor's data_ptr()), enqueued on CUDA's legacy default stream
    /// (stream 0, which libtorch's default stream is), so it is ordered after the backward
    /// kernels that wrote the gradients and before the optimizer kernels that read them. Uses
    /// ncclAvg. Returns once enqueued; `count == 0` does nothing.
    ///
    /// # Safety
    /// - `ptr` addresses `count` contiguous f32 in memory of this rank's GPU (`device`), e.g. a
    ///   contiguous CUDA tensor on `cuda:{device}`, that stays allocated until the operation
    ///   has run on the stream (libtorch's caching allocator keeps it while the tensor lives).
    /// - The work that writes or reads that memory is on the default stream too, or on a
    ///   blocking stream (the legacy default stream waits for those): not on a non-blocking
    ///   stream, e.g. one made current through a libtorch stream guard.
    /// - Every rank makes the same sequence of collective calls with the same `count`; NCCL
    ///   hangs or corrupts memory otherwise.
    pub unsafe fn all_reduce_mean_f32(&self, ptr: u64, count: usize) -> anyhow::Result<()> {
        // SAFETY: the caller's contract, on the stream it names.
        unsafe { self.all_reduce_mean_f32_on(ptr, count, DEFAULT_STREAM) }
    }

    /// [`Self::all_reduce_mean_f32`] enqueued on `stream` (a `CudaStream::cu_stream()`
    /// of this GPU's context, cast): the overlapped exchange's own stream.
    ///
    /// # Safety
    /// As for [`Self::all_reduce_mean_f32`], except that the work writing the values must
    /// be ordered before this call on `stream` (an event it waits for), and the work
    /// reading them after it (the reader's stream waits for an event recorded after it).
    pub unsafe fn all_reduce_mean_f32_on(&self, ptr: u64, count: usize, stream: nccl::cudaStream_t) -> anyhow::Result<()> {
        self.collective("ncclAllReduce (f32 average)", ptr, count, 4, |comm, buf| {
            // SAFETY: the caller's contract; send and receive buffers alias (in place).
            unsafe { nccl::ncclAllReduce(buf, buf, count, nccl::ncclDataType_t::ncclFloat32, nccl::ncclRedOp_t::ncclAvg, comm, stream) }
        })
    }

    /// In-place sum over ranks of `count` bf16 values at `ptr` (`dist.grad_dtype: bf16`):
    /// NCCL adds bf16 in fp32 and rounds each partial sum back to bf16.
    ///
    /// # Safety
    /// As for [`Self::all_reduce_mean_f32`], with `count` bf16 (2-byte) values at `ptr`.
    pub unsafe fn all_reduce_sum_bf16(&self, ptr: u64, count: usize) -> anyhow::Result<()> {
        // SAFETY: the caller's contract, on the stream it names.
        unsafe { self.all_reduce_sum_bf16_on(ptr, count, DEFAULT_STREAM) }
    }

    /// [`Self::all_reduce_sum_bf16`] enqueued on `stream`.
    ///
    /// # Safety
    /// As for [`Self::all_reduce_mean_f32_on`], with `count` bf16 values at `ptr`.
    pub unsafe fn all_reduce_sum_bf16_on(&self, ptr: u64, count: usize, stream: nccl::cudaStream_t) -> anyhow::Result<()> {
        self.collective("ncclAllReduce (bf16 sum)", ptr, count, 2, |comm, buf| {
            // SAFETY: the caller's contract; send and receive buffers alias (in place).
            unsafe { nccl::ncclAllReduce(buf, buf, count, nccl::ncclDataType_t::ncclBfloat16, nccl::ncclRedOp_t::ncclSum, comm, stream) }
        })
    }

    /// Runs `calls` (collectives of this communicator) as one NCCL group: one launch for
    /// a bucket's few runs instead of one each. The group is closed on every path; its end,
    /// which launches the calls, is waited for as a collective is.
    pub fn group(&self, calls: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
        self.bind()?;
        {
            let mut st = self.shared.lock();
            st.live(&self.who(), "ncclGroupStart")?;
            // SAFETY: ncclGroupStart takes no arguments; a matching ncclGroupEnd follows.
            let res = guarded("calling ncclGroupStart", || unsafe { nccl::ncclGroupStart() })?;
            nccl_check(res, "ncclGroupStart", st.comm).with_context(|| self.who())?;
            st.group_open = true;
        }
        let inside = calls();
        let mut st = self.shared.lock();
        // SAFETY: closes the group opened above.
        let res = guarded("calling ncclGroupEnd", || unsafe { nccl::ncclGroupEnd() });
        st.group_open = false;
        // Settled even when a call inside failed: a group end left in progress must finish
        // before the communicator takes another call.
        let ended = res.and_then(|res| self.wait_for_enqueue(&mut st, "ncclGroupEnd", res));
        inside?;
        ended
    }

    /// In-place broadcast of `count` f32 from `root` (initial weights).
    ///
    /// # Safety
    /// As for [`Self::all_reduce_mean_f32`]; all ranks must name the same `root`.
    pub unsafe fn broadcast_f32(&self, ptr: u64, count: usize, root: usize) -> anyhow::Result<()> {
        if root >= self.world {
            bail!("{}: broadcast from rank {root}, which is not in a world of {}", self.who(), self.world);
        }
        self.collective("ncclBroadcast (f32)", ptr, count, 4, |comm, buf| {
            // SAFETY: the caller's contract; root < world fits in c_int as world does.
            unsafe { nccl::ncclBroadcast(buf, buf, count, nccl::ncclDataType_t::ncclFloat32, root as c_int, comm, DEFAULT_STREAM) }
        })
    }

    /// In-place sum of `count` f64 (evaluation loss/token sums).
    ///
    /// # Safety
    /// As for [`Self::all_reduce_mean_f32`], with `count` f64 at `ptr`.
    pub unsafe fn all_reduce_sum_f64(&self, ptr: u64, count: usize) -> anyhow::Result<()> {
        self.collective("ncclAllReduce (f64 sum)", ptr, count, 8, |comm, buf| {
            // SAFETY: the caller's contract.
            unsafe {
                nccl::ncclAllReduce(buf, buf, count, nccl::ncclDataType_t::ncclFloat64, nccl::ncclRedOp_t::ncclSum, comm, DEFAULT_STREAM)
            }
        })
    }

    /// Waits until everything enqueued on the legacy default stream (collectives included) has
    /// run, then reports any asynchronous NCCL error (e.g. a peer that failed).
    pub fn synchronize(&self) -> anyhow::Result<()> {
        self.bind()?;
        // SAFETY: synchronizing the null stream of the current (our) context.
        let res = guarded("synchronizing the default stream", || unsafe { driver::sys::cuStreamSynchronize(std::ptr::null_mut()) })?;
        res.result().map_err(|e| anyhow!("{}: waiting for the default stream failed: {}", self.who(), cuda_error(&e)))?;
        self.check_async_error()?;
        // Everything enqueued has run: nothing for the watchdog to poll until the next one.
        self.shared.lock().in_flight = false;
        Ok(())
    }

    /// Reports an asynchronous error NCCL has recorded on this communicator, if any, and
    /// then aborts the communicator.
    pub fn check_async_error(&self) -> anyhow::Result<()> {
        self.bind()?;
        let mut st = self.shared.lock();
        let comm = st.live(&self.who(), "ncclCommGetAsyncError")?;
        match poll_async(comm) {
            Poll::Done | Poll::InProgress => Ok(()),
            Poll::Failed(why) => {
                st.abort_now();
                let message = format!("{}: an earlier collective failed: {why}. The communicator was aborted (ncclCommAbort)", self.who());
                st.aborted = Some(message.clone());
                Err(anyhow!(message))
            }
        }
    }

    /// Tears the communicator down without waiting for peers, for error paths where another
    /// rank may be gone (a normal drop calls ncclCommDestroy, which can wait for them). Ok when
    /// it was aborted already.
    pub fn abort(self) -> anyhow::Result<()> {
        let _ = self.bind();
        let comm = std::mem::replace(&mut self.shared.lock().comm, std::ptr::null_mut());
        abort_comm(comm).with_context(|| self.who())
    }

    fn who(&self) -> String {
        self.shared.who.clone()
    }

    /// Makes this GPU's primary context current on the calling thread, so that stream 0 is
    /// this GPU's legacy default stream.
    fn bind(&self) -> anyhow::Result<()> {
        guarded("binding the CUDA context", || self.ctx.bind_to_thread())?
            .map_err(|e| anyhow!("{}: making GPU {}'s context current failed: {}", self.who(), self.device, cuda_error(&e)))
    }

    /// Checks the arguments common to all collectives, binds the context, runs `call` on the
    /// communicator and the buffer, and waits while NCCL says it is in progress. Inside a
    /// [`Self::group`] the call is only queued: the group's end launches it.
    fn collective(
        &self,
        what: &str,
        ptr: u64,
        count: usize,
        elem_size: u64,
        call: impl FnOnce(nccl::ncclComm_t, *mut c_void) -> nccl::ncclResult_t,
    ) -> anyhow::Result<()> {
        self.shared.lock().live(&self.who(), what)?;
        if count == 0 {
            return Ok(());
        }
        if ptr == 0 {
            bail!("{}: {what} of {count} values was given a null device pointer", self.who());
        }
        if !ptr.is_multiple_of(elem_size) {
            bail!("{}: {what} was given device pointer {ptr:#x}, not aligned to {elem_size} bytes", self.who());
        }
        self.bind()?;
        let mut st = self.shared.lock();
        let comm = st.live(&self.who(), what)?;
        let res = guarded(what, || call(comm, ptr as usize as *mut c_void))?;
        if st.group_open {
            if res == nccl::ncclResult_t::ncclInProgress {
                return Ok(());
            }
            return nccl_check(res, what, comm).with_context(|| format!("{}: {what} of {count} values failed", self.who()));
        }
        self.wait_for_enqueue(&mut st, what, res).with_context(|| format!("{what} of {count} values"))
    }

    /// Turns the answer `res` of call `what` on this communicator into done or an error:
    /// ncclInProgress is polled until done, for at most the timeout; an error, or the
    /// timeout, aborts the communicator, and the error names the phase and the rank.
    fn wait_for_enqueue(&self, st: &mut State, what: &str, res: nccl::ncclResult_t) -> anyhow::Result<()> {
        let comm = st.live(&self.who(), what)?;
        let who = rank_text(self.rank, self.world, self.device);
        let waiting = Waiting { phase: Phase::current(), who: &who, step: Step::Call(what), allowed: self.timeout };
        let mut first = Some(first_poll(res, what, comm));
        let poll = || {
            first.take().unwrap_or_else(|| {
                phase::progress_made();
                poll_async(comm)
            })
        };
        match wait_until_done(&waiting, &mut SystemClock, poll, || st.abort_now()) {
            Ok(()) => {
                st.in_flight = true;
                Ok(())
            }
            Err(e) => {
                st.aborted = Some(e.to_string());
                Err(e.into())
            }
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // Out of the watchdog's list first: it has nothing to poll from here on.
        drop(self.registration.take());
        let comm = std::mem::replace(&mut self.shared.lock().comm, std::ptr::null_mut());
        if comm.is_null() {
            return;
        }
        let outcome = guarded("destroying the NCCL communicator", || {
            let _ = self.ctx.bind_to_thread();
            // SAFETY: `comm` is live and nothing uses it after this (its pointer is gone
            // from the shared state).
            nccl_check(unsafe { nccl::ncclCommDestroy(comm) }, "ncclCommDestroy", std::ptr::null_mut())
        });
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) | Err(e) => eprintln!("warning: {}: {e:#}", self.who()),
        }
    }
}

/// ncclCommAbort on `comm` (null: nothing to do), whose pointer nothing uses after. Destroy
/// and abort run synchronously even on a non-blocking communicator (NCCL makes their group
/// blocking), so an `ncclInProgress` answer is taken as done too.
fn abort_comm(comm: nccl::ncclComm_t) -> anyhow::Result<()> {
    if comm.is_null() {
        return Ok(());
    }
    // SAFETY: `comm` is a live communicator that nothing uses after this.
    let res = guarded("calling ncclCommAbort", || unsafe { nccl::ncclCommAbort(comm) })?;
    if res == nccl::ncclResult_t::ncclInProgress {
        return Ok(());
    }
    nccl_check(res, "ncclCommAbort", std::ptr::null_mut())
}

/// What a call's own answer says before any poll: done, in progress, or NCCL's error.
fn first_poll(res: nccl::ncclResult_t, call: &str, comm: nccl::ncclComm_t) -> Poll {
    match res {
        nccl::ncclResult_t::ncclSuccess => Poll::Done,
        nccl::ncclResult_t::ncclInProgress => Poll::InProgress,
        err => Poll::Failed(nccl_error_text(err, call, comm)),
    }
}

/// One look at a non-blocking communicator: `ncclCommGetAsyncError`, which says whether the
/// init, a group's end or a collective it left in progress is done, and reports any error
/// NCCL recorded since (a peer that failed). Callers hold the communicator's lock.
fn poll_async(comm: nccl::ncclComm_t) -> Poll {
    let mut raw: u32 = 0;
    // SAFETY: NCCL writes one ncclResult_t (a C enum, 4 bytes) which we read as u32, so that a
    // value this binding does not know cannot become an invalid Rust enum.
    let res = match guarded("calling ncclCommGetAsyncError", || unsafe { nccl::ncclCommGetAsyncError(comm, (&mut raw as *mut u32).cast()) })
    {
        Ok(res) => res,
        Err(e) => return Poll::Failed(format!("{e:#}")),
    };
    if res != nccl::ncclResult_t::ncclSuccess {
        return Poll::Failed(nccl_error_text(res, "ncclCommGetAsyncError", comm));
    }
    match nccl_result_from_raw(raw) {
        Some(nccl::ncclResult_t::ncclSuccess) => Poll::Done,
        Some(nccl::ncclResult_t::ncclInProgress) => Poll::InProgress,
        Some(code) => Poll::Failed(nccl_error_text(code, "ncclCommGetAsyncError", comm)),
        None => Poll::Failed(format!("ncclCommGetAsyncError reports error code {raw}")),
    }
}

/// Ok for ncclSuccess, else an error with NCCL's name and text for `res` and, given a
/// communicator, NCCL's last error message.
fn nccl_check(res: nccl::ncclResult_t, call: &str, comm: nccl::ncclComm_t) -> anyhow::Result<()> {
    if res == nccl::ncclResult_t::ncclSuccess {
        return Ok(());
    }
    Err(anyhow!(nccl_error_text(res, call, comm)))
}

fn nccl_error_text(res: nccl::ncclResult_t, call: &str, comm: nccl::ncclComm_t) -> String {
    // SAFETY: both return static or NCCL-owned NUL-terminated strings (or null, handled).
    let text = unsafe { c_text(nccl::ncclGetErrorString(res)) };
    let last = unsafe { c_text(nccl::ncclGetLastError(comm)) };
    let last = if last.is_empty() { String::new() } else { format!("; NCCL's last error: {last}") };
    format!("{call} returned {res:?} ({text}){last}. NCCL_DEBUG=INFO shows more")
}

/// The ncclResult_t values of NCCL 2.28 (nccl.h), for codes that arrive as plain integers.
fn nccl_result_from_raw(raw: u32) -> Option<nccl::ncclResult_t> {
    use nccl::ncclResult_t::*;
    Some(match raw {
        0 => ncclSuccess,
        1 => ncclUnhandledCudaError,
        2 => ncclSystemError,
        3 => ncclInternalError,
        4 => ncclInvalidArgument,
        5 => ncclInvalidUsage,
        6 => ncclRemoteError,
        7 => ncclInProgress,
        _ => return None,
    })
}

/// `CUDA_ERROR_X (text)` for a driver error.
fn cuda_error(e: &DriverError) -> String {
    match e.error_string() {
        Ok(text) => format!("{:?} ({})", e.0, text.to_string_lossy()),
        Err(_) => format!("{:?}", e.0),
    }
}

/// # Safety
/// `p` is null or points to a NUL-terminated string that outlives the call.
unsafe fn c_text(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: the caller's contract.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

fn visible_devices() -> String {
    std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "<unset>".into())
}

/// Runs `f`, turning a panic (cudarc's answer to a library or symbol it cannot load) into an
/// error that says what was being done.
fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> anyhow::Result<T> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| anyhow!("cudarc panicked while {what}: {}", panic_text(&*payload)))
}

fn panic_text(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    //! Without a GPU (this crate's CI): the error paths, and NCCL loaded without a driver in a
    //! subprocess. With GPUs: `cargo test -- --ignored gpu_` with a directory holding the
    //! `libnccl.so` symlink on LD_LIBRARY_PATH (1 GPU for `gpu_world_of_one`, 2 for
    //! `gpu_two_ranks`).

    use super::*;

    fn driver_present() -> bool {
        // SAFETY: only dlopens candidate names.
        unsafe { driver::sys::is_culib_present() }
    }

    /// This test's name as libtest knows it (module path without the crate name).
    fn test_name(leaf: &str) -> String {
        let path = module_path!();
        let path = path.split_once("::").map_or(path, |(_, rest)| rest);
        format!("{path}::{leaf}")
    }

    /// A fresh directory under the system temp dir, removed when dropped (even by a failing
    /// assertion).
    struct TempDir(std::path::PathBuf);
    impl TempDir {
        fn new(prefix: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn nccl_versions_decode() {
        assert_eq!(decode_nccl_version(22907), (2, 29, 7));
        assert_eq!(decode_nccl_version(21003), (2, 10, 3));
        assert_eq!(decode_nccl_version(2708), (2, 7, 8));
    }

    #[test]
    fn panics_become_errors() {
        let e = guarded("testing", || -> u32 { panic!("no libfoo") }).unwrap_err();
        assert_eq!(e.to_string(), "cudarc panicked while testing: no libfoo");
        let e = guarded("testing", || -> u32 { panic!("{}", String::from("owned")) }).unwrap_err();
        assert!(e.to_string().ends_with("owned"), "{e}");
        assert_eq!(guarded("testing", || 7).unwrap(), 7);
    }

    /// cudarc's names for NCCL: the reason for the symlink. Fails (and then the set-up's
    /// `libnccl.so` link and the docs above can go) once cudarc also tries `libnccl.so.2`.
    #[test]
    fn cudarc_looks_for_libnccl_so_not_so_2() {
        let names = cudarc::get_lib_name_candidates("nccl");
        eprintln!("cudarc NCCL names: {names:?}");
        eprintln!("cudarc driver names: {:?}", cudarc::get_lib_name_candidates("cuda"));
        assert_eq!(names[0], "libnccl.so");
        assert!(!names.iter().any(|n| n == "libnccl.so.2"), "{names:?}");
    }

    /// The config filled by hand is nccl.h's NCCL_CONFIG_INITIALIZER, field for field, with
    /// `blocking = 0`: checked against the header of the NCCL wheel where there is one.
    #[test]
    fn the_non_blocking_config_is_ncclh_initializer_with_blocking_0() {
        let cfg = non_blocking_config();
        assert_eq!((cfg.size, cfg.magic, cfg.version, cfg.blocking), (80, 0xcafe_beef, 22800, 0));
        assert!(cfg.netName.is_null() && cfg.commName.is_null());
        assert_eq!((cfg.cgaClusterSize, cfg.nvlinkCentricSched), (i32::MIN, i32::MIN));
        // Our fields, in order, from the Debug output: `ncclConfig_v22800 { size: 80, ... }`.
        let debug = format!("{cfg:?}");
        let ours: Vec<&str> = debug.split(['{', ',']).skip(1).filter_map(|f| f.split(':').next()).map(str::trim).collect();
        let Some(header) = wheel_nccl().map(|lib| lib.parent().unwrap().parent().unwrap().join("include/nccl.h")).filter(|h| h.is_file())
        else {
            eprintln!("skipped the comparison: no nccl.h beside the wheel's libnccl.so.2");
            return;
        };
        let text = std::fs::read_to_string(&header).unwrap();
        let init = text.split("#define NCCL_CONFIG_INITIALIZER").nth(1).expect("nccl.h defines NCCL_CONFIG_INITIALIZER");
        let init = &init[..init.find('}').unwrap()];
        // Each value is followed by `/* field */`.
        let theirs: Vec<&str> = init.split("/*").skip(1).map(|c| c.split("*/").next().unwrap().trim()).collect();
        assert_eq!(ours, theirs, "{}", header.display());
        for line in init.lines().filter(|l| l.contains("/*")) {
            let field = line.split("/*").nth(1).unwrap().split("*/").next().unwrap().trim();
            if !["size", "magic", "version"].contains(&field) {
                assert!(line.contains("NCCL_CONFIG_UNDEF_"), "{field} is not left undefined: {line}");
            }
        }
        assert!(text.contains("#define NCCL_CONFIG_UNDEF_INT INT_MIN"), "{}", header.display());
    }

    #[test]
    fn an_aborted_communicator_says_why_and_a_group_keeps_it_from_being_freed() {
        let mut st = State { comm: std::ptr::null_mut(), aborted: None, in_flight: false, group_open: false };
        let e = st.live("NCCL rank 0 of 2 on GPU 0", "ncclAllReduce (f32 average)").unwrap_err();
        assert_eq!(e.to_string(), "NCCL rank 0 of 2 on GPU 0: ncclAllReduce (f32 average) on an aborted communicator");
        st.aborted = Some("training: ncclAllReduce (f32 average) on rank 0 of 2 (GPU 0) failed: x".into());
        let e = st.live("NCCL rank 0 of 2 on GPU 0", "ncclBroadcast (f32)").unwrap_err();
        assert!(
            e.to_string()
                .ends_with("aborted after an earlier failure: training: ncclAllReduce (f32 average) on rank 0 of 2 (GPU 0) failed: x"),
            "{e}"
        );
        // Inside a group NCCL's thread-local group refers to the communicator: no abort (this
        // pointer is never passed to NCCL), the group's end does it.
        let stand_in = std::ptr::NonNull::<nccl::ncclComm>::dangling().as_ptr();
        st.comm = stand_in;
        st.group_open = true;
        st.in_flight = true;
        st.abort_now();
        assert_eq!((st.comm, st.in_flight), (stand_in, true));
    }

    #[test]
    fn arguments_are_checked_before_any_library() {
        let id = [7u8; 128];
        let e = NcclComm::new(id, 2, 2, 0).unwrap_err();
        assert!(format!("{e:#}").contains("rank 2 is not in a world of 2"), "{e:#}");
        assert!(e.to_string().contains("NCCL rank 2 of 2 on GPU 0"), "{e}");
        let e = NcclComm::new(id, 0, 0, 0).unwrap_err();
        assert!(format!("{e:#}").contains("not in a world of 0"), "{e:#}");
        let e = NcclComm::new([0u8; 128], 1, 2, 1).unwrap_err();
        assert!(format!("{e:#}").contains("all zeros"), "{e:#}");
    }

    #[test]
    fn no_driver_means_a_clear_error() {
        if driver_present() {
            eprintln!("skipped: a CUDA driver is present");
            return;
        }
        let e = check_available().unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("no CUDA driver was found"), "{msg}");
        assert!(msg.contains("no usable NVIDIA GPU"), "{msg}");
        assert!(msg.contains("dist.backend: mpi") && msg.contains("device: cpu"), "{msg}");
        assert_eq!(e.downcast_ref::<Unavailable>(), Some(&Unavailable::NoDriver));
        assert_eq!(probe(), Err(Unavailable::NoDriver));
    }

    #[test]
    fn no_driver_unique_id_and_new_fail_without_panicking() {
        if driver_present() {
            eprintln!("skipped: a CUDA driver is present");
            return;
        }
        let e = unique_id().unwrap_err();
        assert!(format!("{e:#}").contains("unique id could not be created"), "{e:#}");
        assert!(format!("{e:#}").contains("no CUDA driver"), "{e:#}");

        let e = NcclComm::new([1u8; 128], 3, 4, 1).unwrap_err();
        assert!(e.to_string().contains("NCCL rank 3 of 4 on GPU 1"), "{e}");
        assert!(format!("{e:#}").contains("no CUDA driver"), "{e:#}");
        assert_eq!(e.downcast_ref::<Unavailable>(), Some(&Unavailable::NoDriver));
    }

    /// The wheel's libnccl.so.2: $ALGPT2_NCCL_LIB, else the project's .venv (this crate's, then
    /// /work/main's).
    fn wheel_nccl() -> Option<std::path::PathBuf> {
        if let Some(p) = std::env::var_os("ALGPT2_NCCL_LIB") {
            return Some(p.into());
        }
        let roots = [std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")), "/work/main".into()];
        for root in roots {
            let Ok(entries) = std::fs::read_dir(root.join(".venv/lib")) else { continue };
            for entry in entries.flatten() {
                let lib = entry.path().join("site-packages/nvidia/nccl/lib/libnccl.so.2");
                if lib.is_file() {
                    return Some(lib);
                }
            }
        }
        None
    }

    /// `cmd`'s output, waited for at most two minutes and read while it runs: a child
    /// that hangs (in a driver stub, say) is killed and fails its test instead of holding
    /// the suite.
    fn output_within(cmd: &mut std::process::Command) -> std::process::Output {
        use std::io::Read;
        use std::process::Stdio;
        use std::time::{Duration, Instant};
        let limit = Duration::from_secs(120);
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("the child starts");
        fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes);
                bytes
            })
        }
        let (stdout, stderr) = (drain(child.stdout.take().unwrap()), drain(child.stderr.take().unwrap()));
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{cmd:?} still ran after {limit:?}: killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        std::process::Output { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }
    }

    /// NCCL loadable (through a `libnccl.so` symlink on LD_LIBRARY_PATH), driver absent: runs
    /// `child_nccl_without_driver` in a subprocess, since the loader reads LD_LIBRARY_PATH once.
    #[test]
    fn nccl_without_driver_in_subprocess() {
        if driver_present() {
            eprintln!("skipped: a CUDA driver is present");
            return;
        }
        let Some(lib) = wheel_nccl() else {
            eprintln!("skipped: no libnccl.so.2 (set ALGPT2_NCCL_LIB to the wheel's file)");
            return;
        };
        let tmp = TempDir::new("nccl-link");
        let dir = &tmp.0;
        std::os::unix::fs::symlink(&lib, dir.join("libnccl.so")).unwrap();

        let out = output_within(
            std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", &test_name("child_nccl_without_driver"), "--ignored", "--nocapture"])
                .env("LD_LIBRARY_PATH", dir)
                .env("ALGPT2_NCCL_TEST_CHILD", "1"),
        );
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        eprintln!("{text}");
        assert!(out.status.success(), "child failed:\n{text}");
        assert!(text.contains("1 passed"), "the child test did not run:\n{text}");
    }

    #[test]
    #[ignore = "run by nccl_without_driver_in_subprocess with LD_LIBRARY_PATH set"]
    fn child_nccl_without_driver() {
        if std::env::var_os("ALGPT2_NCCL_TEST_CHILD").is_none() {
            return;
        }
        // SAFETY: only dlopens candidate names.
        assert!(unsafe { nccl::is_culib_present() }, "libnccl.so did not load");
        assert!(!driver_present());
        let (major, minor, patch) = nccl_version().unwrap();
        eprintln!("loaded NCCL {major}.{minor}.{patch} without a CUDA driver");
        assert!(major == 2 && minor >= 10);

        let e = check_available().unwrap_err();
        assert_eq!(e.downcast_ref::<Unavailable>(), Some(&Unavailable::NoDriver), "{e:#}");
        assert!(unique_id().is_err());
        let e = NcclComm::new([1u8; 128], 0, 2, 0).unwrap_err();
        assert!(e.to_string().contains("NCCL rank 0 of 2 on GPU 0"), "{e}");
    }

    /// A stand-in `libcuda.so.1` whose answers come from STUB_* variables, for the paths that
    /// need a driver: built with `cc` at test time.
    const STUB_DRIVER_C: &str = r#"
#include <stdlib.h>
static int env(const char *k, int d) { const char *v = getenv(k); return v ? atoi(v) : d; }
int cuDriverGetVersion(int *v) { *v = env("STUB_CUDA_VERSION", 13000); return 0; }
int cuInit(unsigned int flags) { (void)flags; return env("STUB_CUINIT", 0); }
#ifndef NO_COUNT
int cuDeviceGetCount(int *n) { *n = env("STUB_GPUS", 0); return 0; }
#endif
int cuGetErrorString(int e, const char **s) { (void)e; *s = "stub error"; return 0; }
int cuGetErrorName(int e, const char **s) { (void)e; *s = "STUB"; return 0; }
"#;

    /// Each probe outcome with a driver present, from a stub driver (plus the wheel's NCCL), one
    /// subprocess per case: what `probe` says, and that nothing panics, not even a cudarc call
    /// into a symbol the stub lacks.
    #[test]
    fn stub_driver_cases_in_subprocesses() {
        if driver_present() {
            eprintln!("skipped: a real CUDA driver is present");
            return;
        }
        let Some(lib) = wheel_nccl() else {
            eprintln!("skipped: no libnccl.so.2 (set ALGPT2_NCCL_LIB to the wheel's file)");
            return;
        };
        let tmp = TempDir::new("nccl-stub");
        let root = &tmp.0;
        let src = root.join("stub.c");
        std::fs::write(&src, STUB_DRIVER_C).unwrap();
        for (name, extra) in [("full", None), ("no_count", Some("-DNO_COUNT"))] {
            let mut cc = std::process::Command::new("cc");
            cc.args(["-shared", "-fPIC", "-o"]).arg(root.join(format!("libcuda-{name}.so"))).arg(&src);
            cc.args(extra);
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| output_within(&mut cc).status)) {
                Ok(s) if s.success() => {}
                other => {
                    eprintln!("skipped: cc could not build the stub driver ({other:?})");
                    return;
                }
            }
        }
        // (stub, with NCCL, STUB_* settings, how `probe()`'s Debug output starts)
        type Case<'a> = (&'a str, bool, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            ("full", false, &[("STUB_GPUS", "2")], "Err(NoNccl)"),
            ("full", true, &[("STUB_CUINIT", "100")], "Err(NoGpu"),
            ("full", true, &[("STUB_CUINIT", "999")], "Err(DriverInit(\"cuInit: CUDA_ERROR_UNKNOWN (stub error)\"))"),
            ("full", true, &[("STUB_CUDA_VERSION", "12040"), ("STUB_GPUS", "1")], "Err(OldDriver { major: 12, minor: 4 })"),
            ("full", true, &[("STUB_GPUS", "0")], "Err(NoGpu"),
            ("no_count", true, &[], "Err(Failed(\"cudarc panicked while probing the CUDA driver and NCCL: Missing symbol cuDeviceGetCount"),
            ("full", true, &[("STUB_GPUS", "2")], "Ok(NcclInfo { nccl_version: (2, "),
        ];
        // When this binary's RPATH already finds libnccl.so (the project's set-up puts it
        // beside the wheel's library), NCCL cannot be hidden from a child process, so the
        // "no NCCL" case is left out.
        let nccl_on_rpath = nccl_version().is_ok();
        for (i, (stub, with_nccl, vars, expect)) in cases.iter().enumerate() {
            if !with_nccl && nccl_on_rpath {
                eprintln!("--- case {i}: left out (libnccl.so is on this binary's RPATH)");
                continue;
            }
            let dir = root.join(format!("case{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::os::unix::fs::symlink(root.join(format!("libcuda-{stub}.so")), dir.join("libcuda.so.1")).unwrap();
            if *with_nccl {
                std::os::unix::fs::symlink(&lib, dir.join("libnccl.so")).unwrap();
            }
            let out = output_within(
                std::process::Command::new(std::env::current_exe().unwrap())
                    .args(["--exact", &test_name("child_stub_driver"), "--ignored", "--nocapture"])
                    .env("LD_LIBRARY_PATH", &dir)
                    .env("ALGPT2_NCCL_TEST_CHILD", "1")
                    .env("EXPECT", expect)
                    .envs(vars.iter().copied()),
            );
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            eprintln!("--- case {i}: {stub} stub, nccl {with_nccl}, {vars:?}\n{text}");
            assert!(out.status.success() && text.contains("1 passed"), "case {i} failed:\n{text}");
        }
    }

    #[test]
    #[ignore = "run by stub_driver_cases_in_subprocesses with LD_LIBRARY_PATH set"]
    fn child_stub_driver() {
        if std::env::var_os("ALGPT2_NCCL_TEST_CHILD").is_none() {
            return;
        }
        let expect = std::env::var("EXPECT").unwrap();
        let got = format!("{:?}", probe());
        eprintln!("probe: {got}");
        assert!(got.starts_with(&expect), "expected {expect}, got {got}");
        if let Err(e) = check_available() {
            assert!(format!("{e:#}").contains("dist.backend: mpi"), "{e:#}");
        }
        // The stub has no cuDeviceGet: where probe passes, cudarc panics inside new(), caught.
        let e = NcclComm::new([1u8; 128], 1, 2, 0).unwrap_err();
        eprintln!("new: {e:#}");
        assert!(e.to_string().contains("NCCL rank 1 of 2 on GPU 0"), "{e}");
        if got.starts_with("Ok") {
            assert!(format!("{e:#}").contains("Missing symbol cuDeviceGet"), "{e:#}");
        } else {
            assert!(unique_id().is_err());
        }
    }

    /// Without NCCL on the library path (the default here), a machine with a driver would say
    /// so; without a driver the driver is reported first. Both must name the fallback.
    #[test]
    fn every_unavailable_message_names_the_fallback() {
        let all = [
            Unavailable::NoDriver,
            Unavailable::NoNccl,
            Unavailable::DriverInit("x".into()),
            Unavailable::NoGpu { visible: "".into() },
            Unavailable::OldDriver { major: 12, minor: 4 },
            Unavailable::OldNccl("2.8.4".into()),
            Unavailable::Failed("x".into()),
        ];
        for u in all {
            let msg = u.to_string();
            assert!(msg.starts_with("NCCL cannot be used: "), "{msg}");
            assert!(msg.contains("dist.backend: mpi"), "{msg}");
        }
        assert!(Unavailable::NoNccl.to_string().contains("libnccl.so -> libnccl.so.2"));
    }

    // ---- GPU tests -------------------------------------------------------------------------

    /// Device buffer of `host`'s values in the current context (legacy default stream copies).
    fn upload<T: Copy>(host: &[T]) -> u64 {
        // SAFETY: plain allocation and synchronous copy into it.
        unsafe {
            let ptr = driver::result::malloc_sync(std::mem::size_of_val(host)).unwrap();
            driver::result::memcpy_htod_sync(ptr, host).unwrap();
            ptr
        }
    }

    fn download<T: Copy + Default>(ptr: u64, n: usize) -> Vec<T> {
        let mut host = vec![T::default(); n];
        // SAFETY: `ptr` holds `n` T; a synchronous copy waits for the default stream.
        unsafe { driver::result::memcpy_dtoh_sync(&mut host, ptr).unwrap() };
        host
    }

    fn free(ptr: u64) {
        // SAFETY: allocated by `upload`, not used after.
        unsafe { driver::result::free_sync(ptr).unwrap() };
    }

    /// Panics with the whole "why not" message where NCCL cannot run.
    fn require_gpus(n: usize) {
        match probe() {
            Ok(info) if info.gpus >= n => eprintln!("{info}"),
            Ok(info) => panic!("this test needs {n} GPUs: {info}"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    #[ignore = "needs 1 CUDA GPU and libnccl.so on the library path"]
    fn gpu_world_of_one() {
        require_gpus(1);
        let comm = NcclComm::new(unique_id().unwrap(), 0, 1, 0).unwrap();
        let ptr = upload(&[1.5f32, -2.0, 3.25]);
        unsafe { comm.all_reduce_mean_f32(ptr, 3).unwrap() };
        unsafe { comm.broadcast_f32(ptr, 3, 0).unwrap() };
        comm.synchronize().unwrap();
        assert_eq!(download::<f32>(ptr, 3), vec![1.5, -2.0, 3.25]);
        let e = unsafe { comm.broadcast_f32(ptr, 3, 1) }.unwrap_err();
        assert!(e.to_string().contains("not in a world of 1"), "{e}");
        let e = unsafe { comm.all_reduce_mean_f32(ptr + 2, 1) }.unwrap_err();
        assert!(e.to_string().contains("not aligned"), "{e}");
        unsafe { comm.all_reduce_mean_f32(ptr, 0).unwrap() }; // nothing to do
        free(ptr);
        comm.abort().unwrap();
    }

    /// The non-blocking init of a world of one completes within its deadline, a collective
    /// and a group run, and the asynchronous-error poll (the watchdog's, and the owner's)
    /// reports nothing.
    #[test]
    #[ignore = "needs 1 CUDA GPU and libnccl.so on the library path"]
    fn gpu_non_blocking_world_of_one() {
        require_gpus(1);
        let started = std::time::Instant::now();
        let comm = NcclComm::new_within(unique_id().unwrap(), 0, 1, 0, Duration::from_secs(60)).unwrap();
        eprintln!("joined in {:?}", started.elapsed());
        assert_eq!(poll_async(comm.shared.lock().comm), Poll::Done);
        let ptr = upload(&[1.0f32, 2.0, 3.0, 4.0]);
        unsafe { comm.all_reduce_mean_f32(ptr, 4).unwrap() };
        assert!(comm.shared.lock().in_flight, "a collective in flight is the watchdog's to poll");
        assert_eq!(comm.shared.failure(), None);
        comm.group(|| unsafe {
            comm.all_reduce_mean_f32(ptr, 2)?;
            comm.all_reduce_mean_f32(ptr + 8, 2)
        })
        .unwrap();
        comm.synchronize().unwrap();
        assert!(!comm.shared.lock().in_flight);
        comm.check_async_error().unwrap();
        assert_eq!(download::<f32>(ptr, 4), vec![1.0, 2.0, 3.0, 4.0]);
        free(ptr);
        drop(comm);
    }

    /// A rank that never joins (ALGPT2_FAULT=nccl_never_join) makes no CUDA or NCCL call:
    /// on a machine without a GPU or NCCL (where `probe` fails) it still waits, twice the
    /// others' deadline so that theirs ends the job, then names the phase and the fault.
    /// (With the fault checked after `probe`, as before, this failed with "NCCL cannot be
    /// used" here at once, and on a GPU machine it needed a GPU of its own.)
    #[test]
    fn a_rank_that_never_joins_needs_no_gpu_and_outwaits_the_others() {
        let started = std::time::Instant::now();
        let e = NcclComm::join([7u8; 128], 1, 2, 0, Duration::from_secs(1), true).unwrap_err();
        let took = started.elapsed();
        let m = format!("{e:#}");
        assert!(
            m.starts_with(
                "ALGPT2_FAULT=nccl_never_join: this rank made no CUDA or NCCL call: start-up: NCCL init: rank 1 of 2 (GPU 0) did not join"
            ),
            "{m}"
        );
        assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(20), "{took:?}");
    }

    /// Rank 1 of 2 never joins (as with ALGPT2_FAULT=nccl_never_join@0:1): rank 0 gives up
    /// at its deadline naming the phase, aborts its init, and the GPU serves a new
    /// communicator after it.
    #[test]
    #[ignore = "needs 1 CUDA GPU and libnccl.so on the library path"]
    fn gpu_a_rank_that_never_joins_times_out_and_aborts() {
        require_gpus(1);
        let started = std::time::Instant::now();
        let e = NcclComm::new_within(unique_id().unwrap(), 0, 2, 0, Duration::from_secs(3)).unwrap_err();
        let took = started.elapsed();
        let m = format!("{e:#}");
        eprintln!("after {took:?}: {m}");
        assert!(m.contains("start-up: NCCL init: rank 0 of 2 (GPU 0) did not join the NCCL communicator within 3 s"), "{m}");
        assert!(m.contains("The communicator was aborted (ncclCommAbort)"), "{m}");
        assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(30), "{took:?}");
        let comm = NcclComm::new_within(unique_id().unwrap(), 0, 1, 0, Duration::from_secs(60)).unwrap();
        comm.synchronize().unwrap();
    }

    /// Two ranks as two threads on GPUs 0 and 1. Each thread runs every collective before
    /// anything is checked, so a wrong value cannot leave the other rank waiting forever.
    #[test]
    #[ignore = "needs 2 CUDA GPUs and libnccl.so on the library path"]
    fn gpu_two_ranks() {
        require_gpus(2);
        let id = unique_id().unwrap();
        let n = (1 << 20) + 3; // several NCCL chunks, and a ragged tail
        let threads: Vec<_> = (0..2usize)
            .map(|rank| {
                std::thread::spawn(move || {
                    let comm = NcclComm::new(id, rank, 2, rank).unwrap();
                    assert_eq!((comm.rank(), comm.world(), comm.device()), (rank, 2, rank));
                    // Gradients: rank r holds (i mod 1000) + 10 r, so the mean is (i mod 1000) + 5.
                    let grads: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 + 10.0 * rank as f32).collect();
                    // Weights: rank 1's are i, the others' are garbage until broadcast.
                    let weights: Vec<f32> = (0..n).map(|i| if rank == 1 { i as f32 } else { -1.0 }).collect();
                    let sums = [0.25f64 + rank as f64, 1e12 * (rank + 1) as f64];
                    let (g, w, s) = (upload(&grads), upload(&weights), upload(&sums));
                    unsafe {
                        comm.all_reduce_mean_f32(g, n).unwrap();
                        comm.broadcast_f32(w, n, 1).unwrap();
                        comm.all_reduce_sum_f64(s, 2).unwrap();
                    }
                    comm.synchronize().unwrap();
                    let out = (download::<f32>(g, n), download::<f32>(w, n), download::<f64>(s, 2));
                    free(g);
                    free(w);
                    free(s);
                    out
                })
            })
            .collect();
        for (rank, t) in threads.into_iter().enumerate() {
            let (grads, weights, sums) = t.join().unwrap();
            for (i, v) in grads.iter().enumerate() {
                assert_eq!(*v, (i % 1000) as f32 + 5.0, "rank {rank}: mean, element {i}");
            }
            for (i, v) in weights.iter().enumerate() {
                assert_eq!(*v, i as f32, "rank {rank}: broadcast, element {i}");
            }
            assert_eq!(sums, vec![1.5, 3e12], "rank {rank}: f64 sums");
        }
    }
}
