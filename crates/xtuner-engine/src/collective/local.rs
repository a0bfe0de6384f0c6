//! The in-process collective: the ranks are threads of one process (the CPU backend's
//! data parallelism, and the tests'). Each operation is one exchange: every rank
//! deposits its contribution; the last to arrive publishes all of them, in rank order,
//! and each rank computes its result from that, so sums are taken in rank order on
//! every rank alike. A rank that does not arrive within the timeout, or that leaves the
//! group (its thread ended with an error), fails the others' operations with an error
//! naming it.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Collective, shard_range};
use crate::{Error, Result};

/// How long a rank waits for the others in one operation by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// One rank of an in-process group.
#[derive(Debug)]
pub struct Local {
    rank: usize,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<Exchange>,
    published: Condvar,
}

#[derive(Debug, Default)]
struct Exchange {
    /// Completed exchanges so far.
    generation: u64,
    /// This exchange's contributions, by rank.
    slots: Vec<Option<Contribution>>,
    /// The last completed exchange's contributions, in rank order.
    result: Arc<Vec<Contribution>>,
    /// Set when a rank gave up: every later operation fails at once.
    failed: Option<String>,
}

#[derive(Debug, Clone)]
enum Contribution {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Local {
    /// `world` ranks sharing one group, to be moved one per thread.
    pub fn group(world: usize) -> Vec<Local> {
        Self::group_with_timeout(world, DEFAULT_TIMEOUT)
    }

