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
//! Built against NCCL 2.29 (cudarc feature `nccl-02029`, the version in torch 2.13's wheels);
//! any NCCL 2.10 or later that has the symbols used here works.

use std::any::Any;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt;
use std::mem::MaybeUninit;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _};
use cudarc::driver::result::DriverError;
use cudarc::driver::{self, CudaContext};
use cudarc::nccl::sys as nccl;

/// What to configure instead of NCCL, appended to every "cannot be used" message.
const FALLBACK_HINT: &str = "Use `dist.backend: mpi` (gradients averaged on the CPU through MPI) \
                             or `device: cpu` in the config.";

/// The oldest driver the CUDA 13 builds of NCCL and libtorch run on (`cuDriverGetVersion`).
const MIN_DRIVER_CUDA: i32 = 13000;

/// `ncclAvg` appeared in NCCL 2.10.
const MIN_NCCL: (u32, u32) = (2, 10);

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
    #[error("NCCL cannot be used: NCCL {0} is older than 2.10, which introduced ncclAvg. {hint}", hint = FALLBACK_HINT)]
    OldNccl(String),
    #[error("NCCL cannot be used: {0}. {hint}", hint = FALLBACK_HINT)]
    Failed(String),
}

/// What [`probe`] found: enough for a start-up line such as "NCCL ✓ 2.29.7, 8 GPUs".
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
/// driver initializes, supports CUDA 13 and shows at least one GPU, and that NCCL is 2.10 or
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
/// Not `Sync`: NCCL communicators must not be used from two threads at once. `Send`: each call
/// makes the GPU's context current on the calling thread first.
pub struct NcclComm {
    rank: usize,
    world: usize,
    device: usize,
    /// Null once aborted.
    comm: nccl::ncclComm_t,
    /// The primary context of `device` (retained; released after the communicator is destroyed,
    /// since `Drop::drop` runs before the fields drop).
    ctx: Arc<CudaContext>,
}

// SAFETY: an NCCL communicator may be used from any thread, one at a time; `&self` methods are
// not callable from two threads at once because NcclComm is not Sync.
unsafe impl Send for NcclComm {}

impl fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.device)
            .field("aborted", &self.comm.is_null())
            .finish()
    }
}

impl NcclComm {
    /// Joins the communicator: every rank calls this with the same id; binds to GPU `device`.
    ///
    /// Makes `device`'s primary context current on the calling thread (as `cudaSetDevice`
    /// would) and blocks, with no time limit, until all `world` ranks have called it with the
    /// same id. `device` is an ordinal among the GPUs CUDA_VISIBLE_DEVICES leaves visible.
    pub fn new(id: [u8; 128], rank: usize, world: usize, device: usize) -> anyhow::Result<NcclComm> {
        Self::join(id, rank, world, device)
            .with_context(|| format!("NCCL rank {rank} of {world} on GPU {device} could not join the communicator"))
    }

    fn join(id: [u8; 128], rank: usize, world: usize, device: usize) -> anyhow::Result<NcclComm> {
        if world == 0 || rank >= world {
            bail!("rank {rank} is not in a world of {world}");
        }
        let nranks = c_int::try_from(world).map_err(|_| anyhow!("a world of {world} ranks is more than NCCL takes"))?;
        if id.iter().all(|&b| b == 0) {
            bail!("the NCCL unique id is all zeros: it must be created by unique_id() on rank 0 and broadcast to every rank");
        }
        let info = probe()?;
        if device >= info.gpus {
            bail!("GPU {device} does not exist: the driver shows {} GPU(s) (CUDA_VISIBLE_DEVICES={})", info.gpus, visible_devices());
        }
        let ctx = guarded("creating the CUDA context", || CudaContext::new(device))?
            .map_err(|e| anyhow!("the primary CUDA context of GPU {device} failed: {}", cuda_error(&e)))?;
        let uid = nccl::ncclUniqueId { internal: id.map(|b| b as c_char) };
        let mut comm: nccl::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out pointer; NCCL uses the device current on this thread,
        // which CudaContext::new just made `device`.
        let res = guarded("calling ncclCommInitRank", || unsafe { nccl::ncclCommInitRank(&mut comm, nranks, uid, rank as c_int) })?;
        nccl_check(res, "ncclCommInitRank", std::ptr::null_mut())?;
        if comm.is_null() {
            bail!("ncclCommInitRank succeeded but returned no communicator");
        }
        let out = NcclComm { rank, world, device, comm, ctx };
        out.verify()?; // on error `out` drops here and destroys the communicator
        Ok(out)
    }

