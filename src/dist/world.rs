//! Who this process is among the ranks: MPI's world, or a world of one without mpirun.

use mpi::topology::{Communicator, SimpleCommunicator};
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
    /// Averages a CPU float tensor across ranks, in place (a no-op for a world of one).
    pub fn all_reduce_mean(&self, t: &mut tch::Tensor) {
        if self.size == 1 {
            return;
        }
        let send = Vec::<f32>::try_from(&*t).expect("a contiguous f32 CPU tensor");
        let mut recv = vec![0f32; send.len()];
        self.comm.all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum());
        let summed = tch::Tensor::from_slice(&recv).view(t.size().as_slice());
        tch::no_grad(|| t.copy_(&(summed / self.size as f64)));
    }

    /// Sums a few numbers across ranks (loss and token totals of evaluation).
    pub fn all_reduce_sum(&self, values: &mut [f64]) {
        if self.size == 1 {
            return;
        }
        let send = values.to_vec();
        self.comm.all_reduce_into(&send[..], values, SystemOperation::sum());
    }

    /// Rank 0's values of a CPU float tensor on every rank.
    pub fn broadcast_from_main(&self, t: &mut tch::Tensor) {
        if self.size == 1 {
            return;
        }
        let mut data = Vec::<f32>::try_from(&*t).expect("a contiguous f32 CPU tensor");
        self.comm.process_at_rank(0).broadcast_into(&mut data[..]);
        let received = tch::Tensor::from_slice(&data).view(t.size().as_slice());
        tch::no_grad(|| t.copy_(&received));
    }

    /// Ends every rank of the job: a rank that cannot go on must not leave the others
    /// waiting in a collective.
    pub fn abort(&self, code: i32) -> ! {
        self.comm.abort(code)
    }
}
