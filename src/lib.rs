//! dvmm facade (placeholder).
pub use dvmm_core as core;
