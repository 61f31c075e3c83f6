//! All-reduce across every rank, checked for exact sums and timed as nccl-tests does:
//! NCCL between the GPUs (the training path on CUDA) and MPI between host buffers (the
//! CPU path, and the path the NCCL id and small values travel).

use super::{bus_bandwidth, Report};
use crate::parallel::nccl::{self, NcclComm};
use crate::parallel::World;
use anyhow::{ensure, Context};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// MPI moves these per call (the trainer's default bucket).
const MPI_BUCKET_ELEMS: usize = 25 << 18;

pub fn run(r: &mut Report, world: &World, device: Device, sizes_mb: &[usize]) {
    mpi_checks(r, world, sizes_mb);
    nccl_checks(r, world, device, sizes_mb);
}

/// Rank r holds (i mod 1021) + r: every sum is a small integer, exact in f32 and f64.
fn expected_sum(i: i64, ranks: usize) -> f64 {
    ((i % 1021) * ranks as i64) as f64 + (ranks * (ranks - 1) / 2) as f64
}

fn pattern(n: i64, rank: usize, kind: Kind, device: Device) -> Tensor {
    (Tensor::arange(n, (Kind::Int64, device)).remainder(1021) + rank as i64).to_kind(kind)
}

fn exact(t: &Tensor, ranks: usize) -> anyhow::Result<()> {
    let n = t.numel() as i64;
    let got = t.to_device(Device::Cpu).to_kind(Kind::Double);
    let want = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(1021).to_kind(Kind::Double) * ranks as f64
        + (ranks * (ranks - 1) / 2) as f64;
    let wrong = got.ne_tensor(&want).sum(Kind::Int64).int64_value(&[]);
    ensure!(
        wrong == 0,
        "{wrong} of {n} sums are wrong (element 1 is {}, expected {})",
        got.double_value(&[1.min(n - 1)]),
        expected_sum(1.min(n - 1), ranks)
    );
    Ok(())
}

/// Iterations timed per size: more for small buffers, whose time is mostly latency.
fn iterations(mb: usize) -> usize {
    if mb <= 16 {
        10
    } else {
        3
    }
}

fn mpi_checks(r: &mut Report, world: &World, sizes_mb: &[usize]) {
    if world.size() == 1 {
        r.skip("MPI all-reduce", "a world of one (run under mpirun -n N to check and time it)");
        return;
    }
    let result = (|| -> anyhow::Result<String> {
        let mut rows = Vec::new();
        for &mb in sizes_mb {
            let n = (mb << 20) as i64 / 4;
            let mut t = pattern(n, world.rank(), Kind::Float, Device::Cpu);
            world.all_reduce_sum_in_place(&mut t, MPI_BUCKET_ELEMS)?;
            exact(&t, world.size()).with_context(|| format!("MPI all-reduce of {mb} MB"))?;
            world.barrier();
            let started = Instant::now();
            for _ in 0..iterations(mb) {
                world.all_reduce_sum_in_place(&mut t, MPI_BUCKET_ELEMS)?;
            }
            let seconds = started.elapsed().as_secs_f64() / iterations(mb) as f64;
            rows.push(row(mb, seconds, world.size()));
        }
        r.fact("MPI bandwidth", rows.join("; "));
        Ok(format!(
            "exact sums across {} ranks for {} MB",
            world.size(),
            sizes_mb.iter().map(|s| s.to_string()).collect::<Vec<_>>().join("/")
        ))
    })();
    r.outcome("MPI all-reduce", result);
}

fn row(mb: usize, seconds: f64, ranks: usize) -> String {
    let (alg, bus) = bus_bandwidth(mb << 20, seconds, ranks);
    format!("{mb} MB {:.2} ms algbw {alg:.2} GB/s busbw {bus:.2} GB/s", seconds * 1e3)
}

