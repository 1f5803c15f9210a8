//! Control messages, sealed inside Noise frames and encoded as JSON.
//!
//! JSON keeps the protocol inspectable and tolerant of added fields (older
//! peers ignore fields they do not know); the channel already bounds and
//! authenticates every message, so its size is the only cost.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::keys::Key;
use crate::wg::AllowedIp;

/// Version of the message set. A coordinator refuses nodes with a different
/// major version with a clear error instead of misreading them.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest name or hostname accepted in a message; names are DNS labels.
pub const MAX_NAME_LEN: usize = 63;
/// Most endpoint candidates a node may report at once.
pub const MAX_CANDIDATES: usize = 32;

/// Node → coordinator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// First message of an enrolled node (its key is already known).
    Hello {
        version: u32,
        hostname: String,
        candidates: Vec<SocketAddr>,
        /// See [`ClientMessage::Join::online_by_id`].
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        online_by_id: bool,
        /// See [`Advertised`].
        #[serde(default, skip_serializing_if = "Advertised::is_empty")]
        advertise: Advertised,
        /// See [`ClientMessage::Join::policy`].
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        policy: bool,
    },
    /// First message of a new node: redeems an invite.
    Join {
        version: u32,
        /// The invite secret from the join token.
        secret: String,
        /// Name the node asks for; the invite's name, if any, wins.
        name: Option<String>,
        hostname: String,
        candidates: Vec<SocketAddr>,
        /// The node reads [`ServerMessage::PeerMapDelta`]'s `online` and
        /// `offline` lists; without it, every change is a whole entry in
        /// `upsert` (what agents from before these lists understand).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        online_by_id: bool,
        /// See [`Advertised`].
        #[serde(default, skip_serializing_if = "Advertised::is_empty")]
        advertise: Advertised,
        /// The node reads [`ServerMessage::Policy`] and enforces it; an
        /// agent from before policies is never sent one.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        policy: bool,
    },
    /// The node's current endpoint candidates (replaces the previous set).
    Candidates {
        endpoints: Vec<SocketAddr>,
    },
    /// The node switches to a new WireGuard key; proven by this channel's old key.
    RotateKey {
        new_public_key: Key,
    },
    /// The node is going down on purpose; mark it offline now.
    Goodbye,
    Ping {
        nonce: u64,
    },
    /// First message of a separate relay (its relay key, listed in the
    /// coordinator's `--relay`): stream me the mesh's member keys.
    SubscribeMembers {
        version: u32,
    },
}

/// Most prefixes a node may advertise behind it.
pub const MAX_ADVERTISED_ROUTES: usize = 64;

/// What a node offers to carry for the others, sent with every Hello and
/// Join (it replaces what the node offered before); an administrator
/// approves it before anyone uses it (see `src/coord/routes.rs`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advertised {
    /// IPv4 prefixes behind the node (its LAN).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<AllowedIp>,
    /// The node offers itself as an exit node (0.0.0.0/0).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exit: bool,
}

impl Advertised {
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && !self.exit
    }
}

/// One node as every other node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub id: u64,
    pub name: String,
    pub mesh_addr: Ipv4Addr,
    pub public_key: Key,
    pub candidates: Vec<SocketAddr>,
    pub online: bool,
    /// The relay this node listens on; others send to it through this relay
    /// when no direct path exists. `None` when the mesh has no relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home_relay: Option<Key>,
    /// Prefixes behind this node (its LAN) that it advertises and an
    /// administrator approved: other nodes route them to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<AllowedIp>,
    /// The node offers itself as an exit node and an administrator approved
    /// it: a node that chooses it sends its default route through it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exit: bool,
}

/// A relay the coordinator publishes: nodes dial it and prove their key to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    pub public_key: Key,
    /// `host:port` addresses to dial, tried in order.
    pub addrs: Vec<String>,
}

/// A WG-STUN server the coordinator publishes: nodes keep it as a WireGuard
/// peer (allowed IP 100.64.0.4/32) and ask it, through their own tunnel, for
/// the public mapping of their WireGuard socket; `stun` answers plain STUN
/// for the agent's check socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WgStunInfo {
    pub public_key: Key,
    /// `host:port` of its WireGuard socket (UDP).
    pub endpoint: String,
    /// `host:port` of its plain STUN socket (UDP), when it runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stun: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The invite secret is not known (wrong server or forged token).
    InviteUnknown,
    InviteExpired,
    InviteUsed,
    /// The node's key is not enrolled (removed, rotated away, or never joined).
    UnknownNode,
    /// The node was removed by an administrator.
    Removed,
    Version,
    /// The connection broke the protocol: bad frame, bad message, too fast.
    Protocol,
    RateLimited,
    /// The coordinator failed (e.g. its database); retrying later may help.
    Internal,
}

