//! The snapshot store on disk: where each snapshot's files live, staging and
//! renaming them into place, their digests, dirty-page capture and diff
//! layers.

pub mod digest;
pub mod dirty;
pub mod layer;
pub mod layout;

pub use layout::Layout;
