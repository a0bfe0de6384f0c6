//! `xtuner collective-check` (hidden; `tools/gpu_check.sh` runs it): this process as
//! one rank of the group its launch variables describe (as `xtuner train` reads them;
//! none: one rank alone), every collective checked against the result the ranks' known
//! inputs must give, and the time of an all-reduce. Between GPUs the group is NCCL's.

use std::time::Instant;

use anyhow::{Result, bail};
use xtuner_engine::collective::shard_range;

use crate::backend::Device;
use crate::launch::{self, Launch, RankEnv};

/// Rank `rank`'s input: small multiples of 1/4, whose sums are exact in any order.
fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + rank * 13) % 17) as f32 * 0.25 - 2.0)
        .collect()
}

/// The element-wise sum of every rank's input.
fn summed(world: usize, len: usize) -> Vec<f32> {
    let mut sum = vec![0.0f32; len];
    for rank in 0..world {
        sum.iter_mut()
            .zip(input(rank, len))
            .for_each(|(s, x)| *s += x);
    }
    sum
}

/// The first element where `got` and `want` differ, as words.
fn compare(what: &str, got: &[f32], want: &[f32]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!(
            "{what}: {} elements, {} expected",
            got.len(),
            want.len()
        ));
    }
    got.iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .map(|i| format!("{what}: element {i} is {}, {} expected", got[i], want[i]))
}

/// `xtuner collective-check --device D --len N`.
///
/// # Errors
/// A launch that is not one rank of a group; a failed collective or a wrong result
/// (naming the operation, the rank and the element).
pub fn check(device: Device, len: usize) -> Result<()> {
    crate::backend::check(device)?;
    let rank_env = match launch::from_env(|k| std::env::var(k).ok(), device)? {
        Launch::Rank(r) => r,
        Launch::Single => RankEnv {
            rank: 0,
            world: 1,
            local_rank: std::env::var("LOCAL_RANK")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            addr: "127.0.0.1:0".into(),
        },
        _ => bail!(
            "collective-check runs as one rank of a group: set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (or none, for one rank)"
        ),
    };
    let group = launch::rank_group(&rank_env, device)?;
    let (rank, world) = (group.rank(), group.world_size());
    let lead = rank == 0;
    if lead {
        println!("{world} rank(s) through {}", group.transport());
    }
    let mut failures = Vec::new();
    let mut report = |what: &str, problem: Option<String>| {
        if let Some(problem) = problem {
            failures.push(format!("rank {rank}: {problem}"));
        } else if lead {
            println!("{what}: ok");
        }
    };

    let want = summed(world, len);
    let mut data = input(rank, len);
    group.all_reduce_sum(&mut data)?;
    report("all_reduce_sum", compare("all_reduce_sum", &data, &want));

    let mut stats = [rank as f64 + 0.5, 1.0, -(rank as f64)];
    group.all_reduce_sum_f64(&mut stats)?;
    let w = world as f64;
    let expected = [w * w / 2.0, w, -(w * (w - 1.0) / 2.0)];
    let problem = (stats != expected)
        .then(|| format!("all_reduce_sum_f64: {stats:?}, {expected:?} expected"));
    report("all_reduce_sum_f64", problem);

    let shard = group.reduce_scatter_sum(&input(rank, len))?;
    let range = shard_range(len, world, rank);
    report(
        "reduce_scatter_sum",
        compare("reduce_scatter_sum", &shard, &want[range.clone()]),
    );

    let whole = input(world, len);
    let gathered = group.all_gather(&whole[range], len)?;
    report("all_gather", compare("all_gather", &gathered, &whole));

    let root = world - 1;
    let mut data = input(rank, len);
    group.broadcast(&mut data, root)?;
    report("broadcast", compare("broadcast", &data, &input(root, len)));

    group.barrier()?;
    report("barrier", None);

    let mut data = input(rank, len);
    let repeats = 5;
    let started = Instant::now();
    for _ in 0..repeats {
        group.all_reduce_sum(&mut data)?;
    }
    let seconds = started.elapsed().as_secs_f64() / f64::from(repeats);
    if lead {
        let mb = (len * 4) as f64 / 1e6;
        println!(
            "all_reduce_sum of {mb:.1} MB: {:.2} ms ({:.2} GB/s of bucket)",
            seconds * 1e3,
            mb / 1e3 / seconds
        );
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(())
}
