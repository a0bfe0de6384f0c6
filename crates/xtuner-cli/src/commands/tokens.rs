//! What the data and preference commands share: where a config's tokenizer is, the Jinja
//! template preference data is rendered with, and tokens shown as text.

use std::path::Path;

use anyhow::{Context, Result, bail};
use xtuner_dataset::{IGNORE_INDEX, Tokenizer};
use xtuner_engine::LoadedConfig;
use xtuner_template::JinjaTemplate;

/// The tokenizer a config names: `tokenizer.path`, else the model directory.
pub fn tokenizer_path(config: &LoadedConfig) -> Result<&Path> {
    config
        .config
        .tokenizer_path()
        .context("the config names no tokenizer")
}

/// The Jinja chat template preference data is rendered with: the tokenizer directory's
/// own (no `--template`, or `--template chat_template`), or a `.jinja` file.
pub fn jinja_template(tokenizer: &Path, template: Option<&str>) -> Result<JinjaTemplate> {
    match template {
        None | Some("chat_template") => {
            JinjaTemplate::from_tokenizer_dir(tokenizer)?.with_context(|| {
                format!(
                    "the tokenizer at {} has no chat_template (tokenizer_config.json or \
                     chat_template.jinja); give one with --template FILE.jinja",
                    tokenizer.display()
                )
            })
        }
        Some(file) if file.ends_with(".jinja") => {
            Ok(JinjaTemplate::from_file(Path::new(file), tokenizer)?)
        }
        Some(other) => bail!(
            "preference data is rendered with a Jinja chat template: leave out --template \
             (the tokenizer's own), or give `chat_template` or a .jinja file, not `{other}`"
        ),
    }
}

/// Decodes ids, writing `<image>` where an image goes.
pub fn decode(tokenizer: &Tokenizer, ids: &[i64]) -> Result<String> {
    let mut out = String::new();
    for (is_image, run) in runs(ids, |&id| id < 0) {
        if is_image {
            out.push_str(&xtuner_template::tokens::IMAGE_TOKEN.repeat(run.len()));
        } else {
            let run: Vec<u32> = run
                .iter()
                .filter_map(|&id| u32::try_from(id).ok())
                .collect();
            out.push_str(&tokenizer.decode(&run)?);
        }
    }
    Ok(out)
}

/// Trained spans decoded, each untrained span shown as one `[-100]`.
pub fn masked_text(tokenizer: &Tokenizer, labels: &[i64]) -> Result<String> {
    let mut out = String::new();
    for (ignored, run) in runs(labels, |&l| l == IGNORE_INDEX) {
        if ignored {
            out.push_str("[-100]");
        } else {
            out.push_str(&decode(tokenizer, run)?);
        }
    }
    Ok(out)
}

/// Splits a slice into maximal runs with the same value of `key`.
fn runs<T>(items: &[T], key: impl Fn(&T) -> bool) -> Vec<(bool, &[T])> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=items.len() {
        if i == items.len() || key(&items[i]) != key(&items[start]) {
            out.push((key(&items[start]), &items[start..i]));
            start = i;
        }
    }
    out
}