impl ErrorCode {
    /// Whether a node should keep retrying after this error or give up.
    pub fn is_permanent(self) -> bool {
        !matches!(
            self,
            ErrorCode::Internal | ErrorCode::RateLimited | ErrorCode::Protocol
        )
    }
}

/// Coordinator → node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Accepted: who the node is in the mesh.
    Welcome {
        version: u32,
        node: PeerInfo,
        /// Every relay of the mesh; each node's `home_relay` names one of them.
        #[serde(default)]
        relays: Vec<RelayInfo>,
        /// The mesh's WG-STUN servers; the agent uses the first it can reach.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        wgstun: Vec<WgStunInfo>,
    },
    /// Every node of the mesh, the receiver included (it finds itself by id).
    PeerMap {
        version: u64,
        nodes: Vec<PeerInfo>,
    },
    /// Changes since `version - 1`. `upsert` replaces whole entries by id.
    PeerMapDelta {
        version: u64,
        upsert: Vec<PeerInfo>,
        remove: Vec<u64>,
        /// Nodes whose only change is that they came online (went offline),
        /// by id: a few bytes each instead of a whole entry, since after a
        /// coordinator restart every node hears of every other's return.
        /// Only for nodes that said `online_by_id`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        online: Vec<u64>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        offline: Vec<u64>,
    },
    /// The access policy in force, to nodes that said `policy`: right after
    /// Welcome (before the map, so a node knows what to enforce before it
    /// adds a peer) and whenever it changes. `None`: no policy, every node
    /// may reach every other.
    Policy {
        policy: Option<crate::control::policy::Policy>,
    },
    /// Refusal or failure, followed by the coordinator closing the connection.
    Error {
        code: ErrorCode,
        reason: String,
    },
    Pong {
        nonce: u64,
    },
    /// To a subscribed relay: every member's key; replaces what it had.
    Members {
        keys: Vec<Key>,
    },
    /// To a subscribed relay: changes to the member set since the last message.
    MembersDelta {
        added: Vec<Key>,
        removed: Vec<Key>,
    },
}

pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serialising these plain types cannot fail (no maps with non-string keys).
    serde_json::to_vec(msg).unwrap_or_default()
}

pub fn decode_client(bytes: &[u8]) -> Result<ClientMessage> {
    let msg: ClientMessage = serde_json::from_slice(bytes).context("decoding control message")?;
    msg.check()?;
    Ok(msg)
}

pub fn decode_server(bytes: &[u8]) -> Result<ServerMessage> {
    serde_json::from_slice(bytes).context("decoding control message")
}

impl ClientMessage {
    /// Limits the coordinator enforces on what a node may send.
    fn check(&self) -> Result<()> {
        if let ClientMessage::Hello { advertise, .. } | ClientMessage::Join { advertise, .. } = self
            && advertise.routes.len() > MAX_ADVERTISED_ROUTES
        {
            anyhow::bail!(
                "{} advertised routes exceed the limit of {MAX_ADVERTISED_ROUTES}",
                advertise.routes.len()
            );
        }
        let (names, candidates): (Vec<&str>, &[SocketAddr]) = match self {
            ClientMessage::Hello {
                hostname, candidates, ..
            } => (vec![hostname], candidates),
            ClientMessage::Join {
                secret,
                name,
                hostname,
                candidates,
                ..
            } => {
                let mut v = vec![hostname.as_str(), secret.as_str()];
                v.extend(name.as_deref());
                (v, candidates)
            }
            ClientMessage::Candidates { endpoints } => (vec![], endpoints),
            _ => (vec![], &[]),
        };
        if let Some(n) = names.iter().find(|n| n.len() > 255) {
            anyhow::bail!("field of {} bytes is longer than 255", n.len());
        }
        if candidates.len() > MAX_CANDIDATES {
            anyhow::bail!(
                "{} endpoint candidates exceed the limit of {MAX_CANDIDATES}",
                candidates.len()
            );
        }
        Ok(())
    }
}