    /// Asks NCCL what it made of us: a mismatch means a wrong id, device or rank upstream.
    fn verify(&self) -> anyhow::Result<()> {
        let (mut n, mut r, mut d): (c_int, c_int, c_int) = (0, 0, 0);
        guarded("querying the communicator", || -> anyhow::Result<()> {
            // SAFETY: valid communicator and out pointers.
            unsafe {
                nccl_check(nccl::ncclCommCount(self.comm, &mut n), "ncclCommCount", self.comm)?;
                nccl_check(nccl::ncclCommUserRank(self.comm, &mut r), "ncclCommUserRank", self.comm)?;
                nccl_check(nccl::ncclCommCuDevice(self.comm, &mut d), "ncclCommCuDevice", self.comm)?;
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
    /// a bucket's few runs instead of one each. The group is closed on every path.
    pub fn group(&self, calls: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
        self.bind()?;
        // SAFETY: ncclGroupStart takes no arguments; a matching ncclGroupEnd follows.
        let res = guarded("calling ncclGroupStart", || unsafe { nccl::ncclGroupStart() })?;
        nccl_check(res, "ncclGroupStart", self.comm).with_context(|| self.who())?;
        let inside = calls();
        // SAFETY: closes the group opened above.
        let res = guarded("calling ncclGroupEnd", || unsafe { nccl::ncclGroupEnd() })?;
        inside?;
        nccl_check(res, "ncclGroupEnd", self.comm).with_context(|| self.who())
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
        self.check_async_error()
    }

    /// Reports an asynchronous error NCCL has recorded on this communicator, if any.
    pub fn check_async_error(&self) -> anyhow::Result<()> {
        if self.comm.is_null() {
            bail!("{}: the communicator was aborted", self.who());
        }
        let mut raw: u32 = 0;
        // SAFETY: NCCL writes one ncclResult_t (a C enum, 4 bytes) which we read as u32, so that
        // a value this binding does not know cannot become an invalid Rust enum.
        let res =
            guarded("calling ncclCommGetAsyncError", || unsafe { nccl::ncclCommGetAsyncError(self.comm, (&mut raw as *mut u32).cast()) })?;
        nccl_check(res, "ncclCommGetAsyncError", self.comm).with_context(|| self.who())?;
        match nccl_result_from_raw(raw) {
            Some(nccl::ncclResult_t::ncclSuccess) | Some(nccl::ncclResult_t::ncclInProgress) => Ok(()),
            Some(code) => nccl_check(code, "an earlier collective (ncclCommGetAsyncError)", self.comm).with_context(|| self.who()),
            None => bail!("{}: NCCL reports asynchronous error code {raw}", self.who()),
        }
    }

    /// Tears the communicator down without waiting for peers, for error paths where another
    /// rank may be gone (a normal drop calls ncclCommDestroy, which can wait for them).
    pub fn abort(mut self) -> anyhow::Result<()> {
        let comm = std::mem::replace(&mut self.comm, std::ptr::null_mut());
        let res = guarded("calling ncclCommAbort", || {
            let _ = self.ctx.bind_to_thread();
            // SAFETY: `comm` is a live communicator that nothing uses after this.
            unsafe { nccl::ncclCommAbort(comm) }
        })?;
        nccl_check(res, "ncclCommAbort", std::ptr::null_mut()).with_context(|| self.who())
    }

    fn who(&self) -> String {
        format!("NCCL rank {} of {} on GPU {}", self.rank, self.world, self.device)
    }

    /// Makes this GPU's primary context current on the calling thread, so that stream 0 is
    /// this GPU's legacy default stream.
    fn bind(&self) -> anyhow::Result<()> {
        guarded("binding the CUDA context", || self.ctx.bind_to_thread())?
            .map_err(|e| anyhow!("{}: making GPU {}'s context current failed: {}", self.who(), self.device, cuda_error(&e)))
    }

    /// Checks the arguments common to all collectives, binds the context, runs `call` on the
    /// communicator and the buffer, and turns its result into an error naming rank and device.
    fn collective(
        &self,
        what: &str,
        ptr: u64,
        count: usize,
        elem_size: u64,
        call: impl FnOnce(nccl::ncclComm_t, *mut c_void) -> nccl::ncclResult_t,
    ) -> anyhow::Result<()> {
        if self.comm.is_null() {
            bail!("{}: {what} on an aborted communicator", self.who());
        }
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
        let res = guarded(what, || call(self.comm, ptr as usize as *mut c_void))?;
        nccl_check(res, what, self.comm).with_context(|| format!("{}: {what} of {count} values failed", self.who()))
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let comm = std::mem::replace(&mut self.comm, std::ptr::null_mut());
        if comm.is_null() {
            return;
        }
        let outcome = guarded("destroying the NCCL communicator", || {
            let _ = self.ctx.bind_to_thread();
            // SAFETY: `comm` is live and nothing uses it after this.
            nccl_check(unsafe { nccl::ncclCommDestroy(comm) }, "ncclCommDestroy", std::ptr::null_mut())
        });
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) | Err(e) => eprintln!("warning: {}: {e:#}", self.who()),
        }
    }
}

/// Ok for ncclSuccess, else an error with NCCL's name and text for `res` and, given a
/// communicator, NCCL's last error message.
fn nccl_check(res: nccl::ncclResult_t, call: &str, comm: nccl::ncclComm_t) -> anyhow::Result<()> {
    if res == nccl::ncclResult_t::ncclSuccess {
        return Ok(());
    }
    // SAFETY: both return static or NCCL-owned NUL-terminated strings (or null, handled).
    let text = unsafe { c_text(nccl::ncclGetErrorString(res)) };
    let last = unsafe { c_text(nccl::ncclGetLastError(comm)) };
    let last = if last.is_empty() { String::new() } else { format!("; NCCL's last error: {last}") };
    Err(anyhow!("{call} returned {res:?} ({text}){last}. NCCL_DEBUG=INFO shows more"))
}

/// The ncclResult_t values of NCCL 2.29 (nccl.h), for codes that arrive as plain integers.
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
