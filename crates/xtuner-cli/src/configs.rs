//! The built-in configs (the repository's `configs/*.toml`, embedded in the binary), and
//! resolving a CONFIG argument: a file path, or the name of a built-in config.

use std::path::Path;

use anyhow::{Context, Result, bail};
use xtuner_engine::LoadedConfig;

/// Name and text of every built-in config.
pub const BUILTIN: &[(&str, &str)] = &[
    (
        "demo_llava_finetune",
        include_str!("../../../configs/demo_llava_finetune.toml"),
    ),
    (
        "demo_llava_pretrain",
        include_str!("../../../configs/demo_llava_pretrain.toml"),
    ),
    (
        "demo_tiny_dpo",
        include_str!("../../../configs/demo_tiny_dpo.toml"),
    ),
    (
        "demo_tiny_lora",
        include_str!("../../../configs/demo_tiny_lora.toml"),
    ),
    (
        "gemma2_9b_it_qlora_alpaca_e3",
        include_str!("../../../configs/gemma2_9b_it_qlora_alpaca_e3.toml"),
    ),
    (
        "gemma_2b_it_qlora_alpaca_e3",
        include_str!("../../../configs/gemma_2b_it_qlora_alpaca_e3.toml"),
    ),
    (
        "internlm2_1_8b_full_custom_pretrain_e1",
        include_str!("../../../configs/internlm2_1_8b_full_custom_pretrain_e1.toml"),
    ),
    (
        "internlm2_chat_1_8b_dpo_full",
        include_str!("../../../configs/internlm2_chat_1_8b_dpo_full.toml"),
    ),
    (
        "internlm2_chat_1_8b_full_alpaca_e3",
        include_str!("../../../configs/internlm2_chat_1_8b_full_alpaca_e3.toml"),
    ),
    (
        "internlm2_chat_1_8b_lora_alpaca_e3",
        include_str!("../../../configs/internlm2_chat_1_8b_lora_alpaca_e3.toml"),
    ),
    (
        "internlm2_chat_1_8b_orpo_full",
        include_str!("../../../configs/internlm2_chat_1_8b_orpo_full.toml"),
    ),
    (
        "internlm2_chat_1_8b_qlora_alpaca_e3",
        include_str!("../../../configs/internlm2_chat_1_8b_qlora_alpaca_e3.toml"),
    ),
    (
        "internlm2_chat_1_8b_qlora_custom_sft_e1",
        include_str!("../../../configs/internlm2_chat_1_8b_qlora_custom_sft_e1.toml"),
    ),
    (
        "internlm2_chat_1_8b_reward_full_varlenattn_jsonl_dataset",
        include_str!(
            "../../../configs/internlm2_chat_1_8b_reward_full_varlenattn_jsonl_dataset.toml"
        ),
    ),
    (
        "internlm2_chat_7b_dpo_qlora_varlenattn",
        include_str!("../../../configs/internlm2_chat_7b_dpo_qlora_varlenattn.toml"),
    ),
    (
        "llama3_8b_instruct_qlora_alpaca_e3",
        include_str!("../../../configs/llama3_8b_instruct_qlora_alpaca_e3.toml"),
    ),
    (
        "llava_internlm2_chat_1_8b_clip_vit_large_p14_336_e1_gpu8_pretrain",
        include_str!(
            "../../../configs/llava_internlm2_chat_1_8b_clip_vit_large_p14_336_e1_gpu8_pretrain.toml"
        ),
    ),
    (
        "llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune",
        include_str!(
            "../../../configs/llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune.toml"
        ),
    ),
    (
        "mistral_7b_instruct_qlora_alpaca_e3",
        include_str!("../../../configs/mistral_7b_instruct_qlora_alpaca_e3.toml"),
    ),
    (
        "phi3_mini_4k_instruct_qlora_alpaca_e3",
        include_str!("../../../configs/phi3_mini_4k_instruct_qlora_alpaca_e3.toml"),
    ),
    (
        "qwen1_5_7b_chat_qlora_alpaca_e3",
        include_str!("../../../configs/qwen1_5_7b_chat_qlora_alpaca_e3.toml"),
    ),
    (
        "qwen3_8b_qlora_alpaca_e3",
        include_str!("../../../configs/qwen3_8b_qlora_alpaca_e3.toml"),
    ),
];

/// Loads CONFIG: a file if one exists at that path, else a built-in config by name.
pub fn load(arg: &str, overrides: &[String]) -> Result<LoadedConfig> {
    let path = Path::new(arg);
    if path.is_file() {
        return Ok(LoadedConfig::from_file(path, overrides)?);
    }
    let name = arg.strip_suffix(".toml").unwrap_or(arg);
    match BUILTIN.iter().find(|(n, _)| *n == name) {
        Some((name, text)) => Ok(LoadedConfig::from_text(
            text,
            Path::new(&format!("<built-in {name}>")),
            name,
            overrides,
        )?),
        None => {
            bail!("config `{arg}` is neither a file nor a built-in config (see `xtuner list-cfg`)")
        }
    }
}

/// Built-in config text by name.
pub fn builtin(name: &str) -> Result<&'static str> {
    let name = name.strip_suffix(".toml").unwrap_or(name);
    BUILTIN
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, text)| *text)
        .with_context(|| format!("no built-in config named `{name}` (see `xtuner list-cfg`)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_config_file_is_built_in() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_suffix(".toml")
                    .map(str::to_string)
            })
            .collect();
        files.sort();
        let mut names: Vec<String> = BUILTIN.iter().map(|(n, _)| n.to_string()).collect();
        names.sort();
        assert_eq!(files, names, "add new configs/*.toml files to BUILTIN");
    }

    #[test]
    fn every_builtin_config_parses_and_validates() {
        for (name, text) in BUILTIN {
            LoadedConfig::from_text(text, Path::new(name), name, &[])
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}
