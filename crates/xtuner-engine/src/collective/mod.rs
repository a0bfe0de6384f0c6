//! Collectives over the ranks of a data-parallel run: what the training loop knows of
//! the other ranks. [`Collective`] works on flat host buckets of `f32` (gradients,
//! parameter shards) and a few `f64` statistics; [`local::Local`] is the in-process
//! implementation (one thread per rank, the sum always taken in rank order, so every
//! rank gets bit-identical results and a run's numbers do not depend on timing).
//!
//! Sharding (reduce-scatter, all-gather) splits `len` elements into `world` contiguous
//! shards of `len.div_ceil(world)` elements, the last ones shorter or empty
//! ([`shard_range`]), as DeepSpeed's partitioning of a flat buffer does.

pub mod grads;
pub mod local;
pub mod nccl;
pub mod tcp;

use std::ops::Range;

use crate::Result;

/// The operations a data-parallel run needs between its ranks. Every rank calls the
/// same operations in the same order; an operation returns once every rank has
/// contributed, or fails naming the ranks that did not.
pub trait Collective: Send {
    /// This rank, `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of ranks.
    fn world_size(&self) -> usize;

    /// Every rank's `data` summed element-wise (in rank order); each rank gets the sum.
    ///
    /// # Errors
    /// A rank that does not take part in time, or buckets of different lengths.
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()>;

    /// [`Collective::all_reduce_sum`] for a few statistics in `f64`.
    ///
    /// # Errors
    /// See [`Collective::all_reduce_sum`].
    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()>;

    /// The sum over ranks of `data`'s shard of this rank ([`shard_range`]).
    ///
    /// # Errors
    /// See [`Collective::all_reduce_sum`].
    fn reduce_scatter_sum(&self, data: &[f32]) -> Result<Vec<f32>>;

    /// Every rank's shard, concatenated in rank order (`len` elements in all).
    ///
    /// # Errors
    /// See [`Collective::all_reduce_sum`]; a shard of the wrong length.
    fn all_gather(&self, shard: &[f32], len: usize) -> Result<Vec<f32>>;

    /// `root`'s `data` on every rank.
    ///
    /// # Errors
    /// See [`Collective::all_reduce_sum`].
    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<()>;

    /// Returns once every rank has called it.
    ///
    /// # Errors
    /// A rank that does not arrive in time.
    fn barrier(&self) -> Result<()>;

    /// What carries the exchanges (for logs): `host` unless said otherwise.
    fn transport(&self) -> String {
        String::from("host")
    }
}

/// The elements of a flat buffer of `len` that rank `rank` of `world` holds:
/// contiguous shards of `len.div_ceil(world)`, the last ones shorter or empty.
pub fn shard_range(len: usize, world: usize, rank: usize) -> Range<usize> {
    let chunk = len.div_ceil(world.max(1));
    let start = (rank * chunk).min(len);
    start..(start + chunk).min(len)
}

/// One rank alone: every operation is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter_sum(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }
    fn all_gather(&self, shard: &[f32], _: usize) -> Result<Vec<f32>> {
        Ok(shard.to_vec())
    }
    fn broadcast(&self, _: &mut [f32], _: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_buffer_in_order() {
        for len in [0, 1, 5, 7, 12] {
            for world in 1..=4 {
                let ranges: Vec<_> = (0..world).map(|r| shard_range(len, world, r)).collect();
                let covered: Vec<usize> = ranges.iter().flat_map(|r| r.clone()).collect();
                assert_eq!(covered, (0..len).collect::<Vec<_>>(), "{len} over {world}");
            }
        }
        assert_eq!(shard_range(7, 3, 2), 6..7);
        assert_eq!(shard_range(2, 4, 3), 2..2);
    }
}
