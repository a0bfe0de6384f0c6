//! ZeRO stages 1 and 2 (Rajbhandari et al., 2020; DeepSpeed's `zero_optimization`):
//! the optimizer state partitioned over the data-parallel ranks.
//!
//! Every trainable parameter, in the model's visiting order (which every rank shares),
//! is one element range of a flat buffer; rank r of N owns the contiguous shard
//! [`shard_range`]`(len, N, r)` of it, and keeps only that shard's f32 master weights and
//! AdamW moments (12 bytes a parameter over N, instead of 12 on every rank; the model
//! itself keeps its trainable weights in the dtype it computes in).
//!
//! - **Stage 1**: each rank accumulates its full gradients as plain data parallel does;
//!   at the step they are summed over the ranks and each rank keeps its shard.
//! - **Stage 2**: after every micro-batch the gradients are reduce-scattered, and each
//!   rank accumulates only its shard (f32).
//!
//! At the step each rank clips by the global norm (its shard's sum of squares, summed
//! over the ranks), takes AdamW's step on its shard with exactly the arithmetic of Burn's
//! `AdamW` (so a rank's update is that of one device, element for element), and the
//! updated masters are all-gathered into every rank's model. A parameter that no rank
//! has a gradient for keeps its value and its step count, as on one device.
//!
//! With `offload_optimizer` the shard lives in host memory (DeepSpeed's
//! `offload_optimizer.device = "cpu"`); otherwise on the model's device.
//!
//! A checkpoint holds each rank's shard (`zero_optimizer_rank_<r>_of_<N>.safetensors`:
//! `master`, `exp_avg`, `exp_avg_sq`) and `zero_optimizer.json` (the stage, the ranks,
//! and each parameter's id, size and AdamW steps). A run resumed at another number of
//! ranks reads the old shards its new shard overlaps: the flat buffer does not depend
//! on the number of ranks.

use std::ops::Range;
use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use xtuner_model::checkpoint::{Checkpoint, SaveDtype, save_safetensors};
use xtuner_model::nn::precision::host_vec;

use crate::collective::{Collective, grads, shard_range};
use crate::config::{OptimizerConfig, ZeroConfig};
use crate::{Error, Result};

/// The file, in a checkpoint, that describes its ZeRO shards.
pub const ZERO_STATE: &str = "zero_optimizer.json";

/// The file stem of rank `rank`'s shard of a run of `world` ranks.
fn shard_stem(rank: usize, world: usize) -> String {
    format!("zero_optimizer_rank_{rank:05}_of_{world:05}")
}

/// The file of rank `rank`'s shard of a run of `world` ranks.
pub fn shard_file(rank: usize, world: usize) -> String {
    format!("{}.safetensors", shard_stem(rank, world))
}

/// AdamW's settings, in the types Burn's `AdamW` keeps them in (the arithmetic below
/// must be its arithmetic).
#[derive(Debug, Clone, Copy)]
struct AdamW {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
}

/// One trainable parameter of the flat buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Slot {
    /// The parameter's (stable) id.
    id: u64,
    /// Its elements.
    numel: usize,
    /// AdamW steps it has taken.
    steps: usize,
}

/// What `zero_optimizer.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ZeroState {
    stage: u8,
    world_size: usize,
    params: Vec<Slot>,
}

/// This rank's shard of the f32 masters and AdamW's moments, on the backend `S`.
struct State<S: Backend> {
    master: Tensor<S, 1>,
    exp_avg: Tensor<S, 1>,
    exp_avg_sq: Tensor<S, 1>,
}

impl<S: Backend> State<S> {
    fn new(master: Vec<f32>, exp_avg: Vec<f32>, exp_avg_sq: Vec<f32>, device: &S::Device) -> Self {
        let tensor = |values: Vec<f32>| {
            let n = values.len();
            Tensor::from_data(TensorData::new(values, [n]), (device, DType::F32))
        };
        Self {
            master: tensor(master),
            exp_avg: tensor(exp_avg),
            exp_avg_sq: tensor(exp_avg_sq),
        }
    }

