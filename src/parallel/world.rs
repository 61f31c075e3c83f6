//! Who this process is among the ranks: MPI's world, or a world of one without mpirun.

use mpi::raw::AsRaw;
use mpi::topology::{Communicator, SimpleCommunicator};

extern "C" {
    /// MPI_IN_PLACE of the mpi.h we built against (src/parallel/mpi_in_place.c).
    fn algpt2_mpi_in_place() -> *mut std::ffi::c_void;
    /// In-place sum of bf16 words, each pair added in fp32 (src/parallel/mpi_in_place.c).
    fn algpt2_allreduce_bf16_sum(buf: *mut std::ffi::c_void, count: i32, comm: mpi::ffi::MPI_Comm) -> i32;
    /// Non-blocking point-to-point calls and their completion (the same shim).
    fn algpt2_isend(
        buf: *const std::ffi::c_void,
        bytes: i32,
        dest: i32,
        tag: i32,
        comm: mpi::ffi::MPI_Comm,
        request: *mut mpi::ffi::MPI_Request,
    ) -> i32;
    fn algpt2_irecv(
        buf: *mut std::ffi::c_void,
        bytes: i32,
        source: i32,
        tag: i32,
        comm: mpi::ffi::MPI_Comm,
        request: *mut mpi::ffi::MPI_Request,
    ) -> i32;
    fn algpt2_testall(n: i32, requests: *mut mpi::ffi::MPI_Request, done: *mut i32, received: *mut i32) -> i32;
    fn algpt2_errors_return(comm: mpi::ffi::MPI_Comm) -> i32;
    fn algpt2_error_string(code: i32, text: *mut std::ffi::c_char, len: *mut i32);
    fn algpt2_is_truncation(code: i32) -> i32;
}

/// MPI's words for `code`.
fn mpi_error_text(code: i32) -> String {
    let mut text = vec![0 as std::ffi::c_char; 1024];
    let mut len = 0;
    // SAFETY: MPI_MAX_ERROR_STRING is at most 1024 in Open MPI and MPICH, written into
    // a buffer of that size.
    unsafe { algpt2_error_string(code, text.as_mut_ptr(), &mut len) };
    let bytes: Vec<u8> = text[..len.clamp(0, 1024) as usize].iter().map(|&c| c as u8).collect();
    format!("MPI code {code}: {}", String::from_utf8_lossy(&bytes))
}

/// This rank and the world's size as the launcher announces them in the environment
/// before MPI's init: Open MPI's, then MPICH's and Intel's (PMI).
fn rank_from_launcher(env: &dyn Fn(&str) -> Option<String>) -> Option<(usize, usize)> {
    [("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE")].iter().find_map(|(rank, size)| {
        let (rank, size) = (env(rank)?.parse().ok()?, env(size)?.parse::<usize>().ok()?);
        (rank < size).then_some((rank, size))
    })
}

#[cfg(test)]
extern "C" {
    fn algpt2_bf16_sum(input: *const u16, inout: *mut u16, n: i32);
}
use super::waiting::InCollective;
use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::environment::Universe;

/// A communicator handle that a communication thread owns (`World::duplicate`). Freed
/// by `free`, before MPI is finalized.
pub struct RawComm {
    comm: mpi::ffi::MPI_Comm,
    pub size: usize,
    pub rank: usize,
}

// SAFETY: an MPI communicator handle may be used from any thread under
// MPI_THREAD_SERIALIZED; the one thread that holds a RawComm is the only one using it.
unsafe impl Send for RawComm {}