    /// [`Local::group`] with its own timeout per operation.
    pub fn group_with_timeout(world: usize, timeout: Duration) -> Vec<Local> {
        let shared = Arc::new(Shared {
            world,
            timeout,
            state: Mutex::new(Exchange {
                slots: vec![None; world],
                ..Exchange::default()
            }),
            published: Condvar::new(),
        });
        (0..world)
            .map(|rank| Local {
                rank,
                shared: Arc::clone(&shared),
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Exchange> {
        // A rank that panicked while holding the lock left consistent data behind
        // (slots are written whole), so its poison is not ours.
        self.shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Deposits `mine` and returns every rank's contribution, in rank order.
    fn exchange(&self, op: &str, mine: Contribution) -> Result<Arc<Vec<Contribution>>> {
        let shared = &self.shared;
        let mut state = self.lock();
        if let Some(message) = &state.failed {
            return Err(Error::Collective(message.clone()));
        }
        let generation = state.generation;
        state.slots[self.rank] = Some(mine);
        if state.slots.iter().all(Option::is_some) {
            let all: Vec<Contribution> = state.slots.iter_mut().filter_map(Option::take).collect();
            state.result = Arc::new(all);
            state.generation += 1;
            shared.published.notify_all();
            return Ok(Arc::clone(&state.result));
        }
        let deadline = Instant::now() + shared.timeout;
        while state.generation == generation {
            if let Some(message) = &state.failed {
                return Err(Error::Collective(message.clone()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let missing: Vec<String> = state
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.is_none())
                    .map(|(r, _)| r.to_string())
                    .collect();
                let message = format!(
                    "{op}: rank {} waited {:?} for rank(s) {} of {}",
                    self.rank,
                    shared.timeout,
                    missing.join(", "),
                    shared.world
                );
                state.failed = Some(message.clone());
                shared.published.notify_all();
                return Err(Error::Collective(message));
            }
            state = shared
                .published
                .wait_timeout(state, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        Ok(Arc::clone(&state.result))
    }

    /// Every rank's f32 bucket, checked to be `len` long.
    fn f32s(&self, op: &str, mine: &[f32], len: Option<usize>) -> Result<Vec<Vec<f32>>> {
        let all = self.exchange(op, Contribution::F32(mine.to_vec()))?;
        let mut out = Vec::with_capacity(all.len());
        for (rank, c) in all.iter().enumerate() {
            match c {
                Contribution::F32(v) if len.is_none_or(|n| v.len() == n) => out.push(v.clone()),
                _ => {
                    return Err(Error::Collective(format!(
                        "{op}: rank {rank} sent a bucket that does not match rank {}'s",
                        self.rank
                    )));
                }
            }
        }
        Ok(out)
    }
}

impl Drop for Local {
    /// Every rank does the same operations, so a rank that leaves while another still
    /// waits left early (with an error): the others stop instead of timing out.
    fn drop(&mut self) {
        let mut state = self.lock();
        if state.failed.is_none() {
            state.failed = Some(format!("rank {} left the group", self.rank));
        }
        self.shared.published.notify_all();
    }
}

/// Element-wise sum of equally long buckets, in their order.
fn sum_in_order<T: Copy + std::ops::AddAssign>(
    out: &mut [T],
    buckets: impl Iterator<Item = Vec<T>>,
) {
    let mut buckets = buckets;
    if let Some(first) = buckets.next() {
        out.copy_from_slice(&first);
    }
    for bucket in buckets {
        out.iter_mut().zip(bucket).for_each(|(o, x)| *o += x);
    }
}

impl Collective for Local {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
        let all = self.f32s("all_reduce", data, Some(data.len()))?;
        sum_in_order(data, all.into_iter());
        Ok(())
    }

    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()> {
        let all = self.exchange("all_reduce", Contribution::F64(data.to_vec()))?;
        let mut buckets = Vec::with_capacity(all.len());
        for (rank, c) in all.iter().enumerate() {
            match c {
                Contribution::F64(v) if v.len() == data.len() => buckets.push(v.clone()),
                _ => {
                    return Err(Error::Collective(format!(
                        "all_reduce: rank {rank} sent statistics that do not match rank {}'s",
                        self.rank
                    )));
                }
            }
        }
        sum_in_order(data, buckets.into_iter());
        Ok(())
    }

    fn reduce_scatter_sum(&self, data: &[f32]) -> Result<Vec<f32>> {
        let range = shard_range(data.len(), self.shared.world, self.rank);
        let all = self.f32s("reduce_scatter", data, Some(data.len()))?;
        let mut shard = vec![0.0; range.len()];
        sum_in_order(
            &mut shard,
            all.into_iter().map(|b| b[range.clone()].to_vec()),
        );
        Ok(shard)
    }

    fn all_gather(&self, shard: &[f32], len: usize) -> Result<Vec<f32>> {
        let world = self.shared.world;
        if shard.len() != shard_range(len, world, self.rank).len() {
            return Err(Error::Collective(format!(
                "all_gather: rank {} holds {} elements of {len}, not its shard",
                self.rank,
                shard.len()
            )));
        }
        let all = self.f32s("all_gather", shard, None)?;
        let gathered: Vec<f32> = all.into_iter().flatten().collect();
        if gathered.len() != len {
            return Err(Error::Collective(format!(
                "all_gather: the shards make {} elements, not {len}",
                gathered.len()
            )));
        }
        Ok(gathered)
    }

    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<()> {
        let all = self.f32s("broadcast", data, Some(data.len()))?;
        match all.get(root) {
            Some(theirs) => {
                data.copy_from_slice(theirs);
                Ok(())
            }
            None => Err(Error::Collective(format!(
                "broadcast: root {root} is not a rank of {}",
                self.shared.world
            ))),
        }
    }

    fn barrier(&self) -> Result<()> {
        self.f32s("barrier", &[], Some(0)).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on every rank of a group of `world`, one thread each.
    fn on_ranks<T: Send>(world: usize, f: impl Fn(Local) -> T + Sync) -> Vec<T> {
        std::thread::scope(|s| {
            let handles: Vec<_> = Local::group(world)
                .into_iter()
                .map(|rank| s.spawn(|| f(rank)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Rank r's bucket: distinct values per rank and element.
    fn bucket(rank: usize, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (rank * 100 + i) as f32 * 0.5 - 3.0)
            .collect()
    }

    /// The naive reference: the sum over ranks, element by element, in rank order.
    fn naive_sum(world: usize, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (0..world).fold(0.0f32, |acc, r| acc + bucket(r, len)[i]))
            .collect()
    }

    #[test]
    fn each_collective_equals_the_naive_reference() {
        for world in 1..=4 {
            for len in [0, 1, 5, 7, 13] {
                let sum = naive_sum(world, len);
                let results = on_ranks(world, |c| {
                    let r = c.rank();
                    let mut all = bucket(r, len);
                    c.all_reduce_sum(&mut all).unwrap();
                    let shard = c.reduce_scatter_sum(&bucket(r, len)).unwrap();
                    let gathered = c.all_gather(&shard, len).unwrap();
                    let mut root = bucket(r, len);
                    c.broadcast(&mut root, world - 1).unwrap();
                    let mut stats = [r as f64, 1.0];
                    c.all_reduce_sum_f64(&mut stats).unwrap();
                    c.barrier().unwrap();
                    (r, all, shard, gathered, root, stats)
                });
                for (r, all, shard, gathered, root, stats) in results {
                    assert_eq!(all, sum, "all_reduce, world {world}, len {len}");
                    assert_eq!(shard, sum[shard_range(len, world, r)].to_vec());
                    assert_eq!(gathered, sum, "reduce_scatter + all_gather");
                    assert_eq!(root, bucket(world - 1, len), "broadcast");
                    let ranks = (0..world).sum::<usize>() as f64;
                    assert_eq!(stats, [ranks, world as f64]);
                }
            }
        }
    }

    #[test]
    fn a_missing_rank_times_out_naming_it() {
        let mut ranks = Local::group_with_timeout(3, Duration::from_millis(50));
        let _absent = ranks.pop();
        let errors = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .into_iter()
                .map(|c| s.spawn(move || c.barrier().unwrap_err().to_string()))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        assert!(
            errors.iter().any(|e| e.contains("rank(s) 2 of 3")),
            "{errors:?}"
        );
        assert!(errors.iter().all(|e| e.contains("barrier")), "{errors:?}");
    }

    #[test]
    fn a_rank_that_leaves_stops_the_others_at_once() {
        let mut ranks = Local::group(3);
        drop(ranks.pop());
        for rank in ranks {
            let err = rank.barrier().unwrap_err().to_string();
            assert!(err.contains("rank 2 left the group"), "{err}");
        }
    }

    #[test]
    fn mismatched_buckets_are_errors() {
        let errors = on_ranks(2, |c| {
            let mut data = vec![1.0; 2 + c.rank()];
            c.all_reduce_sum(&mut data).unwrap_err().to_string()
        });
        assert!(
            errors.iter().all(|e| e.contains("does not match")),
            "{errors:?}"
        );
    }
}