    /// AdamW's step on elements `range` of the shard, whose parameters have taken
    /// `time` steps (this one included): Burn's `AdamW::step`, operation for operation.
    fn step(&mut self, range: Range<usize>, grad: &[f32], time: i32, lr: f64, adam: AdamW) {
        let device = self.master.device();
        let whole = range.start == 0 && range.end == self.master.dims()[0];
        let part = |t: &Tensor<S, 1>| {
            if whole {
                t.clone()
            } else {
                t.clone().slice([range.clone()])
            }
        };
        let g = Tensor::<S, 1>::from_data(
            TensorData::new(grad.to_vec(), [grad.len()]),
            (&device, DType::F32),
        );
        let m = part(&self.exp_avg)
            .mul_scalar(adam.beta_1)
            .add(g.clone().mul_scalar(1.0 - adam.beta_1));
        let v = part(&self.exp_avg_sq)
            .mul_scalar(adam.beta_2)
            .add(g.square().mul_scalar(1.0 - adam.beta_2));
        let m_hat = m.clone().div_scalar(1f32 - adam.beta_1.powi(time));
        let v_hat = v.clone().div_scalar(1f32 - adam.beta_2.powi(time));
        let delta = m_hat.div(v_hat.sqrt().add_scalar(adam.epsilon));
        let decay = lr * f64::from(adam.weight_decay);
        let p = part(&self.master);
        let p = if decay == 0.0 {
            p
        } else {
            p.mul_scalar(1.0 - decay)
        };
        let p = p - delta.mul_scalar(lr);
        if whole {
            (self.master, self.exp_avg, self.exp_avg_sq) = (p, m, v);
        } else {
            let assign = |t: &mut Tensor<S, 1>, values: Tensor<S, 1>| {
                *t = t.clone().slice_assign([range.clone()], values);
            };
            assign(&mut self.master, p);
            assign(&mut self.exp_avg, m);
            assign(&mut self.exp_avg_sq, v);
        }
    }

    fn host(&self) -> Result<[Vec<f32>; 3]> {
        let read = |t: &Tensor<S, 1>| host_vec::<f32>(t.clone().into_data()).map_err(Error::from);
        Ok([
            read(&self.master)?,
            read(&self.exp_avg)?,
            read(&self.exp_avg_sq)?,
        ])
    }

    /// The master shard alone on the host (what a step all-gathers).
    fn master_host(&self) -> Result<Vec<f32>> {
        Ok(host_vec::<f32>(self.master.clone().into_data())?)
    }
}

/// Where the shard lives.
enum Placement<S: Backend> {
    /// On the model's device.
    Device(State<S>),
    /// In host memory (offload).
    Host(Box<State<NdArray<f32>>>),
}

/// The optimizer of a ZeRO run: this rank's shard of the masters and moments, and the
/// gradient shard of the step being accumulated.
pub struct ZeroOptimizer<B: AutodiffBackend> {
    stage: u8,
    adam: AdamW,
    rank: usize,
    world: usize,
    params: Vec<Slot>,
    len: usize,
    range: Range<usize>,
    state: Placement<B::InnerBackend>,
    /// The summed gradients of this rank's shard, once reduced.
    grad: Option<Vec<f32>>,
    /// Per parameter: whether any rank had a gradient for it this step.
    present: Vec<f64>,
}

