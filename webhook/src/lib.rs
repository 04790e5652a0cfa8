//! Palisade's admission webhook. Every check reads the pod through [`workload`] (Pods and the
//! pod templates of every workload kind) and its containers through [`pods`] (init, regular and
//! ephemeral), so no kind of object or container escapes a check.

pub mod cluster;
pub mod config;
pub mod decide;
pub mod identity;
pub mod images;
pub mod pods;
pub mod secrets;
pub mod server;
pub mod tls;
pub mod workload;