impl RawComm {
    /// Sends `send` to rank `to` while receiving `recv` from rank `from` (the same tag),
    /// polled every `poll` until both are done. Receiving other than `recv.len()` bytes is
    /// an error naming rank `from` (the communicator returns errors: `World::duplicate`),
    /// never a write past `recv`.
    ///
    /// # Safety
    /// The buffers stay untouched by anything else until the call returns.
    pub unsafe fn send_receive(
        &self,
        send: &[u8],
        to: usize,
        recv: &mut [u8],
        from: usize,
        tag: i32,
        poll: std::time::Duration,
    ) -> Result<(), String> {
        let mut requests: [mpi::ffi::MPI_Request; 2] = std::mem::zeroed();
        let rc = algpt2_irecv(recv.as_mut_ptr() as *mut std::ffi::c_void, recv.len() as i32, from as i32, tag, self.comm, &mut requests[0]);
        if rc != 0 {
            return Err(format!("rank {} cannot receive from rank {from} ({})", self.rank, mpi_error_text(rc)));
        }
        let rc = algpt2_isend(send.as_ptr() as *const std::ffi::c_void, send.len() as i32, to as i32, tag, self.comm, &mut requests[1]);
        if rc != 0 {
            return Err(format!("rank {} cannot send to rank {to} ({})", self.rank, mpi_error_text(rc)));
        }
        loop {
            let (mut done, mut received) = (0, 0);
            let rc = algpt2_testall(2, requests.as_mut_ptr(), &mut done, &mut received);
            if rc != 0 {
                // Only a truncation says the sizes differ; any other code (a peer gone, a
                // network error) is named as it is.
                let why = if algpt2_is_truncation(rc) != 0 {
                    format!(" (a rank sent more than rank {} expected: the ranks' gradient layouts differ)", self.rank)
                } else {
                    String::new()
                };
                return Err(format!(
                    "the exchange between rank {from}, rank {} and rank {to} failed: {}{why}",
                    self.rank,
                    mpi_error_text(rc)
                ));
            }
            if done != 0 {
                if received as usize != recv.len() {
                    return Err(format!(
                        "rank {from} sent {received} bytes where rank {} expected {} (the ranks' gradient layouts differ)",
                        self.rank,
                        recv.len()
                    ));
                }
                return Ok(());
            }
            std::thread::sleep(poll);
        }
    }

    pub fn free(mut self) {
        // SAFETY: the handle came from MPI_Comm_dup and is freed once, here.
        unsafe {
            mpi::ffi::MPI_Comm_free(&mut self.comm);
        }
    }
}

/// The process world. Holding it keeps MPI initialized; dropping it finalizes MPI.
pub struct World {
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
    /// MPI allows calls from a second thread, one call at a time (the overlapped
    /// gradient exchange's communication thread).
    serialized_threads: bool,
    // Field order matters: communicators must drop before the universe finalizes MPI.
    comm: SimpleCommunicator,
    _universe: Universe,
}

impl World {
    /// Joins the MPI world (a singleton world when not started by mpirun).
    pub fn init() -> anyhow::Result<World> {
        World::init_then(|_, _| ()).map(|(world, ())| world)
    }

    /// Joins the MPI world, calling `joined(rank, size)` as soon as MPI's init returns,
    /// before the first collective (the node split): training arms its watchdog there, so
    /// that a rank stuck in any collective of start-up is named.
    pub fn init_then<T>(joined: impl FnOnce(usize, usize) -> T) -> anyhow::Result<(World, T)> {
        // MPI's init waits for every rank: where the launcher says which rank this is,
        // `joined` comes before it, so that init is timed too.
        let announced = rank_from_launcher(&|name| std::env::var(name).ok());
        // Ok: `joined` was called before the init; Err: it waits for the init's answer.
        let before_init = match announced {
            Some((rank, size)) => {
                let armed = joined(rank, size);
                super::phase::Phase::MpiInit.begin(rank);
                Ok(armed)
            }
            None => Err(joined),
        };
        // Serialized: the overlapped exchange's thread calls MPI while the main thread
        // computes (and never calls MPI) until it has waited for that thread.
        let (universe, threading) = {
            let _waiting = InCollective::enter();
            mpi::initialize_with_threading(mpi::Threading::Serialized)
                .ok_or_else(|| anyhow::anyhow!("MPI was already initialized in this process"))?
        };
        let serialized_threads = matches!(threading, mpi::Threading::Serialized | mpi::Threading::Multiple);
        let comm = universe.world();
        let (rank, size) = (comm.rank() as usize, comm.size() as usize);
        let armed = match before_init {
            Ok(armed) => {
                if let Some((said_rank, said_size)) = announced.filter(|&said| said != (rank, size)) {
                    anyhow::bail!(
                        "the launcher's environment says rank {said_rank} of {said_size}, MPI says rank {rank} of {size}: \
                         an environment variable of another launcher (OMPI_COMM_WORLD_RANK, PMI_RANK) was left set"
                    );
                }
                armed
            }
            Err(joined) => joined(rank, size),
        };
        super::phase::Phase::NodeSplit.begin(rank);
        // Ranks sharing a node (shared memory) give the local rank, which picks the GPU.
        let node = {
            let _waiting = InCollective::enter();
            comm.split_shared(comm.rank())
        };
        let world = World {
            rank,
            size,
            local_rank: node.rank() as usize,
            local_size: node.size() as usize,
            serialized_threads,
            comm,
            _universe: universe,
        };
        Ok((world, armed))
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn size(&self) -> usize {
        self.size
    }
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }
    /// Ranks on this node: the CPU threads of the node are split between them.
    pub fn local_size(&self) -> usize {
        self.local_size
    }
    /// A second thread may call MPI (one call at a time).
    pub fn allows_a_communication_thread(&self) -> bool {
        self.serialized_threads
    }

