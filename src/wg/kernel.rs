//! Kernel WireGuard over generic netlink (the `wireguard` family).
//!
//! The link itself is made over rtnetlink (kind `wireguard`); keys, port and
//! peers go over generic netlink: WG_CMD_SET_DEVICE split into messages of at
//! most [`genl::MAX_SET_MESSAGE`] bytes, WG_CMD_GET_DEVICE read as a
//! multi-part dump. The family id is resolved once, when the backend opens.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_generic::GenlMessage;
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_sys::protocols::NETLINK_GENERIC;

use super::genl::{self, DumpParser, MAX_SET_MESSAGE, WG_GENL_NAME};
use super::{Backend, BackendKind, DeviceState, DeviceUpdate, WireCost};
use crate::netlink::Rtnl;
use crate::netlink::socket::{NlError, NlSocket};

/// How long `modprobe wireguard` may take before we give up on it.
const MODPROBE_DEADLINE: Duration = Duration::from_secs(10);

pub struct KernelBackend {
    genl: NlSocket,
    family: u16,
    rtnl: Rtnl,
}

impl KernelBackend {
    /// Opens the backend when the `wireguard` genl family exists, loading the
    /// module once if it does not.
    pub fn open() -> Result<KernelBackend> {
        let mut genl = NlSocket::open(NETLINK_GENERIC).context("opening generic netlink socket")?;
        let family = match resolve_family(&mut genl) {
            Ok(Some(id)) => id,
            Ok(None) => {
                load_module();
                resolve_family(&mut genl)
                    .map_err(|e| anyhow!("looking up generic netlink family \"{WG_GENL_NAME}\": {e}"))?
                    .ok_or_else(|| {
                        anyhow!(
                            "kernel WireGuard not available: generic netlink family \"{WG_GENL_NAME}\" \
                             not found (module not loaded?)"
                        )
                    })?
            }
            Err(e) => bail!("looking up generic netlink family \"{WG_GENL_NAME}\": {e}"),
        };
        let rtnl = Rtnl::open()?;
        Ok(KernelBackend { genl, family, rtnl })
    }

    /// The resolved generic netlink family id of `wireguard`.
    pub fn family_id(&self) -> u16 {
        self.family
    }

    fn index_of(&mut self, ifname: &str) -> Result<u32> {
        self.rtnl
            .link_index(ifname)?
            .ok_or_else(|| anyhow!("no such interface {ifname}"))
    }
}

/// CTRL_CMD_GETFAMILY for "wireguard": `Ok(None)` when the kernel does not
/// know the family (ENOENT).
fn resolve_family(sock: &mut NlSocket) -> Result<Option<u16>, NlError> {
    let mut genl = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(WG_GENL_NAME.to_string())],
    });
    genl.finalize();
    let seq = sock.next_seq();
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = seq;
    let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(genl));
    nl.finalize();
    let mut bytes = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut bytes);
    sock.send(&bytes)?;
    let mut id = None;
    let result = sock.answer(seq, |m| {
        let parsed = NetlinkMessage::<GenlMessage<GenlCtrl>>::deserialize(m.bytes)
            .map_err(|e| NlError::Malformed(e.to_string()))?;
        if let NetlinkPayload::InnerMessage(g) = parsed.payload {
            for attr in g.payload.nlas {
                if let GenlCtrlAttrs::FamilyId(f) = attr {
                    id = Some(f);
                }
            }
        }
        Ok(())
    });
    match result {
        Ok(()) if id.is_some() => Ok(id),
        Ok(()) => Err(NlError::Malformed("family answer without an id".into())),
        Err(NlError::Kernel(e)) if e == libc::ENOENT => Ok(None),
        Err(e) => Err(e),
    }
}

/// Runs `modprobe wireguard`, bounded; failure is not an error here (the
/// family lookup that follows says what is missing).
fn load_module() {
    let child = Command::new("modprobe")
        .arg("wireguard")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return };
    let deadline = Instant::now() + MODPROBE_DEADLINE;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
        }
    }
}

impl Backend for KernelBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Kernel
    }

    fn exists(&mut self, ifname: &str) -> Result<bool> {
        Ok(self
            .rtnl
            .link(ifname)?
            .is_some_and(|l| l.kind.as_deref() == Some("wireguard")))
    }

    fn create(&mut self, ifname: &str) -> Result<()> {
        self.rtnl.create_wireguard_link(ifname)?;
        Ok(())
    }

    fn delete(&mut self, ifname: &str) -> Result<()> {
        let index = self
            .index_of(ifname)
            .with_context(|| format!("deleting {ifname}"))?;
        self.rtnl.delete_link(index)
    }

    fn get(&mut self, ifname: &str) -> Result<DeviceState> {
        crate::netlink::check_name(ifname)?;
        let seq = self.genl.next_seq();
        let bytes = genl::frame(
            genl::get_request(ifname),
            self.family,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
        );
        let family = self.family;
        let mut parser = DumpParser::new();
        let result = self.genl.send(&bytes).and_then(|()| {
            self.genl.answer(seq, |m| {
                if m.message_type != family {
                    return Err(NlError::Malformed(format!(
                        "message type {} in dump",
                        m.message_type
                    )));
                }
                parser.feed(m.payload).map_err(NlError::Malformed)
            })
        });
        match result {
            Ok(()) => Ok(parser.finish()),
            Err(NlError::Kernel(e)) if e == libc::ENODEV => {
                bail!("reading {ifname}: no such WireGuard interface")
            }
            Err(e) => bail!("reading {ifname}: {e}"),
        }
    }

    fn set(&mut self, ifname: &str, update: &DeviceUpdate) -> Result<WireCost> {
        crate::netlink::check_name(ifname)?;
        let msgs = genl::encode_set(ifname, update, MAX_SET_MESSAGE);
        let total = msgs.len();
        let mut cost = WireCost::default();
        for (i, msg) in msgs.into_iter().enumerate() {
            let seq = self.genl.next_seq();
            let bytes = genl::frame(msg, self.family, NLM_F_REQUEST | NLM_F_ACK, seq);
            let result = self
                .genl
                .send(&bytes)
                .and_then(|()| self.genl.answer(seq, |_| Ok(())));
            if let Err(e) = result {
                let what = if total > 1 {
                    format!(
                        " (message {} of {total}, {} peers in update)",
                        i + 1,
                        update.peers.len()
                    )
                } else {
                    String::new()
                };
                return Err(match e {
                    NlError::Kernel(errno) if errno == libc::ENODEV => {
                        anyhow!("configuring {ifname}: no such WireGuard interface")
                    }
                    e => anyhow!("configuring {ifname}{what}: {e}"),
                });
            }
            cost.messages += 1;
            cost.bytes += bytes.len();
        }
        Ok(cost)
    }
}
