//! What both engines share.
