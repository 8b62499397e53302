//! The three custom resources of `sync.meshline.io/v1alpha1` and the types they share.
//!
//! This module owns the wire shape of the API and nothing else: no I/O, no reconcile logic. Field docs become
//! the CRD descriptions that `kubectl explain` shows, so they are written for the people who apply manifests.
//! Cross-field rules that the API server can enforce are declared here as `x-kubernetes-validations`; the
//! rules that need other objects (a flow's contract, a roster's owners) live in `crate::validate`.

mod audit;
mod common;
mod contract;
mod flow;
mod roster;

pub use audit::*;
pub use common::*;
pub use contract::*;
pub use flow::*;
pub use roster::*;

/// The API group of every Meshline kind.
pub const GROUP: &str = "sync.meshline.io";
/// The only served and stored version.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` as written in manifests.
pub const API_VERSION: &str = "sync.meshline.io/v1alpha1";
