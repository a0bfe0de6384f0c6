//! The decoder against the reference stack (transformers / PEFT) on the tiny fixtures:
//! InternLM2 logits, packed (varlen) logits, greedy generation, a PEFT adapter merged
//! at load, and every other family (Llama, Qwen2, Qwen3, Gemma, Gemma 2, Phi-3)
//! through its own key names and layout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use burn::backend::NdArray;
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{DType, Int, Tensor, TensorData, Tolerance};
use xtuner_model::checkpoint::Checkpoint;
use xtuner_model::checkpoint::peft::PeftAdapter;
use xtuner_model::decoder::{Decoder, DecoderInput};
use xtuner_model::generate::{GenerationConfig, StopReason, generate};
use xtuner_model::nn::attention::AttentionMask;
use xtuner_model::nn::kv_cache::KvCache;
use xtuner_model::sampling::SamplingConfig;

type B = NdArray<f32>;

mod common;

use common::fixture;

fn ints(ckpt: &Checkpoint, key: &str) -> (Vec<i64>, Vec<usize>) {
    let data = ckpt.int_data(key).unwrap();
    let shape = data.shape.to_vec();
    (data.convert::<i64>().to_vec::<i64>().unwrap(), shape)
}

fn ids_tensor(ids: &[i64], shape: [usize; 2]) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), shape), &Default::default())
}

fn causal_input(batch: usize, t: usize) -> DecoderInput<B> {
    DecoderInput::causal(batch, t, &Default::default())
}

fn assert_close(got: Tensor<B, 3>, ckpt: &Checkpoint, key: &str) {
    let expected = ckpt.float_data(key).unwrap();
    assert_eq!(got.dims().to_vec(), expected.shape.to_vec(), "{key} shape");
    got.into_data()
        .assert_approx_eq::<f32>(&expected, Tolerance::absolute(1e-4));
}

/// `model`'s logits for the golden `input_ids` equal the golden `key`.
fn assert_golden_logits(model: &Decoder<B>, golden: &Checkpoint, key: &str) -> Tensor<B, 3> {
    let (ids, shape) = ints(golden, "input_ids");
    let logits = model.forward(
        ids_tensor(&ids, [shape[0], shape[1]]),
        &causal_input(shape[0], shape[1]),
        None,
    );
    assert_close(logits.clone(), golden, key);
    logits
}

fn load(dir: &str, adapter: Option<&PeftAdapter>) -> Decoder<B> {
    Decoder::<B>::load(&fixture(dir), adapter, &Default::default())
        .unwrap()
        .0
}

#[test]
fn internlm2_logits() {
    let golden = Checkpoint::open(&fixture("internlm2-tiny/golden.safetensors")).unwrap();
    let model = load("internlm2-tiny", None);
    assert_golden_logits(&model, &golden, "logits");
}

/// A checkpoint opened `with_dtype` gives every weight that dtype, not the backend's
/// default: how a resumed run keeps its f32 masters on a bf16 backend. Here F64 on the f32
/// CPU backend stands in for f32 on bf16; the model still computes and matches the
/// reference.
#[test]
fn a_checkpoint_loaded_in_another_dtype_keeps_every_weight_in_it() {
    struct Dtypes(Vec<DType>);
    impl ModuleVisitor<B> for Dtypes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.push(param.val().dtype());
        }
    }
    let device = Default::default();
    let (_, config) = Decoder::<B>::load(&fixture("internlm2-tiny"), None, &device).unwrap();
    let ckpt = Checkpoint::open(&fixture("internlm2-tiny"))
        .unwrap()
        .with_dtype(DType::F64);
    let model = Decoder::<B>::load_from(&ckpt, &config, None, &device).unwrap();
    let mut dtypes = Dtypes(Vec::new());
    model.visit(&mut dtypes);
    assert!(dtypes.0.len() > 10, "visited {} weights", dtypes.0.len());
    assert!(dtypes.0.iter().all(|&d| d == DType::F64), "{:?}", dtypes.0);

    let golden = Checkpoint::open(&fixture("internlm2-tiny/golden.safetensors")).unwrap();
    let logits = assert_golden_logits(&model, &golden, "logits");
    assert_eq!(logits.dtype(), DType::F32);
}

#[test]
fn internlm2_packed_logits_keep_samples_apart() {
    let golden = Checkpoint::open(&fixture("internlm2-tiny/golden.safetensors")).unwrap();
    let model = load("internlm2-tiny", None);
    let (ids, shape) = ints(&golden, "input_ids");
    let t = shape[1];
    let row0 = &ids[..t];
    let (positions, _) = ints(&golden, "packed_position_ids");
    let (segments, _) = ints(&golden, "packed_segment_ids");
    let device = Default::default();
    let input = DecoderInput {
        positions: ids_tensor(&positions, [1, t]),
        mask: AttentionMask::new(1, t, &vec![true; t], Some(&segments), &device),
    };
    let logits = model.forward(ids_tensor(row0, [1, t]), &input, None);
    assert_close(logits, &golden, "packed_logits");
}