    /// A communicator of its own for a communication thread (a collective: every rank
    /// calls it at the same point), so that its calls never match the main thread's.
    pub fn duplicate(&self) -> anyhow::Result<RawComm> {
        let mut dup: mpi::ffi::MPI_Comm = unsafe { std::mem::zeroed() };
        let _waiting = InCollective::enter();
        // SAFETY: MPI_Comm_dup writes one communicator handle into `dup`.
        let rc = unsafe { mpi::ffi::MPI_Comm_dup(self.comm.as_raw(), &mut dup) };
        anyhow::ensure!(rc == 0, "MPI_Comm_dup failed on rank {} with code {rc}", self.rank);
        // SAFETY: `dup` is the communicator just made.
        let rc = unsafe { algpt2_errors_return(dup) };
        anyhow::ensure!(rc == 0, "MPI_Comm_set_errhandler failed on rank {} with code {rc}", self.rank);
        Ok(RawComm { comm: dup, size: self.size, rank: self.rank })
    }

    /// Rank 0 alone writes files, logs and reports.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
    pub fn barrier(&self) {
        let _waiting = InCollective::enter();
        self.comm.barrier();
    }
    /// Sums a float tensor across ranks in place, through MPI in buckets of at most
    /// `bucket_elems` values. A CUDA tensor is staged through host memory (MPI here is
    /// not CUDA-aware; the NCCL backend is the GPU path).
    pub fn all_reduce_sum_in_place(&self, t: &mut tch::Tensor, bucket_elems: usize) -> anyhow::Result<()> {
        if self.size == 1 {
            return Ok(());
        }
        if t.device() != tch::Device::Cpu {
            // Through host memory and back: two waits for the GPU, counted.
            let mut host = crate::host_waits::to_device(t, tch::Device::Cpu);
            self.all_reduce_sum_in_place(&mut host, bucket_elems)?;
            crate::host_waits::copy_across(t, &host);
            return Ok(());
        }
        anyhow::ensure!(t.kind() == tch::Kind::Float && t.is_contiguous(), "MPI all-reduce needs a contiguous f32 tensor");
        let base = t.data_ptr() as *mut f32;
        self.in_buckets("MPI_Allreduce (f32 sum)", t.numel(), bucket_elems, |offset, n| {
            // SAFETY: [base + offset, base + offset + n) lies inside the tensor's contiguous
            // f32 storage, which nothing else touches during this blocking call.
            unsafe {
                mpi::ffi::MPI_Allreduce(
                    algpt2_mpi_in_place(),
                    base.add(offset) as *mut std::ffi::c_void,
                    n,
                    mpi::ffi::RSMPI_FLOAT,
                    mpi::ffi::RSMPI_SUM,
                    self.comm.as_raw(),
                )
            }
        })
    }

    /// Sums a bf16 tensor (on the CPU, contiguous) across ranks in place, each addition
    /// done in fp32 and rounded back: half the bytes of the f32 exchange.
    pub fn all_reduce_bf16_sum_in_place(&self, t: &mut tch::Tensor, bucket_elems: usize) -> anyhow::Result<()> {
        if self.size == 1 {
            return Ok(());
        }
        anyhow::ensure!(
            t.kind() == tch::Kind::BFloat16 && t.is_contiguous() && t.device() == tch::Device::Cpu,
            "the bf16 MPI all-reduce needs a contiguous bf16 tensor in host memory"
        );
        let base = t.data_ptr() as *mut u16;
        self.in_buckets("MPI_Allreduce (bf16 sum)", t.numel(), bucket_elems, |offset, n| {
            // SAFETY: as in all_reduce_sum_in_place, with 2-byte elements.
            unsafe { algpt2_allreduce_bf16_sum(base.add(offset) as *mut std::ffi::c_void, n, self.comm.as_raw()) }
        })
    }

