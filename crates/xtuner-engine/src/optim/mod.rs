//! Optimizer pieces that Burn does not provide as XTuner uses them: gradient clipping
//! by the global L2 norm over all trainable parameters (PyTorch's `clip_grad_norm_`;
//! Burn's clipping works per tensor), AdamW with PyTorch's settings, and f32 master
//! weights: a bf16 run keeps its trainable parameters, their gradients and AdamW's
//! moments in f32 (as PyTorch's autocast and DeepSpeed's bf16 mode do), while the
//! layers compute in bf16 ([`xtuner_model::nn::precision`]).

mod adamw;
mod cpu;
pub mod zero;

pub use adamw::{AdamW, adamw};

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::optim::record::{AdaptorRecord, AdaptorRecordV1};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use xtuner_model::checkpoint::Checkpoint;
use xtuner_model::nn::moved;
use xtuner_model::nn::precision::{in_dtype, scalar};

/// The dtype trainable parameters and the optimizer's state are kept in.
pub const MASTER_DTYPE: DType = DType::F32;

/// The model with every trainable parameter stored in `dtype` (frozen ones, such as a
/// LoRA run's bf16 base, stay as they are). A no-op where they already are, as on the
/// CPU.
pub fn master_weights<B: AutodiffBackend, M: AutodiffModule<B>>(model: M, dtype: DType) -> M {
    struct Widen(DType);
    impl<B: AutodiffBackend> ModuleMapper<B> for Widen {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            if !param.is_require_grad() || param.val().dtype() == self.0 {
                return param;
            }
            let (id, tensor, mapper) = param.consume();
            Param::from_mapped_value(id, tensor.cast(self.0).detach().require_grad(), mapper)
        }
    }
    model.map(&mut Widen(dtype))
}

/// A function over AdamW's moments, one parameter's at a time, for every rank.
trait MapMoment<B: Backend> {
    /// The moment stored as `key` (`{param id}.moment_1` or `.moment_2`), replaced.
    fn map<const D: usize>(&mut self, key: String, moment: Tensor<B, D>) -> Tensor<B, D>;
}

/// Applies `f` to the moments of every parameter's AdamW state (both, and AMSGrad's
/// running maximum where one is kept).
fn map_moments<B, R>(record: R, f: &mut impl MapMoment<B::InnerBackend>) -> R
where
    B: AutodiffBackend,
    R: IntoIterator<Item = (ParamId, AdaptorRecord<AdamW, B>)>
        + FromIterator<(ParamId, AdaptorRecord<AdamW, B>)>,
{
    macro_rules! each_rank {
        ($id:expr, $record:expr, $($rank:ident),*) => {
            match $record {
                $(AdaptorRecordV1::$rank(mut state) => {
                    let m = &mut state.momentum;
                    m.moment_1 = f.map(format!("{}.moment_1", $id), m.moment_1.clone());
                    m.moment_2 = f.map(format!("{}.moment_2", $id), m.moment_2.clone());
                    if let Some(max) = m.max_moment_2.take() {
                        m.max_moment_2 = Some(f.map(format!("{}.max_moment_2", $id), max));
                    }
                    AdaptorRecordV1::$rank(state)
                })*
            }
        };
    }
    record
        .into_iter()
        .map(|(id, record)| {
            let AdaptorRecord::V1(v1) = record;
            let v1 = each_rank!(
                id, v1, Rank0, Rank1, Rank2, Rank3, Rank4, Rank5, Rank6, Rank7, Rank8
            );
            (id, AdaptorRecord::V1(v1))
        })
        .collect()
}

/// AdamW's saved moments in `dtype`. Burn loads a record's tensors in the backend's
/// default dtype (bf16 on `Cuda<bf16>`), so a resumed run brings them back to the
/// masters' dtype before they meet f32 gradients.
pub fn adamw_state_in<B, R>(record: R, dtype: DType) -> R
where
    B: AutodiffBackend,
    R: IntoIterator<Item = (ParamId, AdaptorRecord<AdamW, B>)>
        + FromIterator<(ParamId, AdaptorRecord<AdamW, B>)>,
{
    struct InDtype(DType);
    impl<B: Backend> MapMoment<B> for InDtype {
        fn map<const D: usize>(&mut self, _: String, moment: Tensor<B, D>) -> Tensor<B, D> {
            in_dtype(moment, self.0)
        }
    }
    map_moments(record, &mut InDtype(dtype))
}