#[test]
fn internlm2_greedy_generation() {
    let golden = Checkpoint::open(&fixture("internlm2-tiny/golden.safetensors")).unwrap();
    let model = load("internlm2-tiny", None);
    let (prompt, shape) = ints(&golden, "generate_prompt");
    let (expected, _) = ints(&golden, "generate_greedy");
    let prompt_ids: Vec<u32> = prompt.iter().map(|&i| i as u32).collect();
    let embeds = model.embed(ids_tensor(&prompt, [1, shape[1]]));
    let config = GenerationConfig {
        max_new_tokens: expected.len() - prompt.len(),
        eos_token_ids: vec![],
        sampling: SamplingConfig {
            temperature: 0.0,
            ..Default::default()
        },
    };
    let (new, reason) = generate(&model, embeds, &prompt_ids, &config, |_| true).unwrap();
    assert_eq!(reason, StopReason::Length);
    let all: Vec<i64> = prompt
        .iter()
        .copied()
        .chain(new.iter().map(|&i| i64::from(i)))
        .collect();
    assert_eq!(all, expected);
}

#[test]
fn cached_decoding_equals_the_full_forward() {
    let model = load("internlm2-tiny", None);
    let ids: Vec<i64> = vec![1, 17, 300, 42, 7, 99, 250, 3];
    let full = model.forward(ids_tensor(&ids, [1, 8]), &causal_input(1, 8), None);
    let device = Default::default();
    let mut cache = KvCache::<B>::new(2, 1, 2, 4, 16, &device); // grows past 4
    let first = model.forward(
        ids_tensor(&ids[..5], [1, 5]),
        &causal_input(1, 5),
        Some(&mut cache),
    );
    let mut steps = vec![first];
    for (pos, &id) in ids.iter().enumerate().skip(5) {
        let input = DecoderInput {
            positions: ids_tensor(&[pos as i64], [1, 1]),
            mask: AttentionMask::Bias(Tensor::zeros([1, 1, 1, pos + 1], &device)),
        };
        steps.push(model.forward(ids_tensor(&[id], [1, 1]), &input, Some(&mut cache)));
    }
    let cached = Tensor::cat(steps, 1);
    cached
        .into_data()
        .assert_approx_eq::<f32>(&full.into_data(), Tolerance::absolute(1e-4));
}

#[test]
fn right_padding_does_not_change_real_tokens() {
    let model = load("internlm2-tiny", None);
    let device = Default::default();
    let ids: Vec<i64> = vec![1, 17, 300, 42, 7, 99];
    let alone = model.forward(ids_tensor(&ids[..4], [1, 4]), &causal_input(1, 4), None);
    let input = DecoderInput {
        positions: ids_tensor(&[0, 1, 2, 3, 0, 0], [1, 6]),
        mask: AttentionMask::new(1, 6, &[true, true, true, true, false, false], None, &device),
    };
    let padded = model.forward(ids_tensor(&[1, 17, 300, 42, 0, 0], [1, 6]), &input, None);
    let padded = padded.slice([0..1, 0..4, 0..512]);
    padded
        .into_data()
        .assert_approx_eq::<f32>(&alone.into_data(), Tolerance::absolute(1e-5));
}

#[test]
fn peft_adapter_merged_at_load() {
    let golden = Checkpoint::open(&fixture("internlm2-tiny/lora/golden.safetensors")).unwrap();
    let adapter = PeftAdapter::open(&fixture("internlm2-tiny/lora")).unwrap();
    assert_eq!(adapter.scale(), 2.0);
    let model = load("internlm2-tiny", Some(&adapter));
    let logits = assert_golden_logits(&model, &golden, "logits");
    assert_close(logits, &golden, "merged_logits");
}

#[test]
fn merged_checkpoint_matches_the_adapter() {
    // merged.safetensors holds the base weights with the adapter merged by PEFT.
    let golden = Checkpoint::open(&fixture("internlm2-tiny/lora/golden.safetensors")).unwrap();
    let config =
        xtuner_model::decoder::DecoderConfig::from_file(&fixture("internlm2-tiny/config.json"))
            .unwrap();
    let merged = Checkpoint::open(&fixture("internlm2-tiny/lora/merged.safetensors")).unwrap();
    let model = Decoder::<B>::load_from(&merged, &config, None, &Default::default()).unwrap();
    assert_golden_logits(&model, &golden, "merged_logits");
}

#[test]
fn llama_and_qwen2_through_their_own_keys() {
    for dir in ["llama-tiny", "qwen2-tiny"] {
        let golden = Checkpoint::open(&fixture(&format!("{dir}/golden.safetensors"))).unwrap();
        let model = load(dir, None);
        assert_eq!(
            model.output.is_none(),
            dir == "qwen2-tiny",
            "{dir}: Qwen2 ties its embeddings"
        );
        assert_golden_logits(&model, &golden, "logits");
    }
}

