//! Security identities: a number per (namespace, label set), the same on every node.
//!
//! The number travels in `skb->mark` between the TC hooks of one node:
//! `mark = (identity << 8) | MARK_MAGIC_IDENTITY`.

/// A numeric security identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity(pub u32);