    /// Runs `reduce(offset, n)` over `count` elements in buckets of at most
    /// `bucket_elems`, failing on the first non-zero MPI code.
    fn in_buckets(&self, what: &str, count: usize, bucket_elems: usize, reduce: impl Fn(usize, i32) -> i32) -> anyhow::Result<()> {
        let _waiting = InCollective::enter();
        let mut offset = 0;
        while offset < count {
            let n = bucket_elems.max(1).min(count - offset).min(i32::MAX as usize);
            let rc = reduce(offset, n as i32);
            anyhow::ensure!(rc == 0, "{what} failed on rank {} with code {rc}", self.rank);
            offset += n;
        }
        Ok(())
    }

    /// Every rank's `values` (the same length on every rank), rank after rank.
    pub fn all_gather<T: mpi::datatype::Equivalence + Copy + Default>(&self, values: &[T]) -> Vec<T> {
        let mut out = vec![T::default(); values.len() * self.size];
        if self.size == 1 {
            out.copy_from_slice(values);
        } else {
            let _waiting = InCollective::enter();
            self.comm.all_gather_into(values, &mut out[..]);
        }
        out
    }

    /// Every rank's `values`, rank after rank, on the main rank; `None` on the others.
    /// The lengths are compared first (one value each): a rank whose length differs is an
    /// error naming it, on every rank, where a gather into a buffer sized for the main
    /// rank's length would write past it.
    pub fn gather_to_main(&self, values: &[f64]) -> anyhow::Result<Option<Vec<f64>>> {
        if self.size == 1 {
            return Ok(Some(values.to_vec()));
        }
        self.check_same_length("a gather to rank 0", values.len())?;
        let root = self.comm.process_at_rank(0);
        let _waiting = InCollective::enter();
        if self.is_main() {
            let mut out = vec![0f64; values.len() * self.size];
            root.gather_into_root(values, &mut out[..]);
            Ok(Some(out))
        } else {
            root.gather_into(values);
            Ok(None)
        }
    }

    /// Every rank's text, rank after rank, on every rank (reports of `doctor`).
    pub fn all_gather_text(&self, text: &str) -> Vec<String> {
        if self.size == 1 {
            return vec![text.to_string()];
        }
        let lengths = self.all_gather(&[text.len() as f64]);
        let width = lengths.iter().fold(0f64, |a, b| a.max(*b)) as usize;
        if width == 0 {
            return vec![String::new(); self.size];
        }
        let mut mine = text.as_bytes().to_vec();
        mine.resize(width, 0);
        let mut all = vec![0u8; width * self.size];
        let _waiting = InCollective::enter();
        self.comm.all_gather_into(&mine[..], &mut all[..]);
        all.chunks(width.max(1)).zip(lengths).map(|(chunk, len)| String::from_utf8_lossy(&chunk[..len as usize]).into_owned()).collect()
    }

    /// The MPI library and its version (e.g. "Open MPI v4.1.4"), without the build
    /// details that follow them.
    pub fn library_version() -> String {
        mpi::environment::library_version()
            .map_or_else(|_| "unknown".to_string(), |v| v.split([',', '\n']).next().unwrap_or("").trim().to_string())
    }

    /// The largest of each value across ranks (e.g. "any rank asked to stop").
    pub fn all_reduce_max(&self, values: &mut [f64]) {
        if self.size == 1 {
            return;
        }
        let send = values.to_vec();
        let _waiting = InCollective::enter();
        self.comm.all_reduce_into(&send[..], values, SystemOperation::max());
    }

    /// Sums a few numbers across ranks (loss and token totals of evaluation).
    pub fn all_reduce_sum(&self, values: &mut [f64]) {
        if self.size == 1 {
            return;
        }
        let send = values.to_vec();
        let _waiting = InCollective::enter();
        self.comm.all_reduce_into(&send[..], values, SystemOperation::sum());
    }

    /// Rank 0's bytes on every rank.
    pub fn broadcast_bytes(&self, values: &mut [u8]) {
        if self.size > 1 {
            let _waiting = InCollective::enter();
            self.comm.process_at_rank(0).broadcast_into(values);
        }
    }

