//! How `xtuner train` is launched, from the environment as XTuner's users set it:
//!
//! - `NPROC_PER_NODE=N` (and `NNODES`, `NODE_RANK`, `ADDR`, `PORT`: XTuner's
//!   launcher variables): on one node with the CPU backend, N ranks as threads of this
//!   process; otherwise this process starts the node's N ranks as child processes of
//!   itself, each told its rank as torchrun would;
//! - `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` (torchrun, or the
//!   children above): this process is one rank, meeting the others over TCP;
//! - `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID` under `srun`, with `ADDR`/`PORT`
//!   or `MASTER_ADDR`/`MASTER_PORT`: the same.
//!
//! `XTUNER_DIST_TIMEOUT` (seconds, default 600) bounds the rendezvous and every
//! operation between ranks.

use std::time::Duration;

use anyhow::{Result, anyhow, bail};

use crate::backend::Device;

/// XTuner's default rendezvous port.
const DEFAULT_PORT: u16 = 29500;

/// What this process is in the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// One rank alone.
    Single,
    /// `n` ranks as threads of this process.
    Threads(usize),
    /// One rank of a group meeting over TCP.
    Rank(RankEnv),
    /// This node's launcher: starts its ranks as child processes.
    Spawn(SpawnEnv),
}

/// One rank's place in a multi-process group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnv {
    /// Global rank.
    pub rank: usize,
    /// Ranks in all.
    pub world: usize,
    /// Rank on this node (the GPU it uses).
    pub local_rank: usize,
    /// Rank 0's `host:port`.
    pub addr: String,
}

/// A node's launcher settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnEnv {
    /// Ranks on this node.
    pub nproc: usize,
    /// Nodes.
    pub nnodes: usize,
    /// This node.
    pub node_rank: usize,
    /// Rank 0's host.
    pub host: String,
    /// Rank 0's port.
    pub port: u16,
}

/// A variable read as a number, naming it when it is not one.
fn number<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    key: &str,
) -> Result<Option<T>> {
    get(key)
        .map(|v| {
            v.trim()
                .parse::<T>()
                .map_err(|_| anyhow!("{key} must be a number, got `{v}`"))
        })
        .transpose()
}

/// Reads the launch from environment variables (`get`), for a run on `device`.
///
/// # Errors
/// A variable that is not a number, a rank outside the group, or a multi-process group
/// without a rendezvous address.
pub fn from_env(get: impl Fn(&str) -> Option<String>, device: Device) -> Result<Launch> {
    let addr = |host_key: &str, port_key: &str| -> Result<Option<String>> {
        let port: Option<u16> = number(&get, port_key)?;
        Ok(get(host_key).map(|h| format!("{h}:{}", port.unwrap_or(DEFAULT_PORT))))
    };
    let rank_env = |rank: usize, world: usize, local_rank: usize, addr: Option<String>| {
        if world == 0 || rank >= world {
            bail!("rank {rank} is not one of {world} ranks");
        }
        if world == 1 {
            return Ok(Launch::Single);
        }
        let addr = addr.ok_or_else(|| {
            anyhow!("a group of {world} ranks needs rank 0's address: set MASTER_ADDR and MASTER_PORT (or ADDR and PORT)")
        })?;
        Ok(Launch::Rank(RankEnv {
            rank,
            world,
            local_rank,
            addr,
        }))
    };
    if let (Some(rank), Some(world)) = (number(&get, "RANK")?, number(&get, "WORLD_SIZE")?) {
        let local: Option<usize> = number(&get, "LOCAL_RANK")?;
        let addr = addr("MASTER_ADDR", "MASTER_PORT")?.or(addr("ADDR", "PORT")?);
        return rank_env(rank, world, local.unwrap_or(0), addr);
    }
    if let (Some(rank), Some(world)) =
        (number(&get, "SLURM_PROCID")?, number(&get, "SLURM_NTASKS")?)
    {
        let local: Option<usize> = number(&get, "SLURM_LOCALID")?;
        let addr = addr("ADDR", "PORT")?.or(addr("MASTER_ADDR", "MASTER_PORT")?);
        return rank_env(rank, world, local.unwrap_or(0), addr);
    }
    let nproc: usize = number(&get, "NPROC_PER_NODE")?.unwrap_or(1);
    let nnodes: usize = number(&get, "NNODES")?.unwrap_or(1);
    let node_rank: usize = number(&get, "NODE_RANK")?.unwrap_or(0);
    if nproc == 0 || nnodes == 0 {
        bail!("NPROC_PER_NODE and NNODES must be positive");
    }
    if node_rank >= nnodes {
        bail!("NODE_RANK {node_rank} is not one of {nnodes} nodes");
    }
    Ok(match (nproc * nnodes, nnodes, device) {
        (1, _, _) => Launch::Single,
        (n, 1, Device::Cpu) => Launch::Threads(n),
        _ => {
            if nnodes > 1 && get("ADDR").is_none() {
                bail!("a run on {nnodes} nodes needs rank 0's address: set ADDR (and PORT)");
            }
            Launch::Spawn(SpawnEnv {
                nproc,
                nnodes,
                node_rank,
                host: get("ADDR").unwrap_or_else(|| "127.0.0.1".into()),
                port: number(&get, "PORT")?.unwrap_or(DEFAULT_PORT),
            })
        }
    })
}

