//! Every prompt template and system template that XTuner v0.2 ships, field by field.
//!
//! The strings are XTuner's (`xtuner/utils/templates.py`); a test checks each field
//! against the reference fixture. Templates are plain Python format strings: `{system}`,
//! `{input}` and `{round}` (only `chatglm2` uses it) are the placeholders.

use std::fmt;
use std::str::FromStr;

use crate::{ChatTemplate, Error};

/// The prompt templates XTuner defines, by their XTuner names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PromptTemplate {
    /// XTuner's `default` template.
    Default,
    /// XTuner's `zephyr` template.
    Zephyr,
    /// XTuner's `internlm_chat` template.
    InternlmChat,
    /// XTuner's `internlm2_chat` template.
    Internlm2Chat,
    /// XTuner's `moss_sft` template.
    MossSft,
    /// XTuner's `llama2_chat` template.
    Llama2Chat,
    /// XTuner's `code_llama_chat` template.
    CodeLlamaChat,
    /// XTuner's `chatglm2` template.
    Chatglm2,
    /// XTuner's `chatglm3` template.
    Chatglm3,
    /// XTuner's `qwen_chat` template.
    QwenChat,
    /// XTuner's `baichuan_chat` template.
    BaichuanChat,
    /// XTuner's `baichuan2_chat` template.
    Baichuan2Chat,
    /// XTuner's `wizardlm` template.
    Wizardlm,
    /// XTuner's `wizardcoder` template.
    Wizardcoder,
    /// XTuner's `vicuna` template.
    Vicuna,
    /// XTuner's `deepseek_coder` template.
    DeepseekCoder,
    /// XTuner's `deepseekcoder` template.
    Deepseekcoder,
    /// XTuner's `deepseek_moe` template.
    DeepseekMoe,
    /// XTuner's `deepseek_v2` template.
    DeepseekV2,
    /// XTuner's `mistral` template.
    Mistral,
    /// XTuner's `mixtral` template.
    Mixtral,
    /// XTuner's `minicpm` template.
    Minicpm,
    /// XTuner's `minicpm3` template.
    Minicpm3,
    /// XTuner's `gemma` template.
    Gemma,
    /// XTuner's `cohere_chat` template.
    CohereChat,
    /// XTuner's `llama3_chat` template.
    Llama3Chat,
    /// XTuner's `phi3_chat` template.
    Phi3Chat,
}

const PROMPT_TEMPLATES: &[(&str, PromptTemplate)] = &[
    ("default", PromptTemplate::Default),
    ("zephyr", PromptTemplate::Zephyr),
    ("internlm_chat", PromptTemplate::InternlmChat),
    ("internlm2_chat", PromptTemplate::Internlm2Chat),
    ("moss_sft", PromptTemplate::MossSft),
    ("llama2_chat", PromptTemplate::Llama2Chat),
    ("code_llama_chat", PromptTemplate::CodeLlamaChat),
    ("chatglm2", PromptTemplate::Chatglm2),
    ("chatglm3", PromptTemplate::Chatglm3),
    ("qwen_chat", PromptTemplate::QwenChat),
    ("baichuan_chat", PromptTemplate::BaichuanChat),
    ("baichuan2_chat", PromptTemplate::Baichuan2Chat),
    ("wizardlm", PromptTemplate::Wizardlm),
    ("wizardcoder", PromptTemplate::Wizardcoder),
    ("vicuna", PromptTemplate::Vicuna),
    ("deepseek_coder", PromptTemplate::DeepseekCoder),
    ("deepseekcoder", PromptTemplate::Deepseekcoder),
    ("deepseek_moe", PromptTemplate::DeepseekMoe),
    ("deepseek_v2", PromptTemplate::DeepseekV2),
    ("mistral", PromptTemplate::Mistral),
    ("mixtral", PromptTemplate::Mixtral),
    ("minicpm", PromptTemplate::Minicpm),
    ("minicpm3", PromptTemplate::Minicpm3),
    ("gemma", PromptTemplate::Gemma),
    ("cohere_chat", PromptTemplate::CohereChat),
    ("llama3_chat", PromptTemplate::Llama3Chat),
    ("phi3_chat", PromptTemplate::Phi3Chat),
];

