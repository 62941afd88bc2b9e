//! The snapshot store on disk: where each snapshot's files live, staging and
//! renaming them into place, their digests, dirty-page capture, diff
//! layers, and archives that carry snapshots between hosts.

pub mod digest;
pub mod dirty;
pub mod layer;
pub mod layout;
pub mod pack;

pub use layout::Layout;