/// HF's causal-LM loss: mean cross-entropy of logits `[B, T, V]` at `t` against the
/// label at `t + 1`, over labels other than -100.
fn causal_lm_loss(logits: Tensor<B, 3>, labels: &[i64]) -> f64 {
    let [b, t, v] = logits.dims();
    let logits: Vec<f32> = logits.into_data().to_vec().unwrap();
    let (mut total, mut n) = (0.0f64, 0usize);
    for row in 0..b {
        for pos in 0..t - 1 {
            let label = labels[row * t + pos + 1];
            if label < 0 {
                continue;
            }
            let z = &logits[(row * t + pos) * v..(row * t + pos + 1) * v];
            let max = z.iter().fold(f32::MIN, |m, &x| m.max(x)) as f64;
            let sum: f64 = z.iter().map(|&x| (x as f64 - max).exp()).sum();
            total += max + sum.ln() - z[label as usize] as f64;
            n += 1;
        }
    }
    total / n as f64
}

#[test]
fn qwen3_gemma_gemma2_and_phi3_logits_and_loss() {
    for dir in ["qwen3-tiny", "gemma-tiny", "gemma2-tiny", "phi3-tiny"] {
        let golden = Checkpoint::open(&fixture(&format!("{dir}/golden.safetensors"))).unwrap();
        let model = load(dir, None);
        let logits = assert_golden_logits(&model, &golden, "logits");
        let (labels, _) = ints(&golden, "labels");
        let expected: f64 = golden
            .float_data("loss")
            .unwrap()
            .convert::<f64>()
            .to_vec::<f64>()
            .unwrap()[0];
        let loss = causal_lm_loss(logits, &labels);
        assert!(
            (loss - expected).abs() <= 1e-4 * expected.abs().max(1.0),
            "{dir}: loss {loss} vs {expected}"
        );
    }
}

#[test]
fn cached_decoding_keeps_gemma2s_sliding_window() {
    // 12 tokens through a window of 6: the cached steps past the window must drop the
    // same keys the full forward drops.
    let model = load("gemma2-tiny", None);
    let golden = Checkpoint::open(&fixture("gemma2-tiny/golden.safetensors")).unwrap();
    let (ids, shape) = ints(&golden, "input_ids");
    let ids = &ids[..shape[1]];
    let t = ids.len();
    let full = model.forward(ids_tensor(ids, [1, t]), &causal_input(1, t), None);
    let device = Default::default();
    let mut cache = KvCache::<B>::new(2, 1, 2, 4, 16, &device);
    let mut steps = vec![model.forward(
        ids_tensor(&ids[..3], [1, 3]),
        &causal_input(1, 3),
        Some(&mut cache),
    )];
    for (pos, &id) in ids.iter().enumerate().skip(3) {
        let input = DecoderInput {
            positions: ids_tensor(&[pos as i64], [1, 1]),
            mask: AttentionMask::Bias(Tensor::zeros([1, 1, 1, pos + 1], &device)),
        };
        steps.push(model.forward(ids_tensor(&[id], [1, 1]), &input, Some(&mut cache)));
    }
    Tensor::cat(steps, 1)
        .into_data()
        .assert_approx_eq::<f32>(&full.into_data(), Tolerance::absolute(1e-4));
}

#[test]
fn a_wrong_adapter_or_checkpoint_is_an_error_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    // The InternLM2 adapter on the Llama model: modules it does not have.
    let adapter = PeftAdapter::open(&fixture("internlm2-tiny/lora")).unwrap();
    let err = Decoder::<B>::load(&fixture("llama-tiny"), Some(&adapter), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("attention.wqkv"), "{err}");
    // A config whose shape disagrees with the weights.
    std::fs::copy(
        fixture("internlm2-tiny/model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let config = std::fs::read_to_string(fixture("internlm2-tiny/config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 128", "\"intermediate_size\": 96");
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    let err = Decoder::<B>::load(dir.path(), None, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("feed_forward.w1.weight") && err.contains("96"),
        "{err}"
    );
}

#[test]
fn save_and_load_round_trip_every_family_exactly() {
    use xtuner_model::checkpoint::{SaveDtype, save_safetensors};
    use xtuner_model::decoder::DecoderConfig;
    for dir in [
        "internlm2-tiny",
        "llama-tiny",
        "qwen2-tiny",
        "qwen3-tiny",
        "gemma-tiny",
        "gemma2-tiny",
        "phi3-tiny",
    ] {
        let config = DecoderConfig::from_file(&fixture(&format!("{dir}/config.json"))).unwrap();
        let model = load(dir, None);
        let out = tempfile::tempdir().unwrap();
        save_safetensors(
            out.path(),
            "model",
            model.to_hf_tensors(&config).unwrap(),
            SaveDtype::F32,
            Some(20_000),
        )
        .unwrap();
        let original = Checkpoint::open(&fixture(&format!("{dir}/model.safetensors"))).unwrap();
        let written = Checkpoint::open(out.path()).unwrap();
        assert_eq!(written.keys(), original.keys(), "{dir}");
        for key in original.keys() {
            assert_eq!(
                written.float_data(&key).unwrap(),
                original.float_data(&key).unwrap(),
                "{dir} {key}"
            );
        }
    }
}