impl<B: AutodiffBackend> ZeroOptimizer<B> {
    /// The shard of `model`'s trainable parameters this rank of `collective` owns, its
    /// masters taken from the model and its moments zero (a fresh run), or read from
    /// checkpoint `resume` (which any number of ranks may have written).
    ///
    /// # Errors
    /// A checkpoint without ZeRO state, of another model, or missing a shard.
    pub fn new<M: AutodiffModule<B>>(
        model: &M,
        zero: ZeroConfig,
        optimizer: &OptimizerConfig,
        collective: &dyn Collective,
        resume: Option<&Path>,
        device: &B::Device,
    ) -> Result<Self> {
        let (rank, world) = (collective.rank(), collective.world_size());
        let (mut params, values) = Values::<B>::of(model)?;
        let len = values.len();
        let range = shard_range(len, world, rank);
        let n = range.len();
        let (master, exp_avg, exp_avg_sq) = match resume {
            None => (values[range.clone()].to_vec(), vec![0.0; n], vec![0.0; n]),
            Some(dir) => {
                let (saved, [master, exp_avg, exp_avg_sq]) =
                    read_shards(dir, &params, range.clone())?;
                params = saved;
                (master, exp_avg, exp_avg_sq)
            }
        };
        let state = if zero.offload_optimizer {
            Placement::Host(Box::new(State::new(
                master,
                exp_avg,
                exp_avg_sq,
                &Default::default(),
            )))
        } else {
            Placement::Device(State::new(master, exp_avg, exp_avg_sq, device))
        };
        tracing::info!(
            stage = zero.stage,
            rank,
            world,
            shard = n,
            total = len,
            offload = zero.offload_optimizer,
            "ZeRO optimizer shard"
        );
        Ok(Self {
            stage: zero.stage,
            adam: AdamW {
                beta_1: optimizer.betas[0] as f32,
                beta_2: optimizer.betas[1] as f32,
                epsilon: optimizer.eps as f32,
                weight_decay: optimizer.weight_decay as f32,
            },
            rank,
            world,
            present: vec![0.0; params.len()],
            params,
            len,
            range,
            state,
            grad: None,
        })
    }

    /// Whether gradients are reduced after every micro-batch (stage 2) rather than
    /// accumulated whole and reduced at the step (stage 1).
    pub fn reduces_each_micro_batch(&self) -> bool {
        self.stage >= 2
    }

    /// Adds `grads` (this rank's, of one micro-batch with stage 2, or accumulated over
    /// the step with stage 1) summed over the ranks to this rank's gradient shard.
    ///
    /// # Errors
    /// A collective that fails; gradients that cannot be read.
    pub fn reduce<M: AutodiffModule<B>>(
        &mut self,
        model: &M,
        grads: &GradientsParams,
        collective: &dyn Collective,
    ) -> Result<()> {
        let (bucket, present) = grads::flatten(model, grads)?;
        let mut present: Vec<f64> = present.iter().map(|&p| f64::from(u8::from(p))).collect();
        collective.all_reduce_sum_f64(&mut present)?;
        let shard = if self.stage >= 2 {
            collective.reduce_scatter_sum(&bucket)?
        } else {
            let mut bucket = bucket;
            collective.all_reduce_sum(&mut bucket)?;
            bucket[self.range.clone()].to_vec()
        };
        for (acc, p) in self.present.iter_mut().zip(&present) {
            *acc += p;
        }
        match &mut self.grad {
            Some(acc) => acc.iter_mut().zip(&shard).for_each(|(a, g)| *a += g),
            None => self.grad = Some(shard),
        }
        Ok(())
    }

