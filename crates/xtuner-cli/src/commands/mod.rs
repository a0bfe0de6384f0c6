//! One module per group of commands; each takes parsed arguments and prints its output.

pub mod cfg;
pub mod chat;
pub mod collective;
pub mod data;
pub mod preference;
pub mod tokenize;
pub mod tokens;
pub mod train;