impl PromptTemplate {
    /// Every template, in XTuner's order.
    pub fn all() -> impl Iterator<Item = PromptTemplate> {
        PROMPT_TEMPLATES.iter().map(|(_, t)| *t)
    }

    /// XTuner's name for the template.
    pub fn name(self) -> &'static str {
        PROMPT_TEMPLATES
            .iter()
            .find(|(_, t)| *t == self)
            .map_or("", |(n, _)| n)
    }

    /// The template's fields.
    pub fn template(self) -> ChatTemplate {
        let (system, instruction, suffix, suffix_as_eos, sep, stop_words): (
            Option<&str>,
            &str,
            &str,
            bool,
            &str,
            &[&str],
        ) = match self {
            PromptTemplate::Default => (
                Some("<|System|>:{system}\n"),
                "<|User|>:{input}\n<|Bot|>:",
                "",
                false,
                "\n",
                &[],
            ),
            PromptTemplate::Zephyr => (
                Some("<|system|>\n{system}\n"),
                "<|user|>\n{input}\n<|assistant|>\n",
                "",
                false,
                "\n",
                &[],
            ),
            PromptTemplate::InternlmChat => (
                Some("<|System|>:{system}\n"),
                "<|User|>:{input}<eoh>\n<|Bot|>:",
                "<eoa>",
                true,
                "\n",
                &["<eoa>"],
            ),
            PromptTemplate::Internlm2Chat => (
                Some("<|im_start|>system\n{system}<|im_end|>\n"),
                "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
                "<|im_end|>",
                true,
                "\n",
                &["<|im_end|>"],
            ),
            PromptTemplate::MossSft => (
                Some("{system}\n"),
                "<|Human|>: {input}<eoh>\n",
                "",
                false,
                "\n",
                &["<eoc>", "<eom>"],
            ),
            PromptTemplate::Llama2Chat => (
                Some(
                    "[INST] <<SYS>>\n You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n{system}\n<</SYS>>\n [/INST] ",
                ),
                "[INST] {input} [/INST]",
                "",
                false,
                "\n",
                &[],
            ),
            PromptTemplate::CodeLlamaChat => (
                Some("{system}\n"),
                "[INST] {input} [/INST]",
                "",
                false,
                "",
                &[],
            ),
            PromptTemplate::Chatglm2 => (
                Some("{system}\n"),
                "[Round {round}]\n\n问：{input}\n\n答：",
                "",
                false,
                "\n\n",
                &[],
            ),
            PromptTemplate::Chatglm3 => (
                Some("<|system|>\n{system}"),
                "<|user|>\n{input}<|assistant|>\n",
                "",
                false,
                "\n",
                &[],
            ),
            PromptTemplate::QwenChat => (
                Some("<|im_start|>system\n{system}<|im_end|>\n"),
                "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
                "<|im_end|>",
                true,
                "\n",
                &["<|im_end|>", "<|endoftext|>"],
            ),
            PromptTemplate::BaichuanChat => (
                Some("{system}\n"),
                "<reserved_102>{input}<reserved_103>",
                "",
                false,
                "\n",
                &[],
            ),
            PromptTemplate::Baichuan2Chat => (
                Some("{system}\n"),
                "<reserved_106>{input}<reserved_107>",
                "",
                false,
                "\n",
                &[],
            ),
            PromptTemplate::Wizardlm => (
                Some(
                    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. {system}\n ",
                ),
                "USER: {input} ASSISTANT:",
                "",
                false,
                "\n",
                &[],
            ),
            PromptTemplate::Wizardcoder => (
                Some(
                    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n{system}\n ",
                ),
                "### Instruction:\n{input}\n\n### Response:",
                "",
                false,
                "\n\n",
                &[],
            ),
            PromptTemplate::Vicuna => (
                Some(
                    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. {system}\n ",
                ),
                "USER: {input} ASSISTANT:",
                "",
                false,
                "\n",
                &[],
            ),
            PromptTemplate::DeepseekCoder => (
                Some(
                    "You are an AI programming assistant, utilizing the DeepSeek Coder model, developed by DeepSeekCompany, and you only answer questions related to computer science. For politically sensitive questions, security and privacy issues, and other non-computer science questions, you will refuse to answer. {system}\n",
                ),
                "### Instruction:\n{input}\n### Response:\n",
                "",
                false,
                "\n",
                &[],
            ),
            PromptTemplate::Deepseekcoder => (
                Some(
                    "You are an AI programming assistant, utilizing the DeepSeek Coder model, developed by DeepSeekCompany, and you only answer questions related to computer science. For politically sensitive questions, security and privacy issues, and other non-computer science questions, you will refuse to answer. {system}\n",
                ),
                "### Instruction:\n{input}\n### Response:\n",
                "",
                false,
                "\n",
                &[],
            ),
            PromptTemplate::DeepseekMoe => (
                Some("[INST] {system} [/INST]\n"),
                "[INST] {input} [/INST]",
                "",
                false,
                "\n",
                &[],
            ),
            PromptTemplate::DeepseekV2 => (
                Some("{system}\n\n"),
                "User: {input}\n\nAssistant: ",
                "<｜end▁of▁sentence｜>",
                true,
                "",
                &["<｜end▁of▁sentence｜>"],
            ),
            PromptTemplate::Mistral => (
                Some("[INST] {system} [/INST]\n"),
                "[INST] {input} [/INST]",
                "",
                false,
                "\n",
                &[],
            ),
            PromptTemplate::Mixtral => (
                Some("[INST] {system} [/INST]\n"),
                "[INST] {input} [/INST]",
                "",
                false,
                "\n",
                &[],
            ),
            PromptTemplate::Minicpm => (None, "<用户> {input} <AI>", "", false, "\n", &[]),
            PromptTemplate::Minicpm3 => (
                Some("<|im_start|>system\n{system}<|im_end|>\n"),
                "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
                "<|im_end|>",
                true,
                "\n",
                &["<|im_end|>", "<|endoftext|>"],
            ),
            PromptTemplate::Gemma => (
                Some("<start_of_turn>system\n{system}<end_of_turn>\n"),
                "<start_of_turn>user\n{input}<end_of_turn>\n<start_of_turn>model\n",
                "<end_of_turn>",
                false,
                "\n",
                &["<end_of_turn>"],
            ),
            PromptTemplate::CohereChat => (
                Some("<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{system}<|END_OF_TURN_TOKEN|>"),
                "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{input}<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
                "<|END_OF_TURN_TOKEN|>",
                true,
                "",
                &["<|END_OF_TURN_TOKEN|>"],
            ),
            PromptTemplate::Llama3Chat => (
                Some("<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"),
                "<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                "<|eot_id|>",
                true,
                "",
                &["<|eot_id|>"],
            ),
            PromptTemplate::Phi3Chat => (
                Some("<|system|>\n{system}<|end|>\n"),
                "<|user|>\n{input}<|end|>\n<|assistant|>\n",
                "<|end|>",
                true,
                "\n",
                &["<|end|>"],
            ),
        };
        ChatTemplate {
            name: self.name().to_string(),
            system: system.map(str::to_string),
            instruction: instruction.to_string(),
            suffix: suffix.to_string(),
            suffix_as_eos,
            sep: sep.to_string(),
            stop_words: stop_words.iter().map(|w| w.to_string()).collect(),
        }
    }
}