    /// The step: global-norm clipping of the reduced gradients (PyTorch's
    /// `clip_grad_norm_`), AdamW at `lr` on this rank's shard, and the updated masters
    /// all-gathered into `model`. Returns the model and the norm before clipping.
    ///
    /// # Errors
    /// A collective that fails.
    pub fn step<M: AutodiffModule<B>>(
        &mut self,
        model: M,
        lr: f64,
        max_norm: f64,
        collective: &dyn Collective,
    ) -> Result<(M, f64)> {
        let mut grad = self
            .grad
            .take()
            .unwrap_or_else(|| vec![0.0; self.range.len()]);
        let present = std::mem::replace(&mut self.present, vec![0.0; self.params.len()]);
        let mut sum_squares = [grad
            .iter()
            .map(|&g| f64::from(g) * f64::from(g))
            .sum::<f64>()];
        collective.all_reduce_sum_f64(&mut sum_squares)?;
        let norm = sum_squares[0].sqrt();
        let factor = max_norm / (norm + 1e-6);
        if factor < 1.0 {
            let factor = factor as f32;
            grad.iter_mut().for_each(|g| *g *= factor);
        }
        // Runs of neighbouring parameters with a gradient and the same step count.
        let mut runs: Vec<(Range<usize>, usize)> = Vec::new();
        let mut offset = 0;
        for (slot, present) in self.params.iter_mut().zip(&present) {
            let (start, end) = (offset, offset + slot.numel);
            offset = end;
            if *present <= 0.0 {
                continue;
            }
            slot.steps += 1;
            let (a, b) = (start.max(self.range.start), end.min(self.range.end));
            if a >= b {
                continue;
            }
            let local = a - self.range.start..b - self.range.start;
            match runs.last_mut() {
                Some((run, steps)) if run.end == local.start && *steps == slot.steps => {
                    run.end = local.end;
                }
                _ => runs.push((local, slot.steps)),
            }
        }
        for (run, steps) in runs {
            let g = &grad[run.clone()];
            let time = i32::try_from(steps).unwrap_or(i32::MAX);
            match &mut self.state {
                Placement::Device(s) => s.step(run, g, time, lr, self.adam),
                Placement::Host(s) => s.step(run, g, time, lr, self.adam),
            }
        }
        let master = match &self.state {
            Placement::Device(s) => s.master_host()?,
            Placement::Host(s) => s.master_host()?,
        };
        let values = collective.all_gather(&master, self.len)?;
        Ok((assign(model, &values), norm))
    }

    fn host(&self) -> Result<[Vec<f32>; 3]> {
        match &self.state {
            Placement::Device(s) => s.host(),
            Placement::Host(s) => s.host(),
        }
    }

    /// Writes this rank's shard into `dir` (every rank, each its own file, atomically),
    /// and on rank 0 the description of them all.
    ///
    /// # Errors
    /// A file that cannot be written, naming it.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let [master, exp_avg, exp_avg_sq] = self.host()?;
        let n = master.len();
        let tensors = vec![
            ("master".to_string(), TensorData::new(master, [n])),
            ("exp_avg".to_string(), TensorData::new(exp_avg, [n])),
            ("exp_avg_sq".to_string(), TensorData::new(exp_avg_sq, [n])),
        ];
        save_safetensors(
            dir,
            &shard_stem(self.rank, self.world),
            tensors,
            SaveDtype::F32,
            None,
        )?;
        if self.rank == 0 {
            let state = ZeroState {
                stage: self.stage,
                world_size: self.world,
                params: self.params.clone(),
            };
            let path = dir.join(ZERO_STATE);
            let json = serde_json::to_vec_pretty(&state).map_err(|e| Error::Serialize {
                path: path.clone(),
                message: e.to_string(),
            })?;
            std::fs::write(&path, json).map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }
}

/// Whether checkpoint `dir` holds ZeRO shards.
pub fn has_zero_state(dir: &Path) -> bool {
    dir.join(ZERO_STATE).is_file()
}

/// The elements `range` of the masters and moments saved in checkpoint `dir` (by
/// however many ranks), and the parameters' saved step counts, which must be `params`
/// (ids and sizes).
fn read_shards(
    dir: &Path,
    params: &[Slot],
    range: Range<usize>,
) -> Result<(Vec<Slot>, [Vec<f32>; 3])> {
    let (path, saved) = read_state(dir)?;
    let same = saved.params.len() == params.len()
        && saved
            .params
            .iter()
            .zip(params)
            .all(|(s, p)| s.id == p.id && s.numel == p.numel);
    if !same {
        return Err(Error::Checkpoint {
            path,
            message: "its parameters are not this model's trainable parameters".into(),
        });
    }
    let values = read_range(dir, &saved, range)?;
    Ok((saved.params, values))
}

