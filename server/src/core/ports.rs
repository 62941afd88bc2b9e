//! Guest ports: connections to a server inside a sandbox (over the agent
//! channel, see agent::ports), and the links that share one port without a
//! token.
//!
//! A share is an unguessable token (256 random bits) naming a sandbox and a
//! port. Shares live in memory: they end with their sandbox, with
//! UnsharePort, or when the daemon restarts (sharing again makes a new one).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use forkd_api::names::SandboxId;
use tokio::io::DuplexStream;

use super::{Error, Result, Runtime};

/// How long connecting to a guest port may take.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Most shares per sandbox and in the whole daemon.
const MAX_SHARES_PER_SANDBOX: usize = 16;
const MAX_SHARES: usize = 4096;

/// A TCP port number, 1–65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GuestPort(u16);

impl GuestPort {
    pub fn new(field: &str, port: u32) -> Result<GuestPort> {
        u16::try_from(port)
            .ok()
            .filter(|p| *p > 0)
            .map(GuestPort)
            .ok_or_else(|| Error::invalid(field, format!("{port} is not a TCP port (1-65535)")))
    }

    pub fn parse(field: &str, s: &str) -> Result<GuestPort> {
        let n = s.parse::<u32>().map_err(|_| Error::invalid(field, format!("{s:?} is not a port number")))?;
        GuestPort::new(field, n)
    }

    pub fn get(self) -> u16 {
        self.0
    }
}

/// Why a guest port could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Nothing listens on the port (a proxy answers 502).
    #[error("{0}")]
    NotListening(String),
    #[error(transparent)]
    Other(#[from] Error),
}

#[derive(Debug, Clone)]
pub struct Share {
    pub sandbox: SandboxId,
    pub port: GuestPort,
    pub token: String,
    pub created_unix: i64,
}

impl Share {
    pub fn path(&self) -> String {
        format!("/v1/shared/{}/", self.token)
    }
}

/// The daemon's port links, by token.
#[derive(Default)]
pub struct Shares {
    by_token: Mutex<HashMap<String, Share>>,
}

fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl Shares {
    /// The sandbox's link for `port`, made if it has none.
    pub fn share(&self, sandbox: &SandboxId, port: GuestPort) -> Result<Share> {
        let mut g = self.by_token.lock().unwrap();
        if let Some(s) = g.values().find(|s| &s.sandbox == sandbox && s.port == port) {
            return Ok(s.clone());
        }
        if g.values().filter(|s| &s.sandbox == sandbox).count() >= MAX_SHARES_PER_SANDBOX {
            return Err(Error::ResourceExhausted(format!(
                "sandbox {sandbox} already shares {MAX_SHARES_PER_SANDBOX} ports; unshare one first"
            )));
        }
        if g.len() >= MAX_SHARES {
            return Err(Error::ResourceExhausted(format!("the daemon holds {MAX_SHARES} port shares")));
        }
        let s = Share { sandbox: sandbox.clone(), port, token: new_token(), created_unix: super::now_unix() };
        g.insert(s.token.clone(), s.clone());
        Ok(s)
    }

    pub fn list(&self, sandbox: &SandboxId) -> Vec<Share> {
        let mut v: Vec<Share> =
            self.by_token.lock().unwrap().values().filter(|s| &s.sandbox == sandbox).cloned().collect();
        v.sort_by_key(|s| s.port.get());
        v
    }

    pub fn unshare(&self, sandbox: &SandboxId, port: GuestPort) -> bool {
        let mut g = self.by_token.lock().unwrap();
        let before = g.len();
        g.retain(|_, s| !(&s.sandbox == sandbox && s.port == port));
        g.len() != before
    }

    /// Keeps only the links of sandboxes `live` says are still there.
    pub fn retain(&self, live: impl Fn(&SandboxId) -> bool) {
        self.by_token.lock().unwrap().retain(|_, s| live(&s.sandbox));
    }

    /// The share a token names. Compared in constant time per entry, so the
    /// answer's timing says nothing about how much of a token was right.
    pub fn lookup(&self, token: &str) -> Option<Share> {
        use subtle::ConstantTimeEq;
        let g = self.by_token.lock().unwrap();
        g.values().find(|s| bool::from(s.token.as_bytes().ct_eq(token.as_bytes()))).cloned()
    }
}

impl Runtime {
    /// The sandbox's link for `port` (links of sandboxes that are gone
    /// are dropped first).
    pub async fn share_port(&self, id: &SandboxId, port: GuestPort) -> Result<Share> {
        self.agent_of(id).await?;
        let live = self.sandboxes.read().await;
        self.port_shares.retain(|s| live.contains_key(s.as_str()));
        drop(live);
        self.port_shares.share(id, port)
    }

    /// Connects to `port` on the sandbox's loopback through its agent.
    pub async fn open_port(&self, id: &SandboxId, port: GuestPort) -> std::result::Result<DuplexStream, OpenError> {
        let sb = self.agent_of(id).await?;
        match sb.agent.open_port(port.get(), OPEN_TIMEOUT).await {
            Ok(io) => Ok(io),
            Err(crate::agent::AgentError::Guest { kind, message })
                if kind == forkd_agent_protocol::v1::agent_error::Kind::NotFound as i32 =>
            {
                Err(OpenError::NotListening(message))
            }
            Err(e) => Err(OpenError::Other(e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_checked_and_shares_are_unique_per_port() {
        assert!(GuestPort::new("port", 0).is_err());
        assert!(GuestPort::new("port", 65536).is_err());
        assert!(GuestPort::parse("port", "80x").is_err());
        assert_eq!(GuestPort::parse("port", "8000").unwrap().get(), 8000);
        let shares = Shares::default();
        let a = crate::core::ids::new_sandbox_id();
        let p = GuestPort::new("port", 8000).unwrap();
        let s1 = shares.share(&a, p).unwrap();
        assert_eq!(s1.token.len(), 43);
        assert_eq!(shares.share(&a, p).unwrap().token, s1.token, "sharing again answers the same link");
        assert_eq!(shares.lookup(&s1.token).unwrap().port, p);
        assert!(shares.lookup("nope").is_none());
        assert!(shares.unshare(&a, p));
        assert!(shares.lookup(&s1.token).is_none());
        let s2 = shares.share(&a, p).unwrap();
        assert_ne!(s2.token, s1.token, "a new share gets a new token");
        shares.retain(|_| false);
        assert!(shares.list(&a).is_empty());
    }
}