fn nccl_checks(r: &mut Report, world: &World, device: Device, sizes_mb: &[usize]) {
    // Every rank must take part or none: a rank that cannot would leave the others
    // waiting in ncclCommInitRank forever.
    let mine = match device {
        Device::Cuda(_) => nccl::check_available().err().map(|e| format!("{e:#}")),
        _ => Some("no GPU".to_string()),
    };
    let mut unable = [mine.is_some() as u8 as f64];
    world.all_reduce_max(&mut unable);
    let Device::Cuda(ordinal) = device else {
        r.skip("NCCL all-reduce", "no GPU on this rank");
        return;
    };
    if let Some(why) = mine {
        r.fail("NCCL all-reduce", why);
        return;
    }
    if unable[0] > 0.0 {
        r.skip("NCCL all-reduce", "another rank cannot use NCCL (see its report)");
        return;
    }
    let result = (|| -> anyhow::Result<String> {
        let mut id = [0u8; 128];
        if world.is_main() {
            id = nccl::unique_id()?;
        }
        world.broadcast_bytes(&mut id);
        let comm = NcclComm::new(id, world.rank(), world.size(), ordinal)?;
        let rows = match nccl_rows(&comm, world, device, sizes_mb) {
            Ok(rows) => rows,
            Err(e) => {
                // A peer may be gone: tear down without waiting for it (a drop would).
                let _ = comm.abort();
                return Err(e);
            }
        };
        r.fact(format!("NCCL bandwidth (cuda:{ordinal})"), rows.join("; "));
        Ok(format!(
            "exact sums across {} rank(s) for {} MB",
            world.size(),
            sizes_mb.iter().map(|s| s.to_string()).collect::<Vec<_>>().join("/")
        ))
    })();
    r.outcome("NCCL all-reduce", result);
}

/// Each size: an exact f64 sum checked, then the training op (f32 average) timed.
fn nccl_rows(comm: &NcclComm, world: &World, device: Device, sizes_mb: &[usize]) -> anyhow::Result<Vec<String>> {
    let mut rows = Vec::new();
    for &mb in sizes_mb {
        // Exact sums in f64, the same bytes in f32 averaged as training does for timing.
        let n64 = (mb << 20) as i64 / 8;
        let t = pattern(n64, world.rank(), Kind::Double, device);
        // SAFETY: contiguous f64 on this rank's GPU, alive until synchronized below;
        // every rank makes the same calls with the same counts.
        unsafe { comm.all_reduce_sum_f64(t.data_ptr() as u64, n64 as usize)? };
        comm.synchronize()?;
        exact(&t, world.size()).with_context(|| format!("NCCL all-reduce of {mb} MB"))?;
        let n32 = (mb << 20) / 4;
        let g = Tensor::ones([n32 as i64], (Kind::Float, device));
        // SAFETY: as above, f32.
        unsafe { comm.all_reduce_mean_f32(g.data_ptr() as u64, n32)? };
        comm.synchronize()?;
        world.barrier();
        let started = Instant::now();
        for _ in 0..iterations(mb) {
            // SAFETY: as above.
            unsafe { comm.all_reduce_mean_f32(g.data_ptr() as u64, n32)? };
        }
        comm.synchronize()?;
        let seconds = started.elapsed().as_secs_f64() / iterations(mb) as f64;
        let wrong = g.ne(1.0).sum(Kind::Int64).int64_value(&[]);
        ensure!(wrong == 0, "NCCL average of ones gave {wrong} values other than 1 ({mb} MB)");
        rows.push(row(mb, seconds, world.size()));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_sums_to_what_the_check_expects() {
        for ranks in [1usize, 2, 3, 8] {
            let sum = (0..ranks).map(|r| pattern(3000, r, Kind::Float, Device::Cpu)).reduce(|a, b| a + b).unwrap();
            exact(&sum, ranks).unwrap();
            let wrong = sum + Tensor::from_slice(&[0f32; 3000]).index_fill(0, &Tensor::from_slice(&[7i64]), 1.0);
            assert!(exact(&wrong, ranks).unwrap_err().to_string().contains("1 of 3000 sums are wrong"));
        }
    }
}
