//! Generation of fresh sandbox ids and snapshot tags.

use forkd_api::names::{SandboxId, Tag};
use rand::Rng;

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

fn random_suffix(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

/// A new random sandbox id (`sb-` + 12 characters).
pub fn new_sandbox_id() -> SandboxId {
    SandboxId::parse(&format!("sb-{}", random_suffix(12))).expect("generated ids are valid")
}

/// A generated tag for a branch of `id` when the caller gave none.
pub fn branch_tag(id: &SandboxId) -> Tag {
    let tag = format!("branch-{}-{}", &id.as_str()[3..], random_suffix(6));
    Tag::parse(&tag).expect("generated tags are valid")
}

/// `len` random characters of `[a-z0-9]`.
pub fn random_name(len: usize) -> String {
    random_suffix(len)
}

/// A short random token for staging names.
pub fn nonce() -> String {
    random_suffix(8)
}
