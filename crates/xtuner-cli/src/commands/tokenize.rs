//! `xtuner tokenize`: ids and pieces of a text.

use std::path::Path;

use anyhow::Result;
use xtuner_dataset::Tokenizer;

/// Prints the ids and pieces of `text` encoded without special tokens.
pub fn tokenize(tokenizer: &Path, text: &str, json: bool) -> Result<()> {
    let tokenizer = Tokenizer::from_path(tokenizer)?;
    let encoded = tokenizer.encode_pieces(text)?;
    let (ids, pieces): (Vec<u32>, Vec<String>) = encoded.into_iter().unzip();
    if json {
        println!("{}", serde_json::json!({ "ids": ids, "pieces": pieces }));
    } else {
        println!("{} tokens", ids.len());
        for (id, piece) in ids.iter().zip(&pieces) {
            println!("{id:>8}  {piece:?}");
        }
    }
    Ok(())
}
