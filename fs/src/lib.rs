//! Lode's lazy, content-addressed filesystem.
//!
//! This crate will own how file trees become blobs and come back: chunking trees into blake3
//! blobs held by a `lode_registry::BlobStore`, the versioned binary **index** format
//! (path → metadata + chunk list), a bounded local chunk cache that verifies every chunk it
//! keeps, and a read-only FUSE mount that fetches chunks on first read and prefetches from
//! recorded access profiles.
//!
//! It must not run processes: containers mount what this crate serves, they are not started
//! here. The foundation slice only reserves the crate; the CAS and FUSE issues fill it.
#![deny(missing_docs)]
