//! The helpers of `forkd_integration::support`, for every test file.

#![allow(unused_imports)]

pub use forkd_integration::support::*;
