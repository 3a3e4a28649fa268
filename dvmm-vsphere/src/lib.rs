#![doc = include_str!("../README.md")]

pub mod adapter;
pub(crate) mod breaker;
pub mod customization;
pub mod events;
pub mod guest_player;
pub mod methods;
pub mod options;
pub mod session;
pub mod sim;
pub mod soap;
pub mod tls;
pub mod transport;
pub mod types;
pub mod wait;

pub use adapter::{SoapVsphere, VM_ID_KEY};
pub use options::SoapOptions;

#[cfg(test)]
mod fixture_tests;
