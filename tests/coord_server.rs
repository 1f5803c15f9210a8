//! The real coordinator on loopback, driven by in-process clients speaking
//! the real protocol over TCP.

mod common;
use common::TempDir;

use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use warren::control::channel::Channel;
use warren::control::messages::{
    self, ClientMessage, ErrorCode, PROTOCOL_VERSION, PeerInfo, RelayInfo, ServerMessage,
};
use warren::coord::admin::{self, AdminRequest, AdminResponse};
use warren::coord::invite::JoinToken;
use warren::coord::server::{Server, ServerConfig, Stopper};
use warren::keys::Key;

/// Generous: the CPU is shared; a healthy run takes milliseconds.
const DEADLINE: Duration = Duration::from_secs(15);

struct TestServer {
    addr: SocketAddr,
    key: Key,
    admin: PathBuf,
    stopper: Stopper,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    fn start(dir: &TempDir) -> TestServer {
        TestServer::start_with_relays(dir, vec![])
    }

    /// A coordinator publishing these relays (`warren server --relay`).
    fn start_with_relays(dir: &TempDir, relays: Vec<RelayInfo>) -> TestServer {
        let cfg = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            state_dir: dir.0.join("state"),
            db: dir.0.join("state/server.db"),
            advertise: vec![],
        };
        let mut server = Server::bind(&cfg).unwrap();
        server.set_relays(relays);
        let (addr, key, stopper) = (server.local_addr(), server.public_key(), server.stopper());
        let thread = std::thread::spawn(move || server.run().unwrap());
        TestServer {
            addr,
            key,
            admin: cfg.admin_socket(),
            stopper,
            thread: Some(thread),
        }
    }

    fn admin(&self, req: AdminRequest) -> anyhow::Result<AdminResponse> {
        admin::request(&self.admin, &req)
    }

    fn invite(&self, reusable: bool, expires_in: Option<i64>) -> JoinToken {
        match self
            .admin(AdminRequest::Invite {
                reusable,
                expires_in,
                name: None,
            })
            .unwrap()
        {
            AdminResponse::Invite { token, .. } => JoinToken::parse(&token).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    fn stop(mut self) {
        self.stopper.stop();
        self.thread.take().unwrap().join().unwrap();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stopper.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A node's side of the protocol, blocking, with the peer map it has been told.
struct Client {
    stream: TcpStream,
    ch: Channel,
    me: Option<PeerInfo>,
    map: HashMap<u64, PeerInfo>,
    error: Option<(ErrorCode, String)>,
    closed: bool,
    pongs: Vec<u64>,
    /// The member keys, when subscribed as a relay.
    members: Option<HashSet<Key>>,
}

impl Client {
    fn connect(server: &TestServer, private: &Key, first: ClientMessage) -> Client {
        Client::connect_pinned(server.addr, &server.key, private, first)
    }

    fn connect_pinned(addr: SocketAddr, server_key: &Key, private: &Key, first: ClientMessage) -> Client {
        Client::connect_raw(addr, server_key, private, &messages::encode(&first))
    }

    /// Opens with `first` as it is: a message the coordinator may or may not accept.
    fn connect_raw(addr: SocketAddr, server_key: &Key, private: &Key, first: &[u8]) -> Client {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut ch = Channel::client(private, server_key).unwrap();
        ch.send(first).unwrap();
        let mut c = Client {
            stream,
            ch,
            me: None,
            map: HashMap::new(),
            error: None,
            closed: false,
            pongs: Vec::new(),
            members: None,
        };
        c.flush();
        c
    }

    fn join(server: &TestServer, token: &JoinToken, private: &Key, hostname: &str) -> Client {
        let msg = ClientMessage::Join {
            version: PROTOCOL_VERSION,
            secret: token.secret.clone(),
            name: None,
            hostname: hostname.into(),
            candidates: vec![],
            online_by_id: false,
            advertise: Default::default(),
            policy: false,
        };
        Client::connect(server, private, msg)
    }

    fn hello(server: &TestServer, private: &Key) -> Client {
        let msg = ClientMessage::Hello {
            version: PROTOCOL_VERSION,
            hostname: "h".into(),
            candidates: vec![],
            online_by_id: false,
            advertise: Default::default(),
            policy: false,
        };
        Client::connect(server, private, msg)
    }

    fn send(&mut self, msg: &ClientMessage) {
        self.ch.send(&messages::encode(msg)).unwrap();
        self.flush();
    }

    fn flush(&mut self) {
        let out = self.ch.outgoing().to_vec();
        if self.stream.write_all(&out).is_ok() {
            self.ch.consume_outgoing(out.len());
        }
    }

    /// Reads and applies messages until `done` holds or the deadline passes.
    fn until(&mut self, what: &str, mut done: impl FnMut(&Client) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        let mut buf = [0u8; 65536];
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            if self.closed {
                panic!(
                    "connection closed while waiting for: {what} (error {:?})",
                    self.error
                );
            }
            match self.stream.read(&mut buf) {
                Ok(0) => self.closed = true,
                Ok(n) => {
                    if self.ch.receive(&buf[..n]).is_err() {
                        self.closed = true;
                    }
                    self.flush();
                    while let Some(raw) = self.ch.next_message() {
                        self.apply(messages::decode_server(&raw).unwrap());
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => self.closed = true,
            }
        }
    }

    fn apply(&mut self, msg: ServerMessage) {
        match msg {
            ServerMessage::Welcome { node, .. } => self.me = Some(node),
            ServerMessage::PeerMap { nodes, .. } => self.map = nodes.into_iter().map(|n| (n.id, n)).collect(),
            ServerMessage::PeerMapDelta { upsert, remove, .. } => {
                for id in remove {
                    self.map.remove(&id);
                }
                for n in upsert {
                    self.map.insert(n.id, n);
                }
            }
            ServerMessage::Error { code, reason } => self.error = Some((code, reason)),
            ServerMessage::Pong { nonce } => self.pongs.push(nonce),
            // These nodes do not say `policy`: never sent one.
            ServerMessage::Policy { .. } => panic!("a policy to a node that did not ask for policies"),
            ServerMessage::Members { keys } => self.members = Some(keys.into_iter().collect()),
            ServerMessage::MembersDelta { added, removed } => {
                let m = self.members.get_or_insert_default();
                for k in removed {
                    m.remove(&k);
                }
                m.extend(added);
            }
        }
    }

    fn welcomed(&mut self) -> PeerInfo {
        self.until("welcome", |c| c.me.is_some());
        self.me.clone().unwrap()
    }

    fn refused(&mut self) -> (ErrorCode, String) {
        self.until("an error and the close", |c| c.error.is_some() && c.closed);
        self.error.clone().unwrap()
    }

    fn peer(&self, id: u64) -> Option<&PeerInfo> {
        self.map.get(&id)
    }
}

fn node_names(server: &TestServer) -> Vec<(String, std::net::Ipv4Addr, bool)> {
    match server.admin(AdminRequest::Nodes).unwrap() {
        AdminResponse::Nodes { nodes } => nodes
            .into_iter()
            .map(|n| (n.name, n.mesh_addr, n.online))
            .collect(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn join_peer_map_rename_rotate_and_remove_propagate() {
    let dir = TempDir::new("coord-test");
    let server = TestServer::start(&dir);
    let token = server.invite(true, None);
    assert_eq!(token.servers, vec![server.addr.to_string()]);

    let ka = Key::generate_private();
    let mut a = Client::join(&server, &token, &ka, "NAS.local");
    let me_a = a.welcomed();
    assert_eq!(
        (me_a.name.as_str(), me_a.mesh_addr.to_string().as_str()),
        ("nas", "100.64.0.8")
    );
    assert_eq!(me_a.public_key, ka.public_key());

    let kb = Key::generate_private();
    let mut b = Client::join(&server, &token, &kb, "nas");
    let me_b = b.welcomed();
    assert_eq!(me_b.name, "nas-2");
    b.until("b sees a online", |c| c.peer(me_a.id).is_some_and(|p| p.online));
    a.until("a sees b online", |c| {
        c.peer(me_b.id).is_some_and(|p| p.online && p.name == "nas-2")
    });

    // Candidates a node reports are not published: they travel sealed between
    // agents, never through the coordinator. The pong shows they were read
    // before the rename republishes b.
    let ep: SocketAddr = "192.168.1.20:51820".parse().unwrap();
    b.send(&ClientMessage::Candidates { endpoints: vec![ep] });
    b.send(&ClientMessage::Ping { nonce: 7 });
    b.until("b's pong", |c| c.pongs.contains(&7));

    server
        .admin(AdminRequest::Rename {
            node: "nas-2".into(),
            new_name: "backup".into(),
        })
        .unwrap();
    a.until("a sees the rename", |c| {
        c.peer(me_b.id).is_some_and(|p| p.name == "backup")
    });
    assert!(a.peer(me_b.id).unwrap().candidates.is_empty());
    b.until("b sees its rename", |c| {
        c.peer(me_b.id).is_some_and(|p| p.name == "backup")
    });
    assert!(b.peer(me_b.id).unwrap().candidates.is_empty());

    // Key rotation keeps id, name and address; the old key is no longer enrolled.
    let kb2 = Key::generate_private();
    b.send(&ClientMessage::RotateKey {
        new_public_key: kb2.public_key(),
    });
    a.until("a sees b's new key", |c| {
        c.peer(me_b.id).is_some_and(|p| p.public_key == kb2.public_key())
    });
    drop(b);
    a.until("a sees b offline", |c| c.peer(me_b.id).is_some_and(|p| !p.online));
    let mut b = Client::hello(&server, &kb2);
    let again = b.welcomed();
    assert_eq!(
        (again.id, again.name.as_str(), again.mesh_addr),
        (me_b.id, "backup", me_b.mesh_addr)
    );
    let (code, _) = Client::hello(&server, &kb).refused();
    assert_eq!(code, ErrorCode::UnknownNode);

    // Removal: the node is dropped from every map, told why, and cannot come back.
    server
        .admin(AdminRequest::Remove {
            node: "backup".into(),
        })
        .unwrap();
    a.until("a sees b removed", |c| c.peer(me_b.id).is_none());
    let (code, reason) = b.refused();
    assert_eq!(
        (code, reason.as_str()),
        (ErrorCode::Removed, "this node was removed from the mesh")
    );
    let (code, reason) = Client::hello(&server, &kb2).refused();
    assert_eq!(
        (code, reason.as_str()),
        (ErrorCode::Removed, "node backup was removed from the mesh")
    );
    let (code, _) = Client::join(&server, &token, &kb2, "x").refused();
    assert_eq!(code, ErrorCode::Removed);
    assert_eq!(node_names(&server).len(), 1);
}

#[test]
fn bad_tokens_are_refused_with_a_reason() {
    let dir = TempDir::new("coord-test");
    let server = TestServer::start(&dir);
    let once = server.invite(false, None);
    Client::join(&server, &once, &Key::generate_private(), "first").welcomed();
    let (code, reason) = Client::join(&server, &once, &Key::generate_private(), "second").refused();
    assert_eq!(
        (code, reason.as_str()),
        (
            ErrorCode::InviteUsed,
            "invite was already used (it is single-use)"
        )
    );

    let mut forged = once.clone();
    forged.secret = JoinToken::new(vec![], server.key).secret;
    let (code, reason) = Client::join(&server, &forged, &Key::generate_private(), "x").refused();
    assert_eq!(code, ErrorCode::InviteUnknown);
    assert!(reason.starts_with("invite not recognised"), "{reason}");

    // A token that expires in one second: joins work, then stop working.
    let short = server.invite(true, Some(1));
    let deadline = Instant::now() + DEADLINE;
    let (code, reason) = loop {
        assert!(Instant::now() < deadline, "the invite never expired");
        let mut c = Client::join(&server, &short, &Key::generate_private(), "t");
        c.until("welcome or error", |c| c.me.is_some() || c.error.is_some());
        if let Some(e) = c.error.take() {
            break e;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(code, ErrorCode::InviteExpired);
    assert!(reason.starts_with("invite expired "), "{reason}");

    // A token pinning another coordinator's key fails the handshake; nothing is enrolled.
    let before = node_names(&server).len();
    let other = Key::generate_private().public_key();
    let msg = ClientMessage::Join {
        version: PROTOCOL_VERSION,
        secret: once.secret.clone(),
        name: None,
        hostname: "x".into(),
        candidates: vec![],
        online_by_id: false,
        advertise: Default::default(),
        policy: false,
    };
    let mut c = Client::connect_pinned(server.addr, &other, &Key::generate_private(), msg);
    c.until("the server hangs up", |c| c.closed);
    assert!(c.me.is_none());
    assert_eq!(node_names(&server).len(), before);
}

#[test]
fn garbage_and_oversized_frames_close_only_that_connection() {
    let dir = TempDir::new("coord-test");
    let server = TestServer::start(&dir);
    let token = server.invite(true, None);
    let mut good = Client::join(&server, &token, &Key::generate_private(), "good");
    good.welcomed();

    let expect_closed = |mut s: TcpStream, what: &str| {
        s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let deadline = Instant::now() + DEADLINE;
        let mut buf = [0u8; 1024];
        loop {
            assert!(
                Instant::now() < deadline,
                "server kept the {what} connection open"
            );
            match s.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return,
            }
        }
    };
    let mut http = TcpStream::connect(server.addr).unwrap();
    http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    expect_closed(http, "HTTP");
    let mut huge = TcpStream::connect(server.addr).unwrap();
    huge.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2]).unwrap();
    expect_closed(huge, "oversized frame");
    // Garbage after a proper handshake too.
    let mut c = Client::join(&server, &token, &Key::generate_private(), "evil");
    c.welcomed();
    c.stream
        .write_all(&[0, 0, 0, 9, 1, 2, 0, 0, 0, 0, 0, 0, 0])
        .unwrap();
    c.until("the server hangs up on bad sealed data", |c| c.closed);

    // The well-behaved node is still served.
    good.send(&ClientMessage::Ping { nonce: 1 });
    let id = c.me.as_ref().unwrap().id;
    good.until("evil goes offline in good's map", |g| {
        g.peer(id).is_some_and(|p| !p.online)
    });
}

/// Before its Hello or Join a connection is anyone's (a join token carries
/// the coordinator's key): it may send one small message, unfragmented. A
/// valid Join over 4 KiB, or fragmented, is refused before it is read; once
/// the node is known, its messages may be fragmented up to 64 KiB.
#[test]
fn before_hello_a_connection_may_send_only_one_small_message() {
    let dir = TempDir::new("coord-test");
    let server = TestServer::start(&dir);
    let token = server.invite(true, None);
    // JSON allows trailing whitespace: the padding keeps the Join valid.
    let padded = |msg: &ClientMessage, to: usize| {
        let mut m = messages::encode(msg);
        m.resize(to, b' ');
        m
    };
    let join = ClientMessage::Join {
        version: PROTOCOL_VERSION,
        secret: token.secret.clone(),
        name: None,
        hostname: "big".into(),
        candidates: vec![],
        online_by_id: false,
        advertise: Default::default(),
        policy: false,
    };
    for (what, len) in [("a 5 KiB join", 5000), ("a fragmented join", 70_000)] {
        let mut c = Client::connect_raw(
            server.addr,
            &server.key,
            &Key::generate_private(),
            &padded(&join, len),
        );
        c.until(&format!("the server hangs up on {what}"), |c| c.closed);
        assert!(c.me.is_none(), "{what} was welcomed");
    }
    assert!(node_names(&server).is_empty(), "nothing enrolled");

    let mut c = Client::connect_raw(
        server.addr,
        &server.key,
        &Key::generate_private(),
        &padded(&join, 3000),
    );
    c.welcomed();
    let ping = |nonce| ClientMessage::Ping { nonce };
    c.ch.send(&padded(&ping(1), 60_000)).unwrap();
    c.flush();
    c.until("the pong to a 60 KB ping", |c| c.pongs.contains(&1));
    c.ch.send(&padded(&ping(2), 70_000)).unwrap();
    c.flush();
    c.until("the server hangs up on a 70 KB message", |c| c.closed);
    assert!(!c.pongs.contains(&2));
}

#[test]
fn restart_keeps_names_and_addresses() {
    let dir = TempDir::new("coord-test");
    let server = TestServer::start(&dir);
    let token = server.invite(true, None);
    let ka = Key::generate_private();
    let me = Client::join(&server, &token, &ka, "router").welcomed();
    Client::join(&server, &token, &Key::generate_private(), "router").welcomed();
    let before = node_names(&server);
    server.stop();

    let server = TestServer::start(&dir);
    let after: Vec<_> = node_names(&server).into_iter().map(|(n, a, _)| (n, a)).collect();
    assert_eq!(
        after,
        before.into_iter().map(|(n, a, _)| (n, a)).collect::<Vec<_>>()
    );
    let mut a = Client::hello(&server, &ka);
    assert_eq!(
        a.welcomed(),
        PeerInfo {
            online: true,
            ..me.clone()
        }
    );
    assert_eq!(a.map.len(), 2);
}

/// Only a relay the coordinator publishes may subscribe to the member keys
/// (a stranger's key and a node's key are refused); it gets every member,
/// then each join, key rotation and removal as it happens.
#[test]
fn a_published_relay_learns_the_members_and_others_may_not_subscribe() {
    let dir = TempDir::new("coord-test");
    let relay = Key::generate_private();
    let server = TestServer::start_with_relays(
        &dir,
        vec![RelayInfo {
            public_key: relay.public_key(),
            addrs: vec!["127.0.0.1:1".into()],
        }],
    );
    let token = server.invite(true, None);
    let a = Key::generate_private();
    let mut na = Client::join(&server, &token, &a, "a");
    na.welcomed();
    let subscribe = ClientMessage::SubscribeMembers {
        version: PROTOCOL_VERSION,
    };
    for (who, key) in [("a stranger", Key::generate_private()), ("a node", a)] {
        let (code, reason) = Client::connect(&server, &key, subscribe.clone()).refused();
        assert_eq!(code, ErrorCode::UnknownNode, "{who}");
        assert!(
            reason.contains("is not a relay of this coordinator"),
            "{who}: {reason}"
        );
    }
    let has = |c: &Client, k: &Key| c.members.as_ref().is_some_and(|m| m.contains(&k.public_key()));
    let count = |c: &Client| c.members.as_ref().map_or(0, HashSet::len);
    let mut r = Client::connect(&server, &relay, subscribe);
    r.until("the member set", |c| has(c, &a) && count(c) == 1);

    let b = Key::generate_private();
    let mut nb = Client::join(&server, &token, &b, "b");
    nb.welcomed();
    r.until("b's join", |c| has(c, &b) && count(c) == 2);
    let b2 = Key::generate_private();
    nb.send(&ClientMessage::RotateKey {
        new_public_key: b2.public_key(),
    });
    r.until("b's rotated key in place of its old one", |c| {
        has(c, &b2) && !has(c, &b) && count(c) == 2
    });
    server
        .admin(AdminRequest::Remove {
            node: a.public_key().to_base64(),
        })
        .unwrap();
    r.until("a's removal", |c| !has(c, &a) && has(c, &b2) && count(c) == 1);
    // It stays subscribed by pinging, as nodes do.
    r.send(&ClientMessage::Ping { nonce: 9 });
    r.until("a pong", |c| c.pongs.contains(&9));
    server.stop();
}
