//! What the server tells operators: Prometheus metrics and apps' logs.

pub mod logs;
pub mod metrics;
