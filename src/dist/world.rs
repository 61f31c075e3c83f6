//! Who this process is among the ranks: MPI's world, or a world of one without mpirun.

use mpi::raw::AsRaw;
use mpi::topology::{Communicator, SimpleCommunicator};

extern "C" {
    /// MPI_IN_PLACE of the mpi.h we built against (src/dist/mpi_in_place.c).
    fn algpt2_mpi_in_place() -> *mut std::ffi::c_void;
}
use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::environment::Universe;

/// The process world. Holding it keeps MPI initialized; dropping it finalizes MPI.
pub struct World {
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
    // Field order matters: communicators must drop before the universe finalizes MPI.
    comm: SimpleCommunicator,
    _universe: Universe,
}

impl World {
    /// Joins the MPI world (a singleton world when not started by mpirun).
    pub fn init() -> anyhow::Result<World> {
        let universe = mpi::initialize()
            .ok_or_else(|| anyhow::anyhow!("MPI was already initialized in this process"))?;
        let comm = universe.world();
        // Ranks sharing a node (shared memory) give the local rank, which picks the GPU.
        let node = comm.split_shared(comm.rank());
        Ok(World {
            rank: comm.rank() as usize,
            size: comm.size() as usize,
            local_rank: node.rank() as usize,
            local_size: node.size() as usize,
            comm,
            _universe: universe,
        })
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
    /// Rank 0 alone writes files, logs and reports.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
    pub fn barrier(&self) {
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
            let mut host = t.to_device(tch::Device::Cpu);
            self.all_reduce_sum_in_place(&mut host, bucket_elems)?;
            tch::no_grad(|| t.copy_(&host));
            return Ok(());
        }
        anyhow::ensure!(t.kind() == tch::Kind::Float && t.is_contiguous(), "MPI all-reduce needs a contiguous f32 tensor");
        let count = t.numel();
        let base = t.data_ptr() as *mut f32;
        let mut offset = 0;
        while offset < count {
            let n = bucket_elems.min(count - offset).min(i32::MAX as usize);
            // SAFETY: [base + offset, base + offset + n) lies inside the tensor's contiguous
            // f32 storage, which nothing else touches during this blocking call.
            let rc = unsafe {
                mpi::ffi::MPI_Allreduce(
                    algpt2_mpi_in_place(),
                    base.add(offset) as *mut std::ffi::c_void,
                    n as i32,
                    mpi::ffi::RSMPI_FLOAT,
                    mpi::ffi::RSMPI_SUM,
                    self.comm.as_raw(),
                )
            };
            anyhow::ensure!(rc == 0, "MPI_Allreduce failed on rank {} with code {rc}", self.rank);
            offset += n;
        }
        Ok(())
    }

    /// Every rank's `values`, rank after rank.
    pub fn all_gather(&self, values: &[f64]) -> Vec<f64> {
        let mut out = vec![0f64; values.len() * self.size];
        if self.size == 1 {
            out.copy_from_slice(values);
        } else {
            self.comm.all_gather_into(values, &mut out[..]);
        }
        out
    }

    /// The largest of each value across ranks (e.g. "any rank asked to stop").
    pub fn all_reduce_max(&self, values: &mut [f64]) {
        if self.size == 1 {
            return;
        }
        let send = values.to_vec();
        self.comm.all_reduce_into(&send[..], values, SystemOperation::max());
    }

    /// Sums a few numbers across ranks (loss and token totals of evaluation).
    pub fn all_reduce_sum(&self, values: &mut [f64]) {
        if self.size == 1 {
            return;
        }
        let send = values.to_vec();
        self.comm.all_reduce_into(&send[..], values, SystemOperation::sum());
    }

    /// Rank 0's bytes on every rank.
    pub fn broadcast_bytes(&self, values: &mut [u8]) {
        if self.size > 1 {
            self.comm.process_at_rank(0).broadcast_into(values);
        }
    }

    /// Rank 0's values of a float tensor on every rank (staged through host memory).
    pub fn broadcast_from_main(&self, t: &mut tch::Tensor) {
        if self.size == 1 {
            return;
        }
        let mut data = Vec::<f32>::try_from(&t.to_device(tch::Device::Cpu)).expect("an f32 tensor");
        self.comm.process_at_rank(0).broadcast_into(&mut data[..]);
        let received = tch::Tensor::from_slice(&data).view(t.size().as_slice()).to_device(t.device());
        tch::no_grad(|| t.copy_(&received));
    }

    /// Ends every rank of the job: a rank that cannot go on must not leave the others
    /// waiting in a collective.
    pub fn abort(&self, code: i32) -> ! {
        self.comm.abort(code)
    }
}
