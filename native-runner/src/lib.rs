//! Lode's native engine: sandboxed Linux containers for Python and GPU workloads.
//!
//! This crate owns image builds (a Debian base through debootstrap, then `pip_install`,
//! `apt_install` and `run_commands` steps, each cached by the hash of its parent and itself),
//! container start on a lazy root filesystem (overlayfs over the `fs` mount, `pivot_root`,
//! pid/mount/net/uts/ipc/cgroup namespaces, cgroup limits, seccomp, rlimits, no network unless
//! asked), and (with issue 6) the in-container Python agent that serves calls over a Unix socket.
//!
//! It must not route HTTP: the host decides what runs where and hands this crate a spec.
//! Here now: the [`sandbox`] (namespaces, a `nosuid,nodev` overlay root, a minimal `/dev`,
//! dropped capabilities, `no_new_privs`, the [`seccomp`] allow-list, volumes cloned from
//! descriptors, outbound network behind the [`egress`] filter, and a [`userns`] whose root is
//! an unprivileged host uid), [`cgroup`] limits and the device allow-list, the [`image_spec`]
//! and its [`builder`] (each step on a capped [`layer_disk`]), [`oci`] import, and function
//! containers whose Python [`agent`] serves calls over a Unix socket.
#![deny(missing_docs)]

pub mod agent;
mod build_env;
pub mod builder;
pub mod cgroup;
pub mod egress;
pub mod image_spec;
pub mod layer_disk;
pub mod oci;
pub mod redact;
pub mod sandbox;
pub mod seccomp;
pub mod userns;
