//! Users and groups of the guest image, from its /etc/passwd and
//! /etc/group: what an exec's `user` ("name", "uid", "name:group",
//! "uid:gid") runs as.

use crate::server::error;
use forkd_agent_protocol::v1::{AgentError, agent_error::Kind};

/// Who a command runs as.
#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// Names of uids and gids, read once from the guest's files (for listings).
pub struct Names {
    users: Vec<(u32, String)>,
    groups: Vec<(u32, String)>,
}

/// Most of /etc/passwd or /etc/group read (an image's are a few KiB).
const MAX_DB_BYTES: u64 = 4 << 20;

/// /etc/passwd or /etc/group, "" when unreadable.
fn read_db(path: &str) -> String {
    use std::io::Read;
    let mut text = String::new();
    if let Ok(f) = std::fs::File::open(path) {
        // Invalid UTF-8 leaves `text` empty, as an unreadable file does.
        let _ = f.take(MAX_DB_BYTES).read_to_string(&mut text);
    }
    text
}

impl Names {
    pub fn load() -> Names {
        let read = |path: &str| -> Vec<(u32, String)> {
            read_db(path)
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    Some((f.get(2)?.parse().ok()?, f[0].to_string()))
                })
                .collect()
        };
        Names { users: read("/etc/passwd"), groups: read("/etc/group") }
    }

    pub fn user(&self, uid: u32) -> String {
        self.users.iter().find(|(id, _)| *id == uid).map(|(_, n)| n.clone()).unwrap_or_default()
    }

    pub fn group(&self, gid: u32) -> String {
        self.groups.iter().find(|(id, _)| *id == gid).map(|(_, n)| n.clone()).unwrap_or_default()
    }
}

/// `None` for root (or ""), else the account, from the guest's files.
pub fn resolve(user: &str) -> Result<Option<Account>, AgentError> {
    let passwd = read_db("/etc/passwd");
    let group = read_db("/etc/group");
    resolve_in(user, &passwd, &group)
}

fn resolve_in(user: &str, passwd: &str, group: &str) -> Result<Option<Account>, AgentError> {
    if user.is_empty() || user == "root" || user == "0" || user == "0:0" || user == "root:root" {
        return Ok(None);
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    // name:x:uid:gid:gecos:home:shell
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && (f[0] == u || (u.bytes().all(|b| b.is_ascii_digit()) && f[2] == u)));
    let mut account = match (&entry, u.parse::<u32>()) {
        (Some(f), _) => Account {
            name: f[0].to_string(),
            uid: f[2].parse().map_err(|_| error(Kind::Invalid, format!("bad uid for {u} in /etc/passwd")))?,
            gid: f[3].parse().map_err(|_| error(Kind::Invalid, format!("bad gid for {u} in /etc/passwd")))?,
            home: f[5].to_string(),
        },
        // A numeric uid without an entry runs with its own number as gid.
        (None, Ok(uid)) => Account { name: uid.to_string(), uid, gid: uid, home: "/".into() },
        (None, Err(_)) => return Err(error(Kind::NotFound, format!("user {u:?} is not in the image's /etc/passwd"))),
    };
    if let Some(g) = g {
        account.gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| error(Kind::NotFound, format!("group {g:?} is not in the image's /etc/group")))?,
        };
    }
    Ok(Some(account))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nstaff:x:50:\n";

    #[test]
    fn users_by_name_number_and_group() {
        assert_eq!(resolve_in("", PASSWD, GROUP).unwrap(), None);
        assert_eq!(resolve_in("root", PASSWD, GROUP).unwrap(), None);
        let app = resolve_in("app", PASSWD, GROUP).unwrap().unwrap();
        assert_eq!((app.uid, app.gid, app.home.as_str()), (1000, 1000, "/home/app"));
        assert_eq!(resolve_in("1000", PASSWD, GROUP).unwrap().unwrap().name, "app");
        assert_eq!(resolve_in("app:staff", PASSWD, GROUP).unwrap().unwrap().gid, 50);
        assert_eq!(
            resolve_in("4242:7", PASSWD, GROUP).unwrap().unwrap(),
            Account { name: "4242".into(), uid: 4242, gid: 7, home: "/".into() }
        );
        assert!(resolve_in("nobody-here", PASSWD, GROUP).is_err());
        assert!(resolve_in("app:nogroup", PASSWD, GROUP).is_err());
    }
}
