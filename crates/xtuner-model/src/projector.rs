//! XTuner's LLaVA projector (`xtuner/model/modules/projector`, `ProjectorModel`): an MLP
//! from the vision tower's hidden size to the LLM's, LLaVA-1.5's "mlp2x_gelu" at depth 2.
//!
//! ```text
//! y = model.0(x)                          Linear(visual_hidden_size → llm_hidden_size)
//! repeat depth − 1 times: y = model.{2k}(act(y))   Linear(llm_hidden_size → llm_hidden_size)
//! ```
//!
//! The saved layout (`projector/` of an XTuner LLaVA export, `ProjectorModel.save_pretrained`):
//! `config.json` (`visual_hidden_size`, `llm_hidden_size`, `depth`, `hidden_act`,
//! `bias`, `model_type: "projector"`) and safetensors with `model.0.{weight,bias}`,
//! `model.2.{weight,bias}`, ... (the odd indices of the PyTorch `nn.Sequential` are the
//! activations, which hold no weights). XTuner's own `.pth` checkpoints prefix them with
//! `projector.`.
//!
//! Dimension legend: B batch (images), N patches, V visual hidden, C LLM hidden.

use std::path::Path;

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use serde::Deserialize;

use crate::checkpoint::Checkpoint;
use crate::nn::activation::HiddenAct;
use crate::nn::linear::Linear;
use crate::{Error, Result};

/// `ProjectorConfig` (the projector's `config.json`).
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct ProjectorConfig {
    /// V, the vision tower's hidden size.
    pub visual_hidden_size: usize,
    /// C, the LLM's hidden size.
    pub llm_hidden_size: usize,
    /// Number of linear layers (≥ 1).
    #[serde(default = "default_depth")]
    pub depth: usize,
    /// The activation between linear layers (`gelu`: exact, erf-based).
    #[serde(default = "default_act")]
    pub hidden_act: HiddenAct,
    /// Whether the linear layers have biases.
    #[serde(default = "default_bias")]
    pub bias: bool,
}

/// What a projector's `config.json` holds: [`ProjectorConfig`] and the keys that
/// name the model for transformers.
#[derive(Debug, serde::Serialize)]
pub struct ProjectorConfigFile<'a> {
    /// `projector`.
    pub model_type: &'static str,
    /// `["ProjectorModel"]`.
    pub architectures: [&'static str; 1],
    /// The settings.
    #[serde(flatten)]
    pub config: &'a ProjectorConfig,
}

fn default_depth() -> usize {
    2
}
fn default_act() -> HiddenAct {
    HiddenAct::Gelu
}
fn default_bias() -> bool {
    true
}

impl ProjectorConfig {
    /// XTuner's default projector between hidden sizes `visual` and `llm`: depth 2,
    /// GELU, with biases.
    pub fn new(visual_hidden_size: usize, llm_hidden_size: usize) -> Self {
        Self {
            visual_hidden_size,
            llm_hidden_size,
            depth: 2,
            hidden_act: HiddenAct::Gelu,
            bias: true,
        }
    }

    /// Reads and validates a projector `config.json`.
    ///
    /// # Errors
    /// [`Error::Io`] when unreadable; [`Error::BadConfig`] naming the file and key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let config: Self = crate::error::read_json_file(path)?;
        config
            .validate()
            .map_err(|e| crate::error::in_file(path, e))?;
        Ok(config)
    }

    /// The `config.json` XTuner's `ProjectorModel.save_pretrained` writes: these
    /// settings with its `model_type` and `architectures`.
    pub fn to_json(&self) -> ProjectorConfigFile<'_> {
        ProjectorConfigFile {
            model_type: "projector",
            architectures: ["ProjectorModel"],
            config: self,
        }
    }

    /// Checks that every size is positive.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the key.
    pub fn validate(&self) -> Result<()> {
        for (key, value) in [
            ("visual_hidden_size", self.visual_hidden_size),
            ("llm_hidden_size", self.llm_hidden_size),
            ("depth", self.depth),
        ] {
            if value == 0 {
                return Err(Error::InvalidConfig {
                    key,
                    message: "must be positive".into(),
                });
            }
        }
        Ok(())
    }

    /// `(d_in, d_out)` of linear layer `i` (saved as `model.{2i}`).
    pub fn dims(&self, i: usize) -> (usize, usize) {
        let d_in = if i == 0 {
            self.visual_hidden_size
        } else {
            self.llm_hidden_size
        };
        (d_in, self.llm_hidden_size)
    }
}

/// XTuner's `ProjectorModel`. Linear layer `i` of `model` is the checkpoint's
/// `model.{2i}` (the `nn.Sequential` interleaves the weightless activations).
#[derive(Module, Debug)]
pub struct Projector<B: Backend> {
    /// The linear layers, in order.
    pub model: Vec<Linear<B>>,
    /// The activation between them.
    pub activation: HiddenAct,
}

impl<B: Backend> Projector<B> {
    /// A randomly initialised projector (PyTorch `nn.Linear` init) from the backend's
    /// generator. (Training draws its new projector on the host instead, so that it is
    /// the same on every backend: `xtuner_engine::init`.)
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when the config does not validate.
    pub fn new(config: &ProjectorConfig, device: &B::Device) -> Result<Self> {
        config.validate()?;
        let model = (0..config.depth)
            .map(|i| {
                let (d_in, d_out) = config.dims(i);
                Linear::new(d_in, d_out, config.bias, device)
            })
            .collect();
        Ok(Self {
            model,
            activation: config.hidden_act,
        })
    }