/// `zero_optimizer.json` of checkpoint `dir`, and its path.
fn read_state(dir: &Path) -> Result<(PathBuf, ZeroState)> {
    let path = dir.join(ZERO_STATE);
    let text = std::fs::read_to_string(&path).map_err(|_| Error::Checkpoint {
        path: path.clone(),
        message: "missing: this checkpoint was written without ZeRO; resume it without --deepspeed"
            .into(),
    })?;
    let saved: ZeroState = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok((path, saved))
}

/// The elements `range` of the flat masters and moments that `saved`'s shards in `dir`
/// hold, read from the shards that overlap it.
fn read_range(dir: &Path, saved: &ZeroState, range: Range<usize>) -> Result<[Vec<f32>; 3]> {
    let len: usize = saved.params.iter().map(|p| p.numel).sum();
    let mut out: [Vec<f32>; 3] = Default::default();
    for old in 0..saved.world_size.max(1) {
        let theirs = shard_range(len, saved.world_size, old);
        let (a, b) = (theirs.start.max(range.start), theirs.end.min(range.end));
        if a >= b {
            continue;
        }
        let file: PathBuf = dir.join(shard_file(old, saved.world_size));
        let ckpt = Checkpoint::open(&file)?;
        for (key, values) in ["master", "exp_avg", "exp_avg_sq"]
            .iter()
            .zip(out.iter_mut())
        {
            let all: Vec<f32> = host_vec(ckpt.float_data(key)?)?;
            if all.len() != theirs.len() {
                return Err(Error::Checkpoint {
                    path: file.clone(),
                    message: format!(
                        "`{key}` holds {} elements, its shard {}",
                        all.len(),
                        theirs.len()
                    ),
                });
            }
            values.extend_from_slice(&all[a - theirs.start..b - theirs.start]);
        }
    }
    Ok(out)
}

/// Collects the trainable parameters' ids, sizes and values, in visiting order.
struct Values<B: Backend> {
    slots: Vec<Slot>,
    values: Vec<f32>,
    error: Option<Error>,
    _backend: std::marker::PhantomData<B>,
}

impl<B: Backend> Values<B> {
    fn of<M: Module<B>>(model: &M) -> Result<(Vec<Slot>, Vec<f32>)> {
        let mut values = Self {
            slots: Vec::new(),
            values: Vec::new(),
            error: None,
            _backend: std::marker::PhantomData,
        };
        model.visit(&mut values);
        match values.error {
            Some(e) => Err(e),
            None => Ok((values.slots, values.values)),
        }
    }
}

impl<B: Backend> ModuleVisitor<B> for Values<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !param.is_require_grad() || self.error.is_some() {
            return;
        }
        match host_vec::<f32>(param.val().into_data()) {
            Ok(values) => {
                self.slots.push(Slot {
                    id: param_id(param.id),
                    numel: values.len(),
                    steps: 0,
                });
                self.values.extend(values);
            }
            Err(e) => self.error = Some(e.into()),
        }
    }
}

/// A parameter id as a number (ids are the hash of their module path, see
/// `run::resume::StableIds`).
fn param_id(id: ParamId) -> u64 {
    id.val()
}