/// What a `--deepspeed` setting asks for: the ZeRO stage and whether the optimizer is
/// offloaded to host memory. XTuner's names (`deepspeed_zero1`, `deepspeed_zero2`,
/// `deepspeed_zero2_offload`, `deepspeed_zero3`, `deepspeed_zero3_offload`) or a
/// DeepSpeed JSON file's `zero_optimization.stage` and `offload_optimizer.device`.
///
/// # Errors
/// An unknown name, or a file that cannot be read or has no stage.
pub fn zero_setting(setting: &str) -> Result<(u64, bool)> {
    let name = setting.trim_end_matches(".json");
    let known = [
        ("deepspeed_zero1", 1, false),
        ("deepspeed_zero2", 2, false),
        ("deepspeed_zero2_offload", 2, true),
        ("deepspeed_zero3", 3, false),
        ("deepspeed_zero3_offload", 3, true),
    ];
    if let Some((_, stage, offload)) = known.iter().find(|(n, ..)| *n == name) {
        return Ok((*stage, *offload));
    }
    let path = std::path::Path::new(setting);
    if !path.is_file() {
        bail!(
            "--deepspeed `{setting}`: neither one of XTuner's settings ({}) nor a DeepSpeed JSON file",
            known.map(|(n, ..)| n).join(", ")
        );
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("--deepspeed {}: {e}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow!("--deepspeed {}: {e}", path.display()))?;
    let zero = &json["zero_optimization"];
    let stage = zero["stage"].as_u64().filter(|s| *s <= 3).ok_or_else(|| {
        anyhow!(
            "--deepspeed {}: no zero_optimization.stage (0-3)",
            path.display()
        )
    })?;
    let offload = zero["offload_optimizer"]["device"].as_str() == Some("cpu");
    Ok((stage, offload))
}

/// A `--deepspeed` setting as the config overrides it stands for (`zero.stage`,
/// `zero.offload_optimizer`), and a note for what it asks that is not built (ZeRO-3,
/// which runs as ZeRO-2: the same results, the parameters whole on every rank).
///
/// # Errors
/// See [`zero_setting`].
pub fn zero_overrides(setting: &str) -> Result<(Vec<String>, Option<String>)> {
    let (stage, offload) = zero_setting(setting)?;
    let note = (stage == 3).then(|| {
        format!(
            "note: --deepspeed {setting} asks for ZeRO-3, which also partitions the parameters and is not built: running ZeRO-2 (the same results; every rank holds the whole parameters)"
        )
    });
    let overrides = vec![
        format!("zero.stage={}", stage.min(2)),
        format!("zero.offload_optimizer={}", offload && stage > 0),
    ];
    Ok((overrides, note))
}

/// The group of a rank of a multi-process run: it meets the others over TCP at
/// `ADDR:PORT`; between GPUs the exchanges then go through NCCL
/// (`XTUNER_COLLECTIVE=tcp` keeps them on the host).
///
/// # Errors
/// A failed rendezvous, NCCL not found (naming where it was looked for), or an unknown
/// `XTUNER_COLLECTIVE`.
pub fn rank_group(
    rank: &RankEnv,
    device: Device,
) -> Result<Box<dyn xtuner_engine::collective::Collective>> {
    let timeout = timeout()?;
    let tcp =
        xtuner_engine::collective::tcp::Tcp::connect(rank.rank, rank.world, &rank.addr, timeout)?;
    let choice = std::env::var("XTUNER_COLLECTIVE").ok();
    match (choice.as_deref(), device) {
        (Some("tcp"), _) | (None | Some("nccl"), Device::Cpu) => Ok(Box::new(tcp)),
        #[cfg(feature = "cuda")]
        (None | Some("nccl"), Device::Cuda) => Ok(Box::new(
            xtuner_engine::collective::nccl::Nccl::new(Box::new(tcp), rank.local_rank, timeout)?,
        )),
        #[cfg(not(feature = "cuda"))]
        (None | Some("nccl"), Device::Cuda) => bail!("this build has no CUDA backend"),
        (Some(other), _) => bail!("XTUNER_COLLECTIVE must be `nccl` or `tcp`, got `{other}`"),
    }
}

/// How long ranks wait for each other: `XTUNER_DIST_TIMEOUT` seconds, 600 by default.
///
/// # Errors
/// A value that is not a number.
pub fn timeout() -> Result<Duration> {
    let seconds: Option<f64> = number(&|k: &str| std::env::var(k).ok(), "XTUNER_DIST_TIMEOUT")?;
    Ok(Duration::from_secs_f64(seconds.unwrap_or(600.0).max(0.001)))
}

/// Starts this node's ranks as child processes running the same command, each with
/// `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`, and waits for
/// them; when one fails, the others are stopped.
///
/// # Errors
/// A child that cannot start, or one that fails (named by its rank).
pub fn spawn(env: &SpawnEnv) -> Result<()> {
    let exe = std::env::current_exe()?;
    let world = env.nproc * env.nnodes;
    let mut children = Vec::with_capacity(env.nproc);
    for local in 0..env.nproc {
        let rank = env.node_rank * env.nproc + local;
        let child = std::process::Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("MASTER_ADDR", &env.host)
            .env("MASTER_PORT", env.port.to_string())
            .spawn()
            .map_err(|e| anyhow!("starting rank {rank}: {e}"))?;
        children.push((rank, child));
    }
    let mut failed = None;
    while !children.is_empty() {
        let mut still = Vec::with_capacity(children.len());
        for (rank, mut child) in children {
            match child.try_wait()? {
                Some(status) if !status.success() => {
                    failed.get_or_insert(format!("rank {rank} failed ({status})"));
                }
                Some(_) => {}
                None => still.push((rank, child)),
            }
        }
        if failed.is_some() {
            for (_, child) in &mut still {
                let _ = child.kill();
                let _ = child.wait();
            }
            still.clear();
        }
        children = still;
        std::thread::sleep(Duration::from_millis(100));
    }
    match failed {
        Some(message) => Err(anyhow!(message)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(vars: &[(&str, &str)], device: Device) -> Result<Launch> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        from_env(
            |key| vars.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()),
            device,
        )
    }

    #[test]
    fn the_environment_says_what_this_process_is() {
        assert_eq!(launch(&[], Device::Cpu).unwrap(), Launch::Single);
        assert_eq!(
            launch(&[("NPROC_PER_NODE", "3")], Device::Cpu).unwrap(),
            Launch::Threads(3)
        );
        assert_eq!(
            launch(&[("NPROC_PER_NODE", "2")], Device::Cuda).unwrap(),
            Launch::Spawn(SpawnEnv {
                nproc: 2,
                nnodes: 1,
                node_rank: 0,
                host: "127.0.0.1".into(),
                port: 29500
            })
        );
        let torchrun = [
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
            ("NPROC_PER_NODE", "2"),
        ];
        assert_eq!(
            launch(&torchrun, Device::Cpu).unwrap(),
            Launch::Rank(RankEnv {
                rank: 3,
                world: 4,
                local_rank: 1,
                addr: "node0:1234".into()
            })
        );
        let slurm = [("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2"), ("ADDR", "n0")];
        assert!(matches!(
            launch(&slurm, Device::Cpu).unwrap(),
            Launch::Rank(RankEnv { rank: 1, world: 2, ref addr, .. }) if addr == "n0:29500"
        ));
    }

    #[test]
    fn deepspeed_settings_name_their_stage() {
        assert_eq!(zero_setting("deepspeed_zero2").unwrap(), (2, false));
        assert_eq!(zero_setting("deepspeed_zero2_offload").unwrap(), (2, true));
        assert_eq!(zero_setting("deepspeed_zero3_offload").unwrap(), (3, true));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ds.json");
        std::fs::write(&file, r#"{"zero_optimization": {"stage": 1}}"#).unwrap();
        assert_eq!(zero_setting(file.to_str().unwrap()).unwrap(), (1, false));
        std::fs::write(
            &file,
            r#"{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}"#,
        )
        .unwrap();
        assert_eq!(zero_setting(file.to_str().unwrap()).unwrap(), (2, true));
        let (overrides, note) = zero_overrides("deepspeed_zero3").unwrap();
        assert_eq!(overrides, ["zero.stage=2", "zero.offload_optimizer=false"]);
        assert!(note.unwrap().contains("running ZeRO-2"));
        assert!(
            zero_setting("zero9")
                .unwrap_err()
                .to_string()
                .contains("deepspeed_zero1")
        );
    }

    #[test]
    fn bad_launch_settings_are_named() {
        let err = |vars: &[(&str, &str)]| launch(vars, Device::Cpu).unwrap_err().to_string();
        assert!(err(&[("NPROC_PER_NODE", "two")]).contains("NPROC_PER_NODE"));
        assert!(err(&[("RANK", "2"), ("WORLD_SIZE", "2")]).contains("not one of 2"));
        assert!(err(&[("RANK", "1"), ("WORLD_SIZE", "2")]).contains("MASTER_ADDR"));
        assert!(err(&[("NNODES", "2"), ("NPROC_PER_NODE", "1")]).contains("ADDR"));
        assert!(err(&[("NNODES", "2"), ("NODE_RANK", "2"), ("ADDR", "h")]).contains("NODE_RANK"));
    }
}
