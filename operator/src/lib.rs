//! Palisade's operator. Controllers read Palisade objects, call pure translators
//! (spec → desired objects), apply the result and write status.

pub mod certs;
pub mod config;
pub mod controller;
pub mod diff;
pub mod metrics;
pub mod model;
pub mod names;
pub mod run;
#[cfg(feature = "strategies")]
pub mod strategies;
pub mod translate;
pub mod vault;
