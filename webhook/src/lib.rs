//! Palisade's admission webhook. Every check reads the pod spec through [`pods`], so no kind of
//! container (init, ephemeral) and no workload kind escapes a check.

pub mod pods;