impl fmt::Display for PromptTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PromptTemplate {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self, Error> {
        PROMPT_TEMPLATES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
            .ok_or_else(|| Error::UnknownTemplate {
                name: name.to_string(),
                valid: names(PROMPT_TEMPLATES),
            })
    }
}

/// The system prompts XTuner defines (`SYSTEM_TEMPLATE`), by their XTuner names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SystemTemplate {
    /// XTuner's `moss_sft` system prompt.
    MossSft,
    /// XTuner's `alpaca` system prompt.
    Alpaca,
    /// XTuner's `arxiv_gentile` system prompt.
    ArxivGentile,
    /// XTuner's `colorist` system prompt.
    Colorist,
    /// XTuner's `coder` system prompt.
    Coder,
    /// XTuner's `lawyer` system prompt.
    Lawyer,
    /// XTuner's `medical` system prompt.
    Medical,
    /// XTuner's `sql` system prompt.
    Sql,
}

const SYSTEM_TEMPLATES: &[(&str, SystemTemplate)] = &[
    ("moss_sft", SystemTemplate::MossSft),
    ("alpaca", SystemTemplate::Alpaca),
    ("arxiv_gentile", SystemTemplate::ArxivGentile),
    ("colorist", SystemTemplate::Colorist),
    ("coder", SystemTemplate::Coder),
    ("lawyer", SystemTemplate::Lawyer),
    ("medical", SystemTemplate::Medical),
    ("sql", SystemTemplate::Sql),
];

