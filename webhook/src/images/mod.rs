//! Image signatures and attestations: [`verify`] checks cosign signatures and in-toto
//! attestations over fetched blobs (pure), [`registry`] fetches them from an OCI registry with
//! every call bounded by a deadline.

pub mod admit;
pub mod check;
pub mod pin;
pub mod policy;
pub mod reference;
pub mod registry;
pub mod verify;
