//! `palisade`, offline: the objects a set of Palisade resources produces (the operator's own
//! translation), the webhook's verdict on manifests (its own decision), the effective
//! authorization of a workload across AuthPolicies (the model the semantic tests hold against
//! Istio), and expected outcomes checked in CI. Nothing here talks to a cluster: every function
//! takes objects and returns what the cluster components would decide.

pub mod admit;
pub mod advisories;
pub mod input;
pub mod render;
pub mod sbom;
pub mod suite;
pub mod who_can;
