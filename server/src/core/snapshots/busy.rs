//! Snapshot tags with a deletion in progress. Forks, pool fills and a
//! second delete of a busy tag are refused; the mark is a guard dropped on
//! every path (an error, a panic), so no tag stays busy.

use std::collections::HashSet;
use std::sync::Mutex;

#[derive(Default)]
pub struct BusyTags {
    set: Mutex<HashSet<String>>,
}

impl BusyTags {
    /// Marks `tag` busy while the guard lives; `None` if it already is.
    pub fn take(&self, tag: &str) -> Option<BusyTag<'_>> {
        let inserted = self.set.lock().unwrap_or_else(|p| p.into_inner()).insert(tag.to_string());
        inserted.then(|| BusyTag { tags: self, tag: tag.to_string() })
    }

    pub fn contains(&self, tag: &str) -> bool {
        self.set.lock().unwrap_or_else(|p| p.into_inner()).contains(tag)
    }
}

/// A tag marked busy for as long as it lives.
pub struct BusyTag<'a> {
    tags: &'a BusyTags,
    tag: String,
}

impl Drop for BusyTag<'_> {
    fn drop(&mut self) {
        self.tags.set.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.tag);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_tag_is_released_on_every_path() {
        let tags = BusyTags::default();
        {
            let _a = tags.take("py").unwrap();
            assert!(tags.take("py").is_none(), "one holder at a time");
            assert!(tags.contains("py"));
        }
        assert!(!tags.contains("py"));
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _b = tags.take("py").unwrap();
            panic!("mid-delete");
        }));
        assert!(caught.is_err());
        assert!(tags.take("py").is_some(), "released by the unwind");
    }
}