impl SystemTemplate {
    /// Every system template, in XTuner's order.
    pub fn all() -> impl Iterator<Item = SystemTemplate> {
        SYSTEM_TEMPLATES.iter().map(|(_, t)| *t)
    }

    /// XTuner's name for it.
    pub fn name(self) -> &'static str {
        SYSTEM_TEMPLATES
            .iter()
            .find(|(_, t)| *t == self)
            .map_or("", |(n, _)| n)
    }

    /// The system prompt text (`moss_sft` still holds its `{bot_name}` placeholder; see
    /// [`SystemTemplate::text_for_bot`]).
    pub fn text(self) -> &'static str {
        match self {
            SystemTemplate::MossSft => {
                "You are an AI assistant whose name is {bot_name}.\nCapabilities and tools that {bot_name} can possess.\n- Inner thoughts: enabled.\n- Web search: enabled. API: Search(query)\n- Calculator: enabled. API: Calculate(expression)\n- Equation solver: enabled. API: Solve(equation)\n- Text-to-image: disabled.\n- Image edition: disabled.\n- Text-to-speech: disabled.\n"
            }
            SystemTemplate::Alpaca => {
                "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n"
            }
            SystemTemplate::ArxivGentile => {
                "If you are an expert in writing papers, please generate a good paper title for this paper based on other authors' descriptions of their abstracts.\n"
            }
            SystemTemplate::Colorist => {
                "You are a professional color designer. Please provide the corresponding colors based on the description of Human.\n"
            }
            SystemTemplate::Coder => {
                "You are a professional programer. Please provide the corresponding code based on the description of Human.\n"
            }
            SystemTemplate::Lawyer => {
                "你现在是一名专业的中国律师，请根据用户的问题给出准确、有理有据的回复。\n"
            }
            SystemTemplate::Medical => "如果你是一名医生，请根据患者的描述回答医学问题。\n",
            SystemTemplate::Sql => {
                "If you are an expert in SQL, please generate a good SQL Query for Question based on the CREATE TABLE statement.\n"
            }
        }
    }

    /// The text with `{bot_name}` replaced, as `xtuner chat --bot-name` does.
    pub fn text_for_bot(self, bot_name: &str) -> String {
        self.text().replace("{bot_name}", bot_name)
    }
}

impl fmt::Display for SystemTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SystemTemplate {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self, Error> {
        SYSTEM_TEMPLATES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
            .ok_or_else(|| Error::UnknownSystemTemplate {
                name: name.to_string(),
                valid: names(SYSTEM_TEMPLATES),
            })
    }
}

macro_rules! serde_by_name {
    ($ty:ty) => {
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.name())
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let name = String::deserialize(deserializer)?;
                name.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

serde_by_name!(PromptTemplate);
serde_by_name!(SystemTemplate);

fn names<T>(table: &[(&str, T)]) -> String {
    table.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for t in PromptTemplate::all() {
            assert_eq!(t.name().parse::<PromptTemplate>().unwrap(), t);
            assert_eq!(t.template().name, t.name());
        }
        for t in SystemTemplate::all() {
            assert_eq!(t.name().parse::<SystemTemplate>().unwrap(), t);
        }
    }

    #[test]
    fn unknown_names_list_the_valid_ones() {
        let err = "internlm3_chat"
            .parse::<PromptTemplate>()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("internlm3_chat") && err.contains("internlm2_chat"),
            "{err}"
        );
        let err = "pirate".parse::<SystemTemplate>().unwrap_err().to_string();
        assert!(err.contains("pirate") && err.contains("alpaca"), "{err}");
    }
}
