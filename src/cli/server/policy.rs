//! `warren server policy set FILE | show [--json] | clear`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use crate::cli::out::outln;
use crate::control::policy::MAX_POLICY_BYTES;
use crate::coord::admin::{self, AdminRequest, AdminResponse};

#[derive(Subcommand, Debug)]
pub enum PolicyAction {
    /// Validate a policy file (TOML, see README "Permissions"), store it and
    /// send it to every node; a refused file leaves the policy in force.
    Set { file: PathBuf },
    /// Print the policy in force, as it was set, or say that none is set.
    Show {
        /// `{"text", "digest"}`, both null when no policy is set.
        #[arg(long)]
        json: bool,
    },
    /// Remove the policy: every node may reach every other again.
    Clear,
    /// Benchmark (integration/bench-policy): compile and apply a policy for
    /// PEERS peers with nft in this network namespace, then remove it.
    #[command(hide = true)]
    Bench {
        #[arg(long, default_value_t = 1000)]
        peers: usize,
        #[arg(long, default_value = "wpbench0")]
        interface: String,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
}

impl PolicyAction {
    pub fn json(&self) -> bool {
        matches!(self, PolicyAction::Show { json: true })
    }
}

pub fn run(socket: &Path, action: PolicyAction) -> Result<()> {
    match action {
        PolicyAction::Set { file } => {
            let text = read(&file)?;
            let AdminResponse::Policy {
                digest,
                unknown_names,
                ..
            } = admin::request(socket, &AdminRequest::PolicySet { text })
                .with_context(|| format!("setting the policy from {}", file.display()))?
            else {
                bail!("unexpected answer from the coordinator");
            };
            outln!("policy {} in force", digest.unwrap_or_default())?;
            if !unknown_names.is_empty() {
                log_warn!(
                    "warren: no node is named {} yet (allowed: a node may join under that name)",
                    unknown_names.join(", ")
                );
            }
        }
        PolicyAction::Show { json } => {
            let AdminResponse::Policy { text, digest, .. } =
                admin::request(socket, &AdminRequest::PolicyShow)?
            else {
                bail!("unexpected answer from the coordinator");
            };
            if json {
                crate::cli::out::json(&serde_json::json!({ "text": text, "digest": digest }))?;
            } else {
                match text {
                    Some(t) => {
                        outln!("# policy {}", digest.unwrap_or_default())?;
                        crate::cli::out::write(&t)?;
                        if !t.ends_with('\n') {
                            crate::cli::out::write("\n")?;
                        }
                    }
                    None => outln!("no policy set: every node may reach every other")?,
                }
            }
        }
        PolicyAction::Bench {
            peers,
            interface,
            rounds,
        } => bench(peers, &interface, rounds.max(1))?,
        PolicyAction::Clear => {
            admin::request(socket, &AdminRequest::PolicyClear)?;
            outln!("policy cleared: every node may reach every other")?;
        }
    }
    Ok(())
}

/// The file, refused here already when it is too big to send.
fn read(file: &Path) -> Result<String> {
    let len = std::fs::metadata(file)
        .with_context(|| format!("reading policy file {}", file.display()))?
        .len();
    if len > MAX_POLICY_BYTES as u64 {
        bail!(
            "policy file {} of {len} bytes exceeds the limit of {MAX_POLICY_BYTES}",
            file.display()
        );
    }
    std::fs::read_to_string(file).with_context(|| format!("reading policy file {}", file.display()))
}

/// Times what a node does when the policy or the map changes, on a mesh of
/// `n` peers that are all in the rule's source tag (one set of `n` addresses).
fn bench(n: usize, ifname: &str, rounds: usize) -> Result<()> {
    use std::net::Ipv4Addr;
    use std::time::{Duration, Instant};

    use crate::control::messages::PeerInfo;
    use crate::firewall::{nft, policy::Member, policy::compile};
    use crate::keys::Key;

    let names: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    let text = format!(
        "[tags]\nnas = [\"nas\"]\nlaptop = [{}]\n\n[[accept]]\nfrom = [\"tag:laptop\"]\nto = [\"tag:nas\"]\nports = [\"tcp/22\", \"tcp/445\", \"icmp\"]\n\n[[accept]]\nfrom = [\"*\"]\nto = [\"nas\"]\nports = [\"udp/53\"]\n",
        quoted.join(", ")
    );
    let mut peers: Vec<PeerInfo> = names
        .iter()
        .enumerate()
        .map(|(i, name)| PeerInfo {
            id: i as u64 + 2,
            name: name.clone(),
            mesh_addr: Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 1, 0)) + i as u32),
            public_key: Key([0; 32]),
            candidates: Vec::new(),
            online: true,
            home_relay: None,
            routes: Vec::new(),
            exit: false,
        })
        .collect();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[v.len() - 1])
    };
    let (mut compile_t, mut apply_t, mut change_t) = (Vec::new(), Vec::new(), Vec::new());
    let members = |peers: &[PeerInfo]| -> Vec<(String, Ipv4Addr)> {
        peers.iter().map(|p| (p.name.clone(), p.mesh_addr)).collect()
    };
    for round in 0..rounds {
        // Parsing is the coordinator's part; a node compiles, renders and applies.
        let start = Instant::now();
        let policy = crate::coord::policy::parse(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
        let m = members(&peers);
        let ms_: Vec<Member> = m
            .iter()
            .map(|(name, addr)| Member { name, addr: *addr })
            .collect();
        let rules = compile(&policy, "nas", &ms_);
        let script = nft::render(ifname, &rules);
        compile_t.push(ms(start.elapsed()));
        let t = Instant::now();
        nft::run(&script).context("applying the bench policy")?;
        apply_t.push(ms(t.elapsed()));
        // One peer renamed out of the tag: the whole path of a map change.
        peers[round % n.max(1)].name = format!("gone{round}");
        let t = Instant::now();
        let m = members(&peers);
        let ms_: Vec<Member> = m
            .iter()
            .map(|(name, addr)| Member { name, addr: *addr })
            .collect();
        let rules = compile(&policy, "nas", &ms_);
        nft::run(&nft::render(ifname, &rules)).context("re-applying the bench policy")?;
        change_t.push(ms(t.elapsed()));
        peers[round % n.max(1)].name = names[round % n.max(1)].clone();
        nft::run(&nft::render_remove(ifname)).context("removing the bench table")?;
    }
    let line = |what: &str, v: Vec<f64>, budget: &str| {
        let (med, max) = median(v);
        outln!("policy: {what}, {n} peers, median (max) | {med:.1} ms ({max:.1} ms) | {budget}")
    };
    line("parse + compile + render", compile_t, "-")?;
    line("first apply (nft -f -, one set)", apply_t, "-")?;
    line(
        "compile and apply after a peer changed",
        change_t,
        "<= 2000 ms (a change within 2 s)",
    )?;
    Ok(())
}
