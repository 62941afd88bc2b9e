//! Property tests of the diff-layer reader on arbitrary, truncated and
//! corrupted files: every input gives `Ok` with a consistent index or a
//! clean `Err`, never a panic, and nothing read from the file sizes an
//! allocation — the largest allocation this test binary ever makes is
//! checked against a small bound by a counting allocator.
//!
//! Case counts are sized so each test finishes in seconds in a debug build.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Cursor;
use std::sync::atomic::{AtomicUsize, Ordering};

use forkd_server::memory::dirty::PAGE;
use forkd_server::memory::layer::{apply, read_index_from, write_layer};
use proptest::prelude::*;

/// Records the largest single allocation requested.
struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LARGEST.fetch_max(new, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Far above any file built here (a few pages) and the test harness's
/// own needs, far below what a count taken from a corrupt header asks for.
const ALLOC_BOUND: usize = 8 << 20;

/// A well-formed layer in memory, in the on-disk format.
fn layer_bytes(pages: &[u64], fill: u8) -> Vec<u8> {
    let mut b = b"FKDIFF01".to_vec();
    b.extend((PAGE as u32).to_le_bytes());
    b.extend((pages.len() as u64).to_le_bytes());
    for p in pages {
        b.extend(p.to_le_bytes());
    }
    b.resize(b.len() + pages.len() * PAGE as usize, fill);
    b
}

#[derive(Debug, Clone)]
enum Damage {
    Truncate(usize),
    Extend(usize),
    Flip(usize, u8),
    Count(u64),
    PageNumber(usize, u64),
    PageSize(u32),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        any::<usize>().prop_map(Damage::Truncate),
        (1usize..5000).prop_map(Damage::Extend),
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Damage::Flip(a, b)),
        prop_oneof![any::<u64>(), Just(u64::MAX), Just(u64::MAX / 8), Just(u64::MAX / (8 + PAGE)), 0u64..10]
            .prop_map(Damage::Count),
        (any::<usize>(), prop_oneof![any::<u64>(), Just(u64::MAX), Just(u64::MAX / PAGE), 0u64..64])
            .prop_map(|(i, p)| Damage::PageNumber(i, p)),
        any::<u32>().prop_map(Damage::PageSize),
    ]
}

fn pages() -> impl Strategy<Value = Vec<u64>> {
    prop::collection::btree_set(0u64..64, 0..5).prop_map(|s| s.into_iter().collect())
}

fn hurt(b: &mut Vec<u8>, d: &Damage) {
    match *d {
        Damage::Truncate(n) => b.truncate(n % (b.len() + 1)),
        Damage::Extend(n) => b.resize(b.len() + n, 0),
        Damage::Flip(at, x) => {
            if !b.is_empty() {
                let at = at % b.len();
                b[at] ^= x;
            }
        }
        Damage::Count(c) => {
            if b.len() >= 20 {
                b[12..20].copy_from_slice(&c.to_le_bytes());
            }
        }
        Damage::PageNumber(i, p) => {
            // Index entries the (possibly resized) file still holds.
            let entries = b.len().saturating_sub(20) / 8;
            if entries > 0 {
                let at = 20 + i % entries * 8;
                b[at..at + 8].copy_from_slice(&p.to_le_bytes());
            }
        }
        Damage::PageSize(s) => {
            if b.len() >= 12 {
                b[8..12].copy_from_slice(&s.to_le_bytes());
            }
        }
    }
}

/// Checks an accepted index against the bytes it came from.
fn consistent(b: &[u8], pages: &[u64], data_off: u64) -> Result<(), TestCaseError> {
    prop_assert_eq!(data_off, 20 + pages.len() as u64 * 8);
    prop_assert_eq!(b.len() as u64, data_off + pages.len() as u64 * PAGE);
    prop_assert!(pages.windows(2).all(|w| w[0] < w[1]));
    for (i, p) in pages.iter().enumerate() {
        let at = 20 + i * 8;
        prop_assert_eq!(u64::from_le_bytes(b[at..at + 8].try_into().unwrap()), *p);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 50_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn damaged_layers_are_rejected_or_consistent(pages in pages(), fill in any::<u8>(), hits in prop::collection::vec(damage(), 0..3)) {
        let mut b = layer_bytes(&pages, fill);
        for d in &hits {
            hurt(&mut b, d);
        }
        let len = b.len() as u64;
        match read_index_from(&mut Cursor::new(&b), len) {
            Ok((got, data_off)) => {
                consistent(&b, &got, data_off)?;
                if hits.is_empty() {
                    prop_assert_eq!(got, pages);
                }
            }
            Err(e) => prop_assert!(!hits.is_empty(), "an intact layer was rejected: {e}"),
        }
        // The reader must not trust its length argument either: a file
        // that is shorter than claimed fails at the read.
        let _ = read_index_from(&mut Cursor::new(&b), len.saturating_mul(2));
        let _ = read_index_from(&mut Cursor::new(&b[..b.len() / 2]), len);
        prop_assert!(LARGEST.load(Ordering::Relaxed) <= ALLOC_BOUND, "allocated {} bytes", LARGEST.load(Ordering::Relaxed));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 50_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_are_rejected_or_consistent(mut b in prop::collection::vec(any::<u8>(), 0..64), magic in any::<bool>(), count in any::<u64>()) {
        if magic && b.len() >= 20 {
            b[..12].copy_from_slice(&[b"FKDIFF01".as_slice(), &(PAGE as u32).to_le_bytes()].concat());
            b[12..20].copy_from_slice(&count.to_le_bytes());
        }
        if let Ok((got, off)) = read_index_from(&mut Cursor::new(&b), b.len() as u64) {
            consistent(&b, &got, off)?;
        }
        prop_assert!(LARGEST.load(Ordering::Relaxed) <= ALLOC_BOUND);
    }
}

proptest! {
    // Real files: slower per case, and the in-memory cases above cover the
    // parsing; these check `apply` never grows the parent or panics.
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn applying_a_damaged_layer_never_grows_the_parent(pages in pages(), hits in prop::collection::vec(damage(), 0..3), parent_pages in 0u64..80) {
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("layer");
        let data = vec![7u8; pages.len() * PAGE as usize];
        write_layer(&layer, &pages, &data).unwrap();
        let mut b = std::fs::read(&layer).unwrap();
        for d in &hits {
            hurt(&mut b, d);
        }
        std::fs::write(&layer, &b).unwrap();
        let flat = dir.path().join("flat");
        std::fs::write(&flat, vec![1u8; (parent_pages * PAGE) as usize]).unwrap();
        let r = apply(&layer, &flat);
        prop_assert_eq!(std::fs::metadata(&flat).unwrap().len(), parent_pages * PAGE);
        if hits.is_empty() {
            let fits = pages.last().is_none_or(|&p| p < parent_pages);
            prop_assert_eq!(r.is_ok(), fits, "{:?}", r);
        }
        prop_assert!(LARGEST.load(Ordering::Relaxed) <= ALLOC_BOUND);
    }
}
