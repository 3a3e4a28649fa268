#![doc = include_str!("../README.md")]

pub mod adapter;
pub mod breaker;
pub mod methods;
pub mod session;
pub mod sim;
pub mod soap;
pub mod tls;
pub mod types;
pub mod wait;

pub use adapter::{SoapVsphere, VM_ID_KEY};
pub use session::SoapOptions;

#[cfg(test)]
mod fixture_tests;