/// `model` (as a checkpoint's weights restored it) with its trainable parameters set to
/// the f32 masters of the checkpoint's ZeRO shards, where it has them: what DeepSpeed's
/// `zero_to_fp32` recovers, rather than the weights in the dtype the model trained in.
/// The model's parameter ids must be the run's (`run::StableIds`).
///
/// # Errors
/// Shards that are not of this model's trainable parameters, or missing.
pub fn masters_from<B: Backend, M: Module<B>>(model: M, dir: &Path) -> Result<M> {
    if !has_zero_state(dir) {
        return Ok(model);
    }
    // A model restored for export does not mark what trained (that lives in autodiff's
    // tensors): the saved ids name the parameters.
    let (path, saved) = read_state(dir)?;
    let len: usize = saved.params.iter().map(|p| p.numel).sum();
    let [master, ..] = read_range(dir, &saved, 0..len)?;
    let mut offsets = std::collections::HashMap::new();
    let mut offset = 0;
    for slot in &saved.params {
        offsets.insert(slot.id, (offset, slot.numel));
        offset += slot.numel;
    }
    struct ById<'a> {
        offsets: &'a std::collections::HashMap<u64, (usize, usize)>,
        master: &'a [f32],
        found: usize,
        wrong_size: Option<u64>,
    }
    impl<B: Backend> ModuleMapper<B> for ById<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let Some(&(offset, numel)) = self.offsets.get(&param_id(param.id)) else {
                return param;
            };
            let (id, tensor, mapper) = param.consume();
            let shape = tensor.shape();
            if shape.num_elements() != numel {
                self.wrong_size.get_or_insert(id.val());
                return Param::from_mapped_value(id, tensor, mapper);
            }
            self.found += 1;
            let values = self.master[offset..offset + numel].to_vec();
            let updated = Tensor::<B, D>::from_data(
                TensorData::new(values, shape),
                (&tensor.device(), tensor.dtype()),
            );
            Param::from_mapped_value(id, updated, mapper)
        }
    }
    let mut by_id = ById {
        offsets: &offsets,
        master: &master,
        found: 0,
        wrong_size: None,
    };
    let model = model.map(&mut by_id);
    if by_id.found != saved.params.len() || by_id.wrong_size.is_some() {
        return Err(Error::Checkpoint {
            path,
            message: format!(
                "its parameters are not this model's: {} of {} found with their sizes",
                by_id.found,
                saved.params.len()
            ),
        });
    }
    Ok(model)
}

/// `model` with its trainable parameters set from the flat `values`, each in its own
/// dtype.
fn assign<B: Backend, M: Module<B>>(model: M, values: &[f32]) -> M {
    struct Assign<'a> {
        values: &'a [f32],
        offset: usize,
    }
    impl<B: Backend> ModuleMapper<B> for Assign<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            if !param.is_require_grad() {
                return param;
            }
            let (id, tensor, mapper) = param.consume();
            let shape = tensor.shape();
            let n = shape.num_elements();
            let values = self.values[self.offset..self.offset + n].to_vec();
            self.offset += n;
            let updated = Tensor::<B, D>::from_data(
                TensorData::new(values, shape),
                (&tensor.device(), tensor.dtype()),
            );
            Param::from_mapped_value(id, updated.require_grad(), mapper)
        }
    }
    model.map(&mut Assign { values, offset: 0 })
}

#[cfg(test)]
mod tests {
    use burn::backend::Autodiff;
    use burn::optim::GradientsAccumulator;

    use super::*;
    use crate::collective::local::Local;
    use crate::optim::adamw;
    use crate::step::optimizer_step;

    type A = Autodiff<NdArray<f32>>;

    #[derive(Module, Debug)]
    struct Three<B: Backend> {
        a: Param<Tensor<B, 2>>,
        b: Param<Tensor<B, 1>>,
        /// Only rank 1's micro-batches of even steps reach it.
        c: Param<Tensor<B, 1>>,
    }

    fn three() -> Three<A> {
        let device = Default::default();
        let param = |v: Vec<f32>, shape: Vec<usize>| TensorData::new(v, shape);
        Three {
            a: Param::from_data(
                param(vec![0.5, -1.0, 2.0, 0.25, -0.75, 1.5], vec![2, 3]),
                &device,
            ),
            b: Param::from_data(param(vec![1.0, -2.0, 0.5, 3.0, -0.5], vec![5]), &device),
            c: Param::from_data(param(vec![0.3, -0.2, 0.1, 0.7], vec![4]), &device),
        }
        .map(&mut crate::run::StableIds::new())
    }

    /// Micro-batch `k` of step `step` on rank `rank`: a loss of every parameter but `c`.
    fn grads(model: &Three<A>, rank: usize, step: usize) -> GradientsParams {
        let w = (rank + 1) as f64 * 0.7 + step as f64 * 0.3;
        let mut loss =
            model.a.val().powf_scalar(2.0).sum() * w + (model.b.val() * (w as f32)).sin().sum();
        if rank == 1 && step.is_multiple_of(2) {
            loss = loss + model.c.val().powf_scalar(3.0).sum();
        }
        GradientsParams::from_grads(loss.backward(), model)
    }