/// Entry for the fuzz target and the no-panic test.
pub fn fuzz_decode(data: &[u8]) {
    let _ = decode_client(data);
    let _ = decode_server(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerInfo {
        PeerInfo {
            id: 3,
            name: "nas".into(),
            mesh_addr: Ipv4Addr::new(100, 64, 0, 9),
            public_key: Key::generate_private().public_key(),
            candidates: vec!["192.168.1.5:51820".parse().unwrap()],
            online: true,
            home_relay: Some(Key([7; 32])),
            routes: Vec::new(),
            exit: false,
        }
    }

    #[test]
    fn a_coordinator_without_relays_is_understood() {
        // What a coordinator from before relays sends: no relay fields at all.
        let welcome = r#"{"type":"welcome","version":1,"node":{"id":3,"name":"nas",
            "mesh_addr":"100.64.0.9","public_key":"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
            "candidates":[],"online":true}}"#;
        match decode_server(welcome.as_bytes()).unwrap() {
            ServerMessage::Welcome { node, relays, .. } => {
                assert!(relays.is_empty());
                assert_eq!(node.home_relay, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn round_trips() {
        let msgs = vec![
            ServerMessage::Welcome {
                version: PROTOCOL_VERSION,
                node: peer(),
                relays: vec![RelayInfo {
                    public_key: Key([7; 32]),
                    addrs: vec!["relay.example:7778".into()],
                }],
                wgstun: vec![WgStunInfo {
                    public_key: Key([8; 32]),
                    endpoint: "stun.example:3479".into(),
                    stun: None,
                }],
            },
            ServerMessage::PeerMap {
                version: 1,
                nodes: vec![peer(), peer()],
            },
            ServerMessage::PeerMapDelta {
                version: 2,
                upsert: vec![peer()],
                remove: vec![4],
                online: vec![],
                offline: vec![],
            },
            ServerMessage::PeerMapDelta {
                version: 3,
                upsert: vec![],
                remove: vec![],
                online: vec![5, 6],
                offline: vec![7],
            },
            ServerMessage::Error {
                code: ErrorCode::InviteUsed,
                reason: "invite already used".into(),
            },
            ServerMessage::Pong { nonce: 5 },
            ServerMessage::Policy { policy: None },
            ServerMessage::Policy {
                policy: Some(crate::control::policy::Policy {
                    digest: "0123456789abcdef".into(),
                    tags: [("nas".to_string(), vec!["nas".to_string()])].into(),
                    accept: vec![crate::control::policy::Rule {
                        from: vec!["*".into()],
                        to: vec!["tag:nas".into()],
                        ports: vec!["tcp/22".into()],
                    }],
                }),
            },
        ];
        for m in msgs {
            assert_eq!(decode_server(&encode(&m)).unwrap(), m);
        }
        let join = ClientMessage::Join {
            version: 1,
            secret: "s".into(),
            name: None,
            hostname: "box".into(),
            candidates: vec![],
            online_by_id: true,
            advertise: Default::default(),
            policy: false,
        };
        assert_eq!(decode_client(&encode(&join)).unwrap(), join);
    }

    /// What agents and coordinators from before `online_by_id` send and read.
    #[test]
    fn online_by_id_is_invisible_to_those_that_do_not_know_it() {
        let hello = r#"{"type":"hello","version":1,"hostname":"nas","candidates":[]}"#;
        assert!(matches!(
            decode_client(hello.as_bytes()).unwrap(),
            ClientMessage::Hello {
                online_by_id: false,
                policy: false,
                ..
            }
        ));
        let plain = ServerMessage::PeerMapDelta {
            version: 2,
            upsert: vec![peer()],
            remove: vec![],
            online: vec![],
            offline: vec![],
        };
        let text = String::from_utf8(encode(&plain)).unwrap();
        assert!(
            !text.contains("online\":[") && !text.contains("offline"),
            "{text}"
        );
        let old = ClientMessage::Hello {
            version: 1,
            hostname: "nas".into(),
            candidates: vec![],
            online_by_id: false,
            advertise: Default::default(),
            policy: false,
        };
        assert_eq!(
            String::from_utf8(encode(&old)).unwrap(),
            r#"{"type":"hello","version":1,"hostname":"nas","candidates":[]}"#
        );
    }

    #[test]
    fn unknown_fields_are_ignored_for_forward_compatibility() {
        let m = br#"{"type":"ping","nonce":1,"future":true}"#;
        assert_eq!(decode_client(m).unwrap(), ClientMessage::Ping { nonce: 1 });
    }

    #[test]
    fn limits_are_enforced() {
        let many = ClientMessage::Candidates {
            endpoints: vec!["1.2.3.4:5".parse().unwrap(); 33],
        };
        assert!(decode_client(&encode(&many)).is_err());
        let long = ClientMessage::Hello {
            version: 1,
            hostname: "x".repeat(300),
            candidates: vec![],
            online_by_id: false,
            advertise: Default::default(),
            policy: false,
        };
        assert!(decode_client(&encode(&long)).is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let base = encode(&ServerMessage::PeerMap {
            version: 1,
            nodes: vec![peer()],
        });
        for cut in 0..base.len() {
            fuzz_decode(&base[..cut]);
            let mut flipped = base.clone();
            flipped[cut] ^= 0x5a;
            fuzz_decode(&flipped);
        }
    }
}
