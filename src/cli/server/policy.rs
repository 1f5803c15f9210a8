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
