//! The control protocol between a node's agent and the coordinator:
//! framing, the Noise IK channel, and the messages carried in it.

pub mod channel;
pub mod frame;
pub mod messages;
pub mod noise;
pub mod policy;
