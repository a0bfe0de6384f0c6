//! What this crate's tests share: the path of the golden fixtures. Integration tests
//! use it as `mod common;`, the unit tests through `crate::test_support`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// `path` under the shared golden fixtures (`../shared/fixtures`, beside the clone).
pub fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures")
        .join(path)
}
