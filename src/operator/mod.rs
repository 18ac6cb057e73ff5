//! The operator: it issues, rotates and revokes the keys that ApiKeys declare.
//!
//! - [`core`]: the pure decision core: observations in, steps and status out.
//! - [`reconciler`]: the I/O shell that observes, asks the core and carries out
//!   the steps in a crash-safe order.
//! - [`secret_cache`]: what the metadata-only Secret watch knows of each Secret.
//! - [`controller`]: the kube-runtime Controller, finalizer, start-up, leader
//!   election and the HTTP endpoints.
//! - [`wire`]: how the ApiKey watch decodes objects (once, still tolerating
//!   ones the types cannot read).

pub mod controller;
pub mod core;
pub mod reconciler;
pub mod secret_cache;
pub mod wire;
