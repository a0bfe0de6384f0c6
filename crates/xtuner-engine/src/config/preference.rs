//! `[preference]`: training on preference pairs, as XTuner's `configs/dpo/`,
//! `configs/orpo/` and `configs/reward_model/` do (the data's `format` is then a
//! preference format: `intel_orca_dpo`, `orpo_dpo_mix_40k` or `preference`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::preference::{Dpo, DpoLossType, RankingLoss, RewardObjective, RewardPenalty};
use crate::{Error, Result};

/// The method of a preference run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PreferenceMethod {
    /// Direct preference optimisation against a reference model.
    Dpo,
    /// Odds-ratio preference optimisation (no reference).
    Orpo,
    /// A reward model: the decoder and a value head read at the reward token.
    Reward,
}

/// The `[preference]` section (XTuner's names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreferenceConfig {
    /// `dpo`, `orpo` or `reward`.
    pub method: PreferenceMethod,
    /// DPO: sigmoid (default), robust, hinge, ipo, kto_pair, sppo_hard, nca_pair;
    /// reward: ranking (default) or focal.
    #[serde(default)]
    pub loss_type: Option<String>,
    /// β of DPO and ORPO.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// DPO's label smoothing (sigmoid and robust).
    #[serde(default)]
    pub label_smoothing: f64,
    /// DPO without LoRA: the frozen reference's Hugging Face directory (default: the
    /// starting weights).
    #[serde(default)]
    pub ref_model: Option<PathBuf>,
    /// Reward models: the token appended to each sequence, whose hidden state is scored.
    #[serde(default)]
    pub reward_token_id: Option<u32>,
    /// Reward models: `log_barrier` (default), `L2` or `none`.
    #[serde(default)]
    pub penalty_type: RewardPenalty,
    /// Reward models: the penalty's weight.
    #[serde(default = "default_penalty_weight")]
    pub penalty_weight: f64,
    /// With `data.use_varlen_attn`, pairs are packed into rows of at most this many
    /// tokens.
    #[serde(default = "default_max_packed_length")]
    pub max_packed_length: usize,
}

fn default_beta() -> f64 {
    0.1
}

fn default_penalty_weight() -> f64 {
    0.01
}

fn default_max_packed_length() -> usize {
    16384
}

/// What a preference run optimises.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    /// DPO.
    Dpo(Dpo),
    /// ORPO with this β.
    Orpo {
        /// β.
        beta: f64,
    },
    /// A reward model.
    Reward(RewardObjective),
}

impl PreferenceConfig {
    /// The objective, its loss type resolved for the method.
    ///
    /// # Errors
    /// A loss type the method does not have, or bad numbers, naming the key.
    pub fn objective(&self) -> Result<Objective> {
        let loss_type = self.loss_type.as_deref();
        let bad_type = |valid: &str| {
            Error::setting(
                "preference.loss_type",
                format!(
                    "`{}` is not a loss type of {:?}; valid: {valid}",
                    loss_type.unwrap_or_default(),
                    self.method
                ),
            )
        };
        let beta_ok = self.beta > 0.0 && self.beta.is_finite();
        match self.method {
            PreferenceMethod::Dpo => {
                let names: Vec<&str> = DpoLossType::ALL.iter().map(|t| t.name()).collect();
                let loss_type = match loss_type {
                    None => DpoLossType::Sigmoid,
                    Some(name) => DpoLossType::ALL
                        .into_iter()
                        .find(|t| t.name() == name)
                        .ok_or_else(|| bad_type(&names.join(", ")))?,
                };
                if !beta_ok {
                    return Err(Error::setting("preference.beta", "must be positive"));
                }
                if !(0.0..0.5).contains(&self.label_smoothing) {
                    return Err(Error::setting(
                        "preference.label_smoothing",
                        "must be in [0, 0.5)",
                    ));
                }
                Ok(Objective::Dpo(Dpo {
                    loss_type,
                    beta: self.beta,
                    label_smoothing: self.label_smoothing,
                }))
            }
            PreferenceMethod::Orpo => {
                if loss_type.is_some() {
                    return Err(bad_type("none (ORPO has one loss)"));
                }
                if !beta_ok {
                    return Err(Error::setting("preference.beta", "must be positive"));
                }
                Ok(Objective::Orpo { beta: self.beta })
            }
            PreferenceMethod::Reward => {
                let loss_type = match loss_type {
                    None | Some("ranking") => RankingLoss::Ranking,
                    Some("focal") => RankingLoss::Focal,
                    Some(_) => return Err(bad_type("ranking, focal")),
                };
                if self.reward_token_id.is_none() {
                    return Err(Error::setting(
                        "preference.reward_token_id",
                        "required for a reward model (InternLM2's `<|reward|>` is 92527)",
                    ));
                }
                Ok(Objective::Reward(RewardObjective {
                    loss_type,
                    penalty_type: self.penalty_type,
                    penalty_weight: self.penalty_weight,
                }))
            }
        }
    }
}
