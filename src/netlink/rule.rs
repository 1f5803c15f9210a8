//! IPv4 policy-routing rules (`ip rule`): what exit-node routing needs — a
//! priority, an optional (inverted) fwmark match, a table to look up, and
//! wg-quick's `suppress_prefixlength`.

use anyhow::{Result, anyhow};
use netlink_packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};

use super::Rtnl;
use super::addr::AF_INET;
use super::attr::{Request, attrs, split_header, u32_at};
use super::route::header_table;
use super::socket::NlError;

// From <linux/rtnetlink.h> and <linux/fib_rules.h>.
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const RTM_GETRULE: u16 = 34;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_SUPPRESS_PREFIXLEN: u16 = 14;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const FIB_RULE_INVERT: u32 = 0x2;
const FR_ACT_TO_TBL: u8 = 1;
/// `struct fib_rule_hdr`: family, dst_len, src_len, tos, table, res1, res2,
/// action (u8 each), flags (u32).
const FIB_RULE_HDR_LEN: usize = 12;

/// One rule: "from all [not] fwmark M lookup TABLE [suppress_prefixlength N]"
/// at `priority`. A mark is matched whole (mask 0xffffffff).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleSpec {
    pub priority: u32,
    pub fwmark: Option<u32>,
    /// "not fwmark": the rule matches packets without the mark.
    pub invert: bool,
    pub table: u32,
    pub suppress_prefixlen: Option<u32>,
}

impl std::fmt::Display for RuleSpec {
    /// As `ip rule` prints it: "1000: not from all fwmark 0xca6c lookup 51820".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: ", self.priority)?;
        if self.invert {
            f.write_str("not ")?;
        }
        f.write_str("from all")?;
        if let Some(mark) = self.fwmark {
            write!(f, " fwmark {mark:#x}")?;
        }
        write!(f, " lookup {}", self.table)?;
        if let Some(len) = self.suppress_prefixlen {
            write!(f, " suppress_prefixlength {len}")?;
        }
        Ok(())
    }
}

fn fib_rule_hdr(table: u32, action: u8, flags: u32) -> [u8; FIB_RULE_HDR_LEN] {
    let mut h = [0u8; FIB_RULE_HDR_LEN];
    h[0] = AF_INET;
    h[4] = header_table(table);
    h[7] = action;
    h[8..12].copy_from_slice(&flags.to_ne_bytes());
    h
}

fn rule_request(kind: u16, rule: &RuleSpec) -> Request {
    let flags = if rule.invert { FIB_RULE_INVERT } else { 0 };
    let mut req = Request::new(kind, &fib_rule_hdr(rule.table, FR_ACT_TO_TBL, flags));
    req.u32(FRA_PRIORITY, rule.priority).u32(FRA_TABLE, rule.table);
    if let Some(mark) = rule.fwmark {
        req.u32(FRA_FWMARK, mark).u32(FRA_FWMASK, u32::MAX);
    }
    if let Some(len) = rule.suppress_prefixlen {
        req.u32(FRA_SUPPRESS_PREFIXLEN, len);
    }
    req
}

/// Parses an RTM_NEWRULE payload. Rules other than "lookup a table" (goto,
/// blackhole, ...) come back with their header's table, usually 0.
pub(super) fn parse_rule(payload: &[u8]) -> Result<RuleSpec, NlError> {
    let (header, rest) = split_header::<FIB_RULE_HDR_LEN>(payload, "fib_rule_hdr")?;
    let mut rule = RuleSpec {
        priority: 0,
        fwmark: None,
        invert: u32_at(header, 8) & FIB_RULE_INVERT != 0,
        table: header[4] as u32,
        suppress_prefixlen: None,
    };
    for attr in attrs(rest, "rule") {
        let attr = attr?;
        match attr.kind {
            FRA_PRIORITY => rule.priority = attr.u32("FRA_PRIORITY")?,
            FRA_FWMARK => rule.fwmark = Some(attr.u32("FRA_FWMARK")?),
            FRA_TABLE => rule.table = attr.u32("FRA_TABLE")?,
            // The kernel sends it only when set (it keeps -1 for unset).
            FRA_SUPPRESS_PREFIXLEN => {
                let len = attr.u32("FRA_SUPPRESS_PREFIXLEN")?;
                rule.suppress_prefixlen = (len != u32::MAX).then_some(len);
            }
            _ => {}
        }
    }
    Ok(rule)
}

impl Rtnl {
    /// Adds an IPv4 rule; one that already exists is an error naming it.
    pub fn add_rule(&mut self, rule: &RuleSpec) -> Result<()> {
        self.request(rule_request(RTM_NEWRULE, rule), NLM_F_CREATE | NLM_F_EXCL)
            .map_err(|e| anyhow!("adding rule \"{rule}\": {e}"))?;
        Ok(())
    }

    /// Removes an IPv4 rule; one that is already gone is fine.
    pub fn del_rule(&mut self, rule: &RuleSpec) -> Result<()> {
        match self.request(rule_request(RTM_DELRULE, rule), 0) {
            Ok(_) => Ok(()),
            Err(NlError::Kernel(e)) if e == libc::ENOENT => Ok(()),
            Err(e) => Err(anyhow!("removing rule \"{rule}\": {e}")),
        }
    }

    /// Every IPv4 rule, in the kernel's order (by priority).
    pub fn rules_v4(&mut self) -> Result<Vec<RuleSpec>> {
        let req = Request::new(RTM_GETRULE, &fib_rule_hdr(0, 0, 0));
        let msgs = self
            .request(req, NLM_F_DUMP)
            .map_err(|e| anyhow!("listing rules: {e}"))?;
        msgs.iter()
            .filter(|m| m.kind == RTM_NEWRULE)
            .map(|m| parse_rule(&m.payload))
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow!("listing rules: {e}"))
    }
}
