//! Palisade's custom resource types (group `palisade.dev`, version `v1alpha1`).
//!
//! Four kinds: [`AuthPolicy`], [`RateLimitPolicy`], [`SecretBinding`] (namespaced) and
//! [`ImagePolicy`] (cluster-scoped). Their schemas carry the invariants as CEL rules, so the API
//! server refuses bad objects before any controller sees them; [`crdgen`] renders the CRD YAML
//! committed under `crds/`. This crate holds no Kubernetes client and does no I/O.

// `printcolumn(...)` repeats `type_`/`json_path` keys by design; the lint reads them as duplicates.
#![allow(clippy::duplicated_attributes)]

pub mod auth_policy;
pub mod common;
pub mod crddoc;
pub mod crdgen;
pub mod fixtures;
pub mod glob;
pub mod identity;
pub mod image_policy;
pub mod rate_limit_policy;
pub mod secret_binding;

pub use auth_policy::{AuthPolicy, AuthPolicySpec, AuthPolicyStatus};
pub use common::{Duration, GROUP, VERSION};
pub use glob::ImageGlob;
pub use identity::SpiffeId;
pub use image_policy::{ImagePolicy, ImagePolicySpec, ImagePolicyStatus};
pub use rate_limit_policy::{RateLimitPolicy, RateLimitPolicySpec, RateLimitPolicyStatus};
pub use secret_binding::{SecretBinding, SecretBindingSpec, SecretBindingStatus};