    fn values(model: &Three<A>) -> Vec<f32> {
        [
            model.a.val().into_data(),
            model.b.val().into_data(),
            model.c.val().into_data(),
        ]
        .into_iter()
        .flat_map(|d| d.to_vec::<f32>().unwrap())
        .collect()
    }

    fn optimizer_config(max_norm: f64) -> OptimizerConfig {
        OptimizerConfig {
            lr: 0.1,
            weight_decay: 0.05,
            max_norm,
            ..OptimizerConfig::default()
        }
    }

    /// One device accumulating `world` micro-batches a step, with Burn's AdamW.
    fn one_device(world: usize, steps: usize, max_norm: f64) -> (Vec<f32>, Vec<f64>) {
        let config = optimizer_config(max_norm);
        let mut model = three();
        let mut optimizer = adamw(&config).init::<A, Three<A>>();
        let mut norms = Vec::new();
        for step in 0..steps {
            let mut acc = GradientsAccumulator::<Three<A>>::new();
            for rank in 0..world {
                acc.accumulate(&model, grads(&model, rank, step));
            }
            let norm;
            (model, norm) = optimizer_step(model, &mut optimizer, acc.grads(), 0.1, max_norm);
            norms.push(norm);
        }
        (values(&model), norms)
    }

    /// A rank's final values, its norms, and its shard of the masters and moments.
    type RankEnd = (Vec<f32>, Vec<f64>, [Vec<f32>; 3]);