    /// Rank 0's values of a float tensor on every rank (staged through host memory). A
    /// rank whose tensor has another length is an error naming it, on every rank.
    pub fn broadcast_from_main(&self, t: &mut tch::Tensor) -> anyhow::Result<()> {
        if self.size == 1 {
            return Ok(());
        }
        self.check_same_length("the weight broadcast", t.numel())?;
        let mut data = Vec::<f32>::try_from(&t.to_device(tch::Device::Cpu)).expect("an f32 tensor");
        {
            let _waiting = InCollective::enter();
            self.comm.process_at_rank(0).broadcast_into(&mut data[..]);
        }
        let received = tch::Tensor::from_slice(&data).view(t.size().as_slice()).to_device(t.device());
        tch::no_grad(|| t.copy_(&received));
        Ok(())
    }

    /// Fails, naming the first rank whose `len` differs from rank 0's, before a collective
    /// of `len` values (one small all-gather).
    pub fn check_same_length(&self, what: &str, len: usize) -> anyhow::Result<()> {
        let lengths = self.all_gather(&[len as f64]);
        if let Some(rank) = lengths.iter().position(|&n| n != lengths[0]) {
            anyhow::bail!(
                "{what}: rank {rank} has {} values where rank 0 has {} (the ranks run different builds or settings)",
                lengths[rank],
                lengths[0]
            );
        }
        Ok(())
    }

    /// Ends every rank of the job: a rank that cannot go on must not leave the others
    /// waiting in a collective.
    pub fn abort(&self, code: i32) -> ! {
        self.comm.abort(code)
    }
}

#[cfg(test)]
mod tests {
    use super::algpt2_bf16_sum;
    use tch::{Kind, Tensor};

    #[test]
    fn the_launchers_word_for_the_rank_is_read_where_it_is_whole() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        let read = |pairs: &'static [(&'static str, &'static str)]| super::rank_from_launcher(&env(pairs));
        assert_eq!(read(&[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "2")]), Some((1, 2)));
        assert_eq!(read(&[("PMI_RANK", "3"), ("PMI_SIZE", "4")]), Some((3, 4)));
        // Half a pair, a rank past the size or a word that is no number: MPI's init says.
        assert_eq!(read(&[("OMPI_COMM_WORLD_RANK", "1")]), None);
        assert_eq!(read(&[("OMPI_COMM_WORLD_RANK", "2"), ("OMPI_COMM_WORLD_SIZE", "2")]), None);
        assert_eq!(read(&[("PMI_RANK", "x"), ("PMI_SIZE", "2")]), None);
        assert_eq!(read(&[]), None);
    }

    /// The MPI reduction's element step against libtorch's own bf16 rounding.
    #[test]
    fn bf16_sum_adds_in_fp32_and_rounds_like_libtorch() {
        tch::manual_seed(3);
        let a = (Tensor::randn([4096], (Kind::Float, tch::Device::Cpu)) * 1e-3).to_kind(Kind::BFloat16);
        let b = (Tensor::randn([4096], (Kind::Float, tch::Device::Cpu)) * 3.0).to_kind(Kind::BFloat16);
        let specials = Tensor::from_slice(&[f32::INFINITY, -0.0, 1e-40, f32::MAX, 0.5]).to_kind(Kind::BFloat16);
        let a = Tensor::cat(&[a, specials.shallow_clone()], 0);
        let b = Tensor::cat(&[b, specials], 0);
        let expected = (a.to_kind(Kind::Float) + b.to_kind(Kind::Float)).to_kind(Kind::BFloat16);
        let ours = b.copy();
        // SAFETY: both tensors are contiguous bf16 of the same length.
        unsafe { algpt2_bf16_sum(a.data_ptr() as *const u16, ours.data_ptr() as *mut u16, a.numel() as i32) };
        let bits = |t: &Tensor| Vec::<i16>::try_from(t.view_dtype(Kind::Int16)).unwrap();
        assert_eq!(bits(&ours), bits(&expected));
        // NaN stays NaN.
        let nan = Tensor::from_slice(&[f32::NAN]).to_kind(Kind::BFloat16);
        let one = Tensor::from_slice(&[1.0f32]).to_kind(Kind::BFloat16);
        unsafe { algpt2_bf16_sum(nan.data_ptr() as *const u16, one.data_ptr() as *mut u16, 1) };
        assert!(one.to_kind(Kind::Float).double_value(&[0]).is_nan());
    }
}
