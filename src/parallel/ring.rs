//! The overlapped exchange's all-reduce: a ring (reduce-scatter, then all-gather), each
//! rank sending to the next while receiving from the previous, so that both directions
//! of every link carry data at once: on two ranks `size / bandwidth`, where Open MPI's
//! non-blocking all-reduce (binomial for fewer than 4 ranks) sends one way at a time,
//! twice as long. Non-blocking point-to-point calls polled with short sleeps, so the
//! thread leaves the core to the backward it hides in.
//!
//! Each element ends as the sum of every rank's values: on two ranks `a + b`, the same
//! bits as any other all-reduce (addition commutes); on more ranks in the ring's order.

use super::RawComm;
use std::time::Duration;

/// Values a ring can sum: f32, or bf16 words added in fp32 and rounded back.
pub trait Summable: Copy + Default {
    fn add(self, other: Self) -> Self;
}

impl Summable for f32 {
    fn add(self, other: f32) -> f32 {
        self + other
    }
}

/// A bf16 value as its 16-bit word.
#[derive(Clone, Copy, Default, Debug, PartialEq)]
pub struct Bf16(pub u16);

impl Summable for Bf16 {
    /// As the MPI op of src/parallel/mpi_in_place.c: fp32 sum, rounded to nearest even.
    fn add(self, other: Bf16) -> Bf16 {
        let sum = f32::from_bits(u32::from(self.0) << 16) + f32::from_bits(u32::from(other.0) << 16);
        Bf16(f32_to_bf16(sum))
    }
}

/// To bf16 by rounding to nearest, ties to even, as libtorch's cast (NaN stays NaN).
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x0040) as u16;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// The segment of `n` values rank-slot `i` of `p` owns: `[i·n/p, (i+1)·n/p)`.
fn segment(n: usize, p: usize, i: usize) -> std::ops::Range<usize> {
    (i * n / p)..((i + 1) * n / p)
}

fn bytes_of<T>(values: &[T]) -> &[u8] {
    // SAFETY: plain-old-data values viewed as their bytes.
    unsafe { std::slice::from_raw_parts(values.as_ptr() as *const u8, std::mem::size_of_val(values)) }
}

fn bytes_of_mut<T>(values: &mut [T]) -> &mut [u8] {
    // SAFETY: as bytes_of; any bytes received are a valid f32 or u16.
    unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr() as *mut u8, std::mem::size_of_val(values)) }
}

/// Replaces `values` by its sum over the ranks of `comm` (every rank calls it with the
/// same length; a rank whose length differs is an error naming it).
pub fn all_reduce_sum<T: Summable>(comm: &RawComm, values: &mut [T], poll: Duration) -> Result<(), String> {
    let (p, r, n) = (comm.size, comm.rank, values.len());
    if p == 1 {
        return Ok(());
    }
    let (next, prev) = ((r + 1) % p, (r + p - 1) % p);
    // Each rank's length to the next first, in 8 bytes on every rank: a rank whose length
    // differs is named before a segment's receive could be truncated. MPI reports a
    // truncation, but Open MPI's single-copy path for large messages (CMA) was seen to
    // write past the receive buffer doing so (a corrupted heap, not an error).
    let mut theirs = [0u8; 8];
    // SAFETY: both buffers are ours and untouched until the call returns.
    unsafe { comm.send_receive(&(n as u64).to_le_bytes(), next, &mut theirs, prev, (2 * p) as i32, poll)? };
    let prev_n = u64::from_le_bytes(theirs);
    if prev_n != n as u64 {
        return Err(format!("rank {prev} has {prev_n} values where rank {r} has {n} (the ranks' gradient layouts differ)"));
    }
    if n == 0 {
        return Ok(());
    }
    let mut incoming = vec![T::default(); n.div_ceil(p) + 1];
    // Reduce-scatter: after p-1 steps rank r holds the sum of segment (r+1) mod p.
    for s in 0..p - 1 {
        let (send, recv) = (segment(n, p, (r + p - s) % p), segment(n, p, (r + 2 * p - s - 1) % p));
        let buffer = &mut incoming[..recv.len()];
        // SAFETY: both buffers are ours and untouched until the call returns.
        unsafe { comm.send_receive(bytes_of(&values[send]), next, bytes_of_mut(buffer), prev, s as i32, poll)? };
        for (v, x) in values[recv].iter_mut().zip(buffer.iter()) {
            *v = x.add(*v);
        }
    }
    // All-gather: the summed segments go round.
    for s in 0..p - 1 {
        let (send, recv) = (segment(n, p, (r + 1 + p - s) % p), segment(n, p, (r + p - s) % p));
        // The two segments are disjoint (p > 1): one is read while the other is written.
        let base = values.as_mut_ptr();
        // SAFETY: `send` and `recv` are disjoint ranges inside `values`, which nothing
        // else touches until the call returns.
        unsafe {
            let sending = std::slice::from_raw_parts(base.add(send.start), send.len());
            let receiving = std::slice::from_raw_parts_mut(base.add(recv.start), recv.len());
            comm.send_receive(bytes_of(sending), next, bytes_of_mut(receiving), prev, (p + s) as i32, poll)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cover_the_values_once() {
        for (n, p) in [(10, 3), (7, 4), (2, 2), (1, 3)] {
            let total: usize = (0..p).map(|i| segment(n, p, i).len()).sum();
            assert_eq!(total, n);
            assert!((0..p - 1).all(|i| segment(n, p, i).end == segment(n, p, i + 1).start));
        }
    }

    #[test]
    fn bf16_sums_round_to_nearest_even() {
        let one = Bf16(0x3f80);
        assert_eq!(one.add(one), Bf16(0x4000));
        assert_eq!(one.add(Bf16(0x3b80)), one, "1 + 2^-8 rounds back to 1 (a tie, to even)");
    }
}
