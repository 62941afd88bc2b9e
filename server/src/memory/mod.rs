//! The snapshot store on disk: where each snapshot's files live, staging and
//! renaming them into place, and their digests.

pub mod digest;
pub mod layout;

pub use layout::Layout;
