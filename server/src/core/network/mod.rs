//! Per-sandbox networking (`network: "nat"`): slots, the ledger entries of
//! namespaces, and setting up / tearing down through `host::net`.

pub mod slots;

use forkd_api::names::SandboxId;

use super::runtime::Runtime;
use super::store::SandboxSettings;
use super::{Error, Result};
use crate::host::net::{self, SandboxNet};

impl Runtime {
    /// The egress deny-list in force now: the operator's (flags, built-in
    /// entries, bind address) plus the host's current addresses.
    pub fn egress_deny(&self) -> Vec<net::AllowRule> {
        net::effective_deny(&self.config.egress_deny, &net::host_addresses())
    }

    /// Validates the network settings of a spawn request; an allow entry
    /// wholly inside the deny-list is refused naming `allow`.
    pub fn check_network(&self, settings: &SandboxSettings) -> Result<()> {
        match settings.network.as_str() {
            "" | "none" => {
                if !settings.allow.is_empty() {
                    return Err(Error::invalid("allow", "an allow-list needs network \"nat\""));
                }
                Ok(())
            }
            "nat" => net::parse_allow(&settings.allow)
                .and_then(|allow| net::check_allow(&allow, &self.egress_deny()))
                .map_err(|e| Error::InvalidArgument(e.to_string())),
            other => Err(Error::invalid("network", format!("{other:?}: use \"none\" or \"nat\""))),
        }
    }

    /// Creates the sandbox's namespace, tap and egress rules when it asked
    /// for "nat"; recorded in the ledger before anything exists.
    pub(crate) async fn net_setup(&self, id: &SandboxId, settings: &SandboxSettings) -> Result<Option<SandboxNet>> {
        if settings.network != "nat" {
            return Ok(None);
        }
        let allow = net::parse_allow(&settings.allow).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        self.net_create(id, allow).await.map(Some)
    }

    /// Gives a network made ahead of time (a pooled child's, made with no
    /// egress at all) the egress rules of the fork that takes it.
    pub(crate) async fn net_take(&self, n: &SandboxNet, settings: &SandboxSettings) -> Result<()> {
        let allow = net::parse_allow(&settings.allow).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let deny = self.egress_deny();
        net::check_allow(&allow, &deny).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let n = n.clone();
        tokio::task::spawn_blocking(move || net::apply_rules(&n, &allow, &deny))
            .await
            .map_err(|e| Error::internal("network rules", e))?
            .map_err(|e| Error::Internal(format!("network rules: {e}")))
    }

    /// Creates a namespace, tap and egress rules (`allow` on top of the
    /// deny-list) for `id`; recorded in the ledger before anything exists.
    pub(crate) async fn net_create(&self, id: &SandboxId, allow: Vec<net::AllowRule>) -> Result<SandboxNet> {
        let deny = self.egress_deny();
        net::check_allow(&allow, &deny).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let slot = self.net_slots.take()?;
        let name = net::netns_name(id);
        self.store.ledger_add("netns", &name, id.as_str())?;
        let id2 = id.clone();
        let result = tokio::task::spawn_blocking(move || net::setup(&id2, slot, &allow, &deny))
            .await
            .map_err(|e| Error::internal("network setup", e))?;
        match result {
            Ok(n) => Ok(n),
            Err(e) => {
                let _ = self.store.ledger_remove("netns", &name);
                self.net_slots.free(slot);
                Err(Error::Internal(format!("network setup: {e}")))
            }
        }
    }

    /// Removes what `net_setup` made. Idempotent.
    pub(crate) async fn net_teardown(&self, n: &SandboxNet) {
        let (ns, link) = (n.netns.clone(), n.host_link.clone());
        let _ = tokio::task::spawn_blocking(move || net::teardown(&ns, &link)).await;
        let _ = self.store.ledger_remove("netns", &n.netns);
        self.net_slots.free(n.slot);
    }

    /// Marks a slot as taken by an adopted sandbox.
    pub(crate) fn net_adopt(&self, n: &SandboxNet) {
        self.net_slots.mark(n.slot);
    }
}
