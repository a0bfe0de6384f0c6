//! Layers shared by every decoder family.

pub mod rms_norm;
pub mod rope;
