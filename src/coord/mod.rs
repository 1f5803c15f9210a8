//! The coordinator: enrollment, names, addresses, and the peer map it pushes to nodes.

pub mod names;
pub mod store;