/// Splits AdamW's state for saving: the record with every moment replaced by a
/// one-element placeholder, and the moments themselves, keyed `{param id}.moment_1`
/// and `.moment_2` (and `.max_moment_2` with AMSGrad), sorted, to be written as
/// safetensors.
///
/// Burn's recorder would bring the moments back in the backend's default dtype
/// (`Record::from_item` converts to `B::FloatElem`), rounding a bf16 run's f32 moments
/// to bf16 on resume; written apart, they come back as they were
/// ([`join_adamw_state`]).
pub fn split_adamw_state<B, R>(record: R) -> (R, Vec<(String, TensorData)>)
where
    B: AutodiffBackend,
    R: IntoIterator<Item = (ParamId, AdaptorRecord<AdamW, B>)>
        + FromIterator<(ParamId, AdaptorRecord<AdamW, B>)>,
{
    struct Take(Vec<(String, TensorData)>);
    impl<B: Backend> MapMoment<B> for Take {
        fn map<const D: usize>(&mut self, key: String, moment: Tensor<B, D>) -> Tensor<B, D> {
            let placeholder = Tensor::zeros([1; D], &moment.device());
            self.0.push((key, moment.into_data()));
            placeholder
        }
    }
    let mut take = Take(Vec::new());
    let record = map_moments(record, &mut take);
    // In key order, so that a checkpoint's file does not depend on the map's order.
    take.0.sort_by(|a, b| a.0.cmp(&b.0));
    (record, take.0)
}

/// Whether a loaded record holds AdamW's moments themselves, rather than the
/// placeholders [`split_adamw_state`] leaves (every moment one element): a record
/// without trainable parameters holds them trivially.
pub fn holds_adamw_moments<B, R>(record: R) -> (R, bool)
where
    B: AutodiffBackend,
    R: IntoIterator<Item = (ParamId, AdaptorRecord<AdamW, B>)>
        + FromIterator<(ParamId, AdaptorRecord<AdamW, B>)>,
{
    struct Count {
        moments: usize,
        placeholders: usize,
    }
    impl<B: Backend> MapMoment<B> for Count {
        fn map<const D: usize>(&mut self, _: String, moment: Tensor<B, D>) -> Tensor<B, D> {
            self.moments += 1;
            if moment.shape().num_elements() == 1 {
                self.placeholders += 1;
            }
            moment
        }
    }
    let mut count = Count {
        moments: 0,
        placeholders: 0,
    };
    let record = map_moments(record, &mut count);
    let holds = count.moments == 0 || count.placeholders < count.moments;
    (record, holds)
}

/// The record of [`split_adamw_state`] with its moments read back from `moments`,
/// created in the checkpoint's dtype (see [`Checkpoint::with_dtype`]).
///
/// # Errors
/// A moment missing from `moments`, or not of its parameter's rank.
pub fn join_adamw_state<B, R>(
    record: R,
    moments: &Checkpoint,
    device: &B::Device,
) -> Result<R, xtuner_model::Error>
where
    B: AutodiffBackend,
    R: IntoIterator<Item = (ParamId, AdaptorRecord<AdamW, B>)>
        + FromIterator<(ParamId, AdaptorRecord<AdamW, B>)>,
{
    struct Put<'a, B: Backend> {
        moments: &'a Checkpoint,
        device: &'a B::Device,
        error: Option<xtuner_model::Error>,
    }
    impl<B: Backend> MapMoment<B> for Put<'_, B> {
        fn map<const D: usize>(&mut self, key: String, moment: Tensor<B, D>) -> Tensor<B, D> {
            let path = self.moments.path().to_path_buf();
            let read = match self.moments.shape(&key).map(<[usize; D]>::try_from) {
                Some(Ok(shape)) => self.moments.tensor::<B, D>(&key, shape, self.device),
                Some(Err(shape)) => Err(xtuner_model::Error::BadConfig {
                    path,
                    message: format!("`{key}` has {} dimensions, its parameter {D}", shape.len()),
                }),
                None => Err(xtuner_model::Error::MissingTensor { key, path }),
            };
            match read {
                Ok(tensor) => tensor,
                Err(e) => {
                    self.error.get_or_insert(e);
                    moment
                }
            }
        }
    }
    let mut put = Put::<B::InnerBackend> {
        moments,
        device,
        error: None,
    };
    let record = map_moments(record, &mut put);
    match put.error {
        Some(e) => Err(e),
        None => Ok(record),
    }
}

struct NormVisitor<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    /// The sum of squares of the gradients on the CPU backend (summed in f64 there).
    host: f64,
    /// Of the others, as a tensor (read once, at the end).
    sum_squares: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for NormVisitor<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some(grad) = self.grads.get::<B::InnerBackend, D>(param.id) else {
            return;
        };
        match cpu::on_cpu::<_, D>(grad) {
            Ok(grad) => self.host += cpu::sum_squares(cpu::elements(&cpu::array(grad))),
            Err(grad) => {
                let s = grad.square().sum();
                self.sum_squares = Some(match self.sum_squares.take() {
                    Some(acc) => acc + s,
                    None => s,
                });
            }
        }
    }
}