    /// `world` ranks with ZeRO taking `global` micro-batches a step between them (rank r
    /// those of ranks r, r + world, ... of `grads`): steps `steps` (resuming from
    /// `resume`, saving into `save` at the end); each rank's final values, norms and
    /// its shard of the masters and moments.
    fn ranks(
        world: usize,
        global: usize,
        zero: ZeroConfig,
        steps: std::ops::Range<usize>,
        max_norm: f64,
        resume: Option<&Path>,
        save: Option<&Path>,
    ) -> Vec<RankEnd> {
        let config = optimizer_config(max_norm);
        std::thread::scope(|s| {
            let handles: Vec<_> = Local::group(world)
                .into_iter()
                .map(|c| {
                    let (config, steps) = (config.clone(), steps.clone());
                    s.spawn(move || {
                        let device = Default::default();
                        let mut model = three();
                        if let Some(dir) = resume {
                            let saved = std::fs::read(dir.join("values")).unwrap();
                            let v: Vec<f32> = serde_json::from_slice(&saved).unwrap();
                            model = assign(model, &v);
                        }
                        let mut opt =
                            ZeroOptimizer::<A>::new(&model, zero, &config, &c, resume, &device)
                                .unwrap();
                        let mut norms = Vec::new();
                        for step in steps {
                            let mut acc = GradientsAccumulator::<Three<A>>::new();
                            for k in 0..global.div_ceil(world) {
                                let v = c.rank() + k * world;
                                let g = if v < global {
                                    grads(&model, v, step)
                                } else {
                                    GradientsParams::new()
                                };
                                if opt.reduces_each_micro_batch() {
                                    opt.reduce(&model, &g, &c).unwrap();
                                } else {
                                    acc.accumulate(&model, g);
                                }
                            }
                            if !opt.reduces_each_micro_batch() {
                                opt.reduce(&model, &acc.grads(), &c).unwrap();
                            }
                            let norm;
                            (model, norm) = opt.step(model, 0.1, max_norm, &c).unwrap();
                            norms.push(norm);
                        }
                        if let Some(dir) = save {
                            opt.save(dir).unwrap();
                            c.barrier().unwrap();
                            if c.rank() == 0 {
                                let v = serde_json::to_vec(&values(&model)).unwrap();
                                std::fs::write(dir.join("values"), v).unwrap();
                            }
                        }
                        (values(&model), norms, opt.host().unwrap())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn stages() -> Vec<ZeroConfig> {
        [(1, false), (2, false), (2, true), (1, true)]
            .map(|(stage, offload_optimizer)| ZeroConfig {
                stage,
                offload_optimizer,
            })
            .to_vec()
    }

    /// Without clipping every rank ends on one device's weights bit for bit (the same
    /// AdamW arithmetic, gradients summed in the same order), including a parameter that
    /// has a gradient only every other step; with clipping the norm is summed in
    /// another order, so to float precision.
    #[test]
    fn sharded_adamw_steps_as_one_device() {
        for world in [1, 2, 3] {
            for zero in stages() {
                let (want, want_norms) = one_device(world, 4, 1e9);
                for (got, norms, _) in ranks(world, world, zero, 0..4, 1e9, None, None) {
                    assert_eq!(got, want, "{world} ranks, {zero:?}");
                    for (n, w) in norms.iter().zip(&want_norms) {
                        assert!((n - w).abs() <= 1e-6 * w, "{n} vs {w}");
                    }
                }
                let (want, want_norms) = one_device(world, 4, 0.5);
                assert!(want_norms.iter().all(|&n| n > 0.5), "clipping is exercised");
                for (got, norms, _) in ranks(world, world, zero, 0..4, 0.5, None, None) {
                    for (g, w) in got.iter().zip(&want) {
                        let tolerance = 1e-6 * w.abs().max(1.0);
                        assert!((g - w).abs() <= tolerance, "{got:?} vs {want:?}");
                    }
                    for (n, w) in norms.iter().zip(&want_norms) {
                        assert!((n - w).abs() <= 1e-6 * w, "{n} vs {w}");
                    }
                }
            }
        }
    }

    /// Shards written by two ranks come back on one, two and three ranks, re-sharded
    /// (the shards, in rank order, are the same buffers), and each run ends on the
    /// weights of one device that never stopped.
    #[test]
    fn shards_resume_at_another_number_of_ranks() {
        for zero in stages() {
            let (want, _) = one_device(2, 5, 1e9);
            let dir = tempfile::tempdir().unwrap();
            let saved = ranks(2, 2, zero, 0..2, 1e9, None, Some(dir.path()));
            assert!(has_zero_state(dir.path()));
            let joined = |shards: &[RankEnd]| -> Vec<Vec<f32>> {
                (0..3)
                    .map(|i| shards.iter().flat_map(|s| s.2[i].clone()).collect())
                    .collect()
            };
            for world in [1, 2, 3] {
                let loaded = ranks(world, 2, zero, 2..2, 1e9, Some(dir.path()), None);
                assert_eq!(joined(&loaded), joined(&saved), "{world} ranks, {zero:?}");
                for (got, _, _) in ranks(world, 2, zero, 2..5, 1e9, Some(dir.path()), None) {
                    assert_eq!(got, want, "{world} ranks, {zero:?}");
                }
            }
        }
        // `convert` takes the masters of the shards over the weights it restored.
        let dir = tempfile::tempdir().unwrap();
        let saved = ranks(3, 3, stages()[1], 0..2, 1e9, None, Some(dir.path()));
        let restored = masters_from(three().valid(), dir.path()).unwrap();
        let got: Vec<f32> = [restored.a.val().into_data(), restored.b.val().into_data()]
            .into_iter()
            .chain([restored.c.val().into_data()])
            .flat_map(|d| d.to_vec::<f32>().unwrap())
            .collect();
        assert_eq!(got, saved[0].0);
        assert_ne!(got, values(&three()));

        let other = tempfile::tempdir().unwrap();
        let err = ZeroOptimizer::<A>::new(
            &three(),
            stages()[0],
            &optimizer_config(1.0),
            &crate::collective::Single,
            Some(other.path()),
            &Default::default(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("written without ZeRO"), "{err}");
    }
}