    /// Loads a saved projector directory (`config.json` + safetensors), its weights in
    /// `dtype` (the backend's default for `None`; see [`Checkpoint::with_dtype`]).
    ///
    /// # Errors
    /// As [`ProjectorConfig::from_file`] and [`Projector::load_from`]; tensors the
    /// projector does not use are [`Error::UnexpectedTensors`].
    pub fn load(
        dir: &Path,
        dtype: Option<DType>,
        device: &B::Device,
    ) -> Result<(Self, ProjectorConfig)> {
        let config = ProjectorConfig::from_file(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open(dir)?;
        let ckpt = match dtype {
            Some(dtype) => ckpt.with_dtype(dtype),
            None => ckpt,
        };
        let projector = Self::load_from(&ckpt, "", &config, device)?;
        let unexpected = ckpt.unused_keys();
        if !unexpected.is_empty() {
            return Err(Error::UnexpectedTensors { keys: unexpected });
        }
        Ok((projector, config))
    }

    /// Loads `{prefix}.model.{2i}.{weight,bias}` from an opened checkpoint: `prefix`
    /// is `""` for a saved projector directory, `"projector"` inside an XTuner LLaVA
    /// checkpoint. Other keys are left for the caller to check.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a bad config; [`Error::MissingTensor`] /
    /// [`Error::ShapeMismatch`] naming the tensor.
    pub fn load_from(
        ckpt: &Checkpoint,
        prefix: &str,
        config: &ProjectorConfig,
        device: &B::Device,
    ) -> Result<Self> {
        config.validate()?;
        let model = (0..config.depth)
            .map(|i| {
                let (d_in, d_out) = config.dims(i);
                let key = if prefix.is_empty() {
                    format!("model.{}", 2 * i)
                } else {
                    format!("{prefix}.model.{}", 2 * i)
                };
                Linear::load(ckpt, &key, d_in, d_out, config.bias, device)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            model,
            activation: config.hidden_act,
        })
    }

    /// The weights under XTuner's names (`model.{2i}.weight` `[out, in]`, `.bias`).
    pub fn to_hf_tensors(&self) -> Vec<(String, burn::tensor::TensorData)> {
        self.model
            .iter()
            .enumerate()
            .flat_map(|(i, linear)| linear.to_hf_tensors(&format!("model.{}", 2 * i)))
            .collect()
    }

    /// # Shapes
    /// `x`: `[..., V]` (e.g. `[B, N, V]` image features) → `[..., C]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let mut layers = self.model.iter();
        let Some(first) = layers.next() else { return x };
        layers.fold(first.forward(x), |y, layer| {
            layer.forward(self.activation.forward(y))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend;
    use std::path::PathBuf;

    fn fixtures() -> PathBuf {
        crate::test_support::fixture("")
    }

    #[test]
    fn loads_the_fixture_projector() {
        let device = Default::default();
        let (projector, config) =
            Projector::<TestBackend>::load(&fixtures().join("llava-tiny/projector"), None, &device)
                .unwrap();
        assert_eq!(config, ProjectorConfig::new(32, 64));
        assert_eq!(projector.model.len(), 2);
        assert_eq!(projector.model[0].dims(), [32, 64]);
        assert_eq!(
            projector
                .forward(Tensor::<TestBackend, 3>::zeros([2, 4, 32], &device))
                .dims(),
            [2, 4, 64]
        );
    }

    #[test]
    fn forward_is_linear_gelu_linear() {
        let device = Default::default();
        let w0 = Tensor::<TestBackend, 2>::from_floats([[1.0, -1.0]], &device); // [1, 2]
        let w1 = Tensor::<TestBackend, 2>::from_floats([[1.0, 0.0], [0.0, 2.0]], &device);
        let b1 = Tensor::<TestBackend, 1>::from_floats([0.5, 0.0], &device);
        let projector = Projector {
            model: vec![
                Linear::from_tensors(w0, None),
                Linear::from_tensors(w1, Some(b1)),
            ],
            activation: HiddenAct::Gelu,
        };
        let y = projector
            .forward(Tensor::<TestBackend, 2>::from_floats([[1.0]], &device))
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        // gelu(1) = 0.8413447, gelu(-1) = -0.1586553
        assert!(
            (y[0] - (0.8413447 + 0.5)).abs() < 1e-5 && (y[1] - 2.0 * -0.1586553).abs() < 1e-5,
            "{y:?}"
        );
    }

    #[test]
    fn random_init_follows_the_depth() {
        let device = Default::default();
        let config = ProjectorConfig {
            depth: 3,
            bias: false,
            ..ProjectorConfig::new(8, 16)
        };
        let projector = Projector::<TestBackend>::new(&config, &device).unwrap();
        assert_eq!(
            projector.model.iter().map(Linear::dims).collect::<Vec<_>>(),
            [[8, 16], [16, 16], [16, 16]]
        );
        assert!(projector.model.iter().all(|l| l.bias.is_none()));
        assert!(
            Projector::<TestBackend>::new(&ProjectorConfig { depth: 0, ..config }, &device)
                .is_err()
        );
    }

    #[test]
    fn config_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"visual_hidden_size": 0, "llm_hidden_size": 4}"#).unwrap();
        let err = ProjectorConfig::from_file(&path).unwrap_err();
        assert!(
            err.to_string().contains("config.json")
                && err.to_string().contains("visual_hidden_size"),
            "{err}"
        );
    }
}