struct ScaleVisitor<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for ScaleVisitor<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some(grad) = self.grads.remove::<B::InnerBackend, D>(param.id) else {
            return;
        };
        let grad = match cpu::on_cpu::<_, D>(grad) {
            Ok(grad) => {
                let mut a = cpu::array(grad);
                cpu::scale(cpu::elements_mut(&mut a), self.factor as f32);
                moved(cpu::tensor::<D>(a)).unwrap_or_else(|_| unreachable!("moved from"))
            }
            Err(grad) => grad * self.factor,
        };
        self.grads.register::<B::InnerBackend, D>(param.id, grad);
    }
}

/// The L2 norm of all gradients together.
pub fn global_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &GradientsParams,
) -> f64 {
    let mut visitor = NormVisitor::<B> {
        grads,
        host: 0.0,
        sum_squares: None,
    };
    model.visit(&mut visitor);
    (visitor.host + visitor.sum_squares.map_or(0.0, scalar)).sqrt()
}

/// Scales all gradients so their global norm is at most `max_norm` (factor
/// `max_norm / (norm + 1e-6)`, as PyTorch). Returns the norm before clipping.
pub fn clip_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> f64 {
    let norm = global_grad_norm(model, grads);
    let factor = max_norm / (norm + 1e-6);
    if factor < 1.0 {
        model.visit(&mut ScaleVisitor { grads, factor });
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Module;
    use burn::optim::Optimizer;
    use xtuner_dataset::PackedRow;
    use xtuner_dataset::collate::collate;
    use xtuner_model::decoder::{Decoder, DecoderConfig};

    use crate::config::{LoraConfig, OptimizerConfig};
    use crate::step::{forward_backward, optimizer_step};

    type B = burn::backend::Autodiff<burn::backend::NdArray<f32>>;

    /// The dtypes of the trainable and the frozen parameters.
    fn param_dtypes<M: Module<B>>(model: &M) -> (Vec<DType>, Vec<DType>) {
        struct Dtypes(Vec<DType>, Vec<DType>);
        impl ModuleVisitor<B> for Dtypes {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                let dtype = param.val().dtype();
                if param.is_require_grad() {
                    self.0.push(dtype)
                } else {
                    self.1.push(dtype)
                }
            }
        }
        let mut v = Dtypes(Vec::new(), Vec::new());
        model.visit(&mut v);
        (v.0, v.1)
    }

    fn moment_dtypes<R: Clone + IntoIterator<Item = (ParamId, AdaptorRecord<AdamW, B>)>>(
        record: &R,
    ) -> Vec<DType> {
        record
            .clone()
            .into_iter()
            .flat_map(|(_, r)| {
                // Only LoRA's A and B train here: every state is of rank 2.
                let state = r.into_state::<2>();
                [
                    state.momentum.moment_1.dtype(),
                    state.momentum.moment_2.dtype(),
                ]
            })
            .collect()
    }

    /// A tiny LoRA model and one packed row to train it on.
    fn lora_setup() -> (Decoder<B>, xtuner_dataset::collate::Batch) {
        let device = Default::default();
        let decoder = DecoderConfig::preset("internlm2-tiny", 300).unwrap();
        <B as burn::tensor::backend::Backend>::seed(&device, 3);
        let base = Decoder::<B>::random(&decoder, &device).unwrap();
        let lora = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: Vec::new(),
        };
        let model = crate::lora::attach(base, &decoder, &lora, 3, &device).unwrap();
        let ids: Vec<i64> = (0..32).map(|i| (i * 37 % 300) as i64).collect();
        let rows = [PackedRow {
            labels: ids.clone(),
            input_ids: ids,
            cumulative_len: vec![0, 32],
        }];
        (model, collate(&rows.iter().collect::<Vec<_>>(), false))
    }

    /// Every moment of a rank-2 record, sorted by `{param id}.{1|2}`.
    fn moments_of<R: Clone + IntoIterator<Item = (ParamId, AdaptorRecord<AdamW, B>)>>(
        record: &R,
    ) -> Vec<(String, Vec<f32>)> {
        let mut out: Vec<(String, Vec<f32>)> = record
            .clone()
            .into_iter()
            .flat_map(|(id, r)| {
                let m = r.into_state::<2>().momentum;
                [
                    (format!("{id}.1"), m.moment_1.into_data().to_vec().unwrap()),
                    (format!("{id}.2"), m.moment_2.into_data().to_vec().unwrap()),
                ]
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// A saved AdamW state comes back bit for bit through the safetensors side of the
    /// split, the recorder's side keeping only placeholders; a moment missing from the
    /// file is an error that names it.
    #[test]
    fn adamw_moments_round_trip_exactly_apart_from_the_record() {
        let device = Default::default();
        let (mut model, batch) = lora_setup();
        let mut optimizer = adamw(&OptimizerConfig::default()).init::<B, Decoder<B>>();
        for _ in 0..2 {
            let (_, grads) = forward_backward(&model, &batch, 1, false, &device);
            (model, _) = optimizer_step(model, &mut optimizer, grads, 1e-3, 1.0);
        }
        let record = optimizer.to_record();
        let saved = moments_of(&record);
        assert!(
            saved
                .iter()
                .all(|(_, m)| m.len() > 1 && m.iter().any(|&v| v != 0.0))
        );

        let (record, holds) = holds_adamw_moments(record);
        assert!(holds);
        let (placeholders, moments) = split_adamw_state(record);
        assert_eq!(moments.len(), saved.len());
        assert!(moments.windows(2).all(|w| w[0].0 < w[1].0), "sorted by key");
        assert!(moments_of(&placeholders).iter().all(|(_, m)| m.len() == 1));
        let (placeholders, holds) = holds_adamw_moments(placeholders);
        assert!(!holds);
        let dir = tempfile::tempdir().unwrap();
        let files = xtuner_model::checkpoint::save_safetensors(
            dir.path(),
            "moments",
            moments,
            xtuner_model::checkpoint::SaveDtype::F32,
            None,
        )
        .unwrap();
        let ckpt = Checkpoint::open(&files[0]).unwrap().with_dtype(DType::F32);
        let loaded = join_adamw_state(placeholders.clone(), &ckpt, &device).unwrap();
        assert_eq!(moments_of(&loaded), saved);
        assert!(moment_dtypes(&loaded).iter().all(|&d| d == DType::F32));
        optimizer = optimizer.load_record(loaded);
        let (_, grads) = forward_backward(&model, &batch, 1, false, &device);
        let _ = optimizer_step(model, &mut optimizer, grads, 1e-3, 1.0);

        let mut extra = placeholders;
        let state = extra.values().next().unwrap().clone();
        let other = ParamId::new();
        extra.insert(other, state);
        let message = join_adamw_state(extra, &ckpt, &device)
            .err()
            .unwrap()
            .to_string();
        assert!(message.contains(&format!("`{other}.moment_")), "{message}");
    }

    /// f64 masters on the f32 CPU backend stand in for f32 masters of a bf16 GPU run:
    /// the layers compute in f32, the parameters, gradients and moments stay f64.
    #[test]
    fn wide_master_weights_train_like_the_plain_model_and_keep_their_dtype() {
        let device = Default::default();
        let (model, batch) = lora_setup();
        let train = |mut model: Decoder<B>| {
            let mut optimizer = adamw(&OptimizerConfig::default()).init::<B, Decoder<B>>();
            let mut losses = Vec::new();
            for _ in 0..3 {
                let (loss, grads) = forward_backward(&model, &batch, 1, false, &device);
                losses.push(loss);
                (model, _) = optimizer_step(model, &mut optimizer, grads, 1e-3, 1.0);
            }
            (model, optimizer, losses)
        };
        let (_, _, plain) = train(model.clone());

        let wide = master_weights(model, DType::F64);
        let (trainable, frozen) = param_dtypes(&wide);
        assert!(
            !trainable.is_empty() && trainable.iter().all(|&d| d == DType::F64),
            "{trainable:?}"
        );
        assert!(frozen.iter().all(|&d| d == DType::F32));
        let (wide, mut optimizer, losses) = train(wide);
        for (a, b) in plain.iter().zip(&losses) {
            assert!((a - b).abs() < 1e-4 * a.abs(), "{plain:?} vs {losses:?}");
        }
        assert!(param_dtypes(&wide).0.iter().all(|&d| d == DType::F64));
        let record = optimizer.to_record();
        assert!(moment_dtypes(&record).iter().all(|&d| d == DType::F64));

        // Burn loads a saved record in the backend's default dtype; the resumed run
        // widens it again, and the optimizer steps on.
        let loaded = adamw_state_in(record, DType::F32);
        assert!(moment_dtypes(&loaded).iter().all(|&d| d == DType::F32));
        let widened = adamw_state_in(loaded, DType::F64);
        assert!(moment_dtypes(&widened).iter().all(|&d| d == DType::F64));
        optimizer = optimizer.load_record(widened);
        let (loss, grads) = forward_backward(&wide, &batch, 1, false, &device);
        let (wide, _) = optimizer_step(wide, &mut optimizer, grads, 1e-3, 1.0);
        assert!(loss.is_finite() && param_dtypes(&wide).0.iter().all(|&d| d == DType::F64));
    }
}
