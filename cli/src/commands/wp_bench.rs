//! `forkd wp-bench`: a probe of userfaultfd write-protection on a memfd,
//! the mechanism a branch can use to copy a running guest's memory without
//! stopping it: arm write-protection over the whole region (the only pause),
//! then copy every page in the background while a fault handler copies any
//! page a writer touches first, just before letting the write through.
//!
//! It needs no daemon. It prints the arm time, how many pages each path
//! copied, the totals, and checks that the copy holds the memory exactly as
//! it was when armed, whatever was written afterwards.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::args::WpBenchArgs;
use crate::exit::{CliError, FAILURE};
use crate::output::{emit, emit_json};

const PAGE: usize = 4096;
/// What the region holds when armed; writes after that use another byte.
const BEFORE: u8 = 0x42;
const AFTER: u8 = 0x17;

// userfaultfd ABI (linux/userfaultfd.h).
const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xc018_aa06;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: Range,
    mode: u64,
}

fn os_err(what: &str) -> CliError {
    CliError::new(FAILURE, format!("{what}: {}", std::io::Error::last_os_error()))
}

/// Sets or clears write-protection over `len` bytes at `start`.
fn protect(uffd: RawFd, start: u64, len: u64, on: bool) -> std::io::Result<()> {
    let mut wp =
        UffdioWriteprotect { range: Range { start, len }, mode: if on { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 } };
    if unsafe { libc::ioctl(uffd, UFFDIO_WRITEPROTECT, &mut wp) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Copies each page to the snapshot once. A page's state: 0 untouched,
/// 1 being copied, 2 copied.
struct Copier {
    base: u64,
    file: std::fs::File,
    claimed: Vec<AtomicU8>,
}

impl Copier {
    fn copy(&self, page: usize) -> std::io::Result<bool> {
        if self.claimed[page].compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst).is_err() {
            return Ok(false);
        }
        // Still write-protected: nobody can change it while it is read.
        let data = unsafe { std::slice::from_raw_parts((self.base as usize + page * PAGE) as *const u8, PAGE) };
        self.file.write_all_at(data, (page * PAGE) as u64)?;
        self.claimed[page].store(2, Ordering::SeqCst);
        Ok(true)
    }

    /// Waits until the page is copied (by whichever side claimed it): its
    /// protection may only be lifted after that.
    fn wait_copied(&self, page: usize) {
        while self.claimed[page].load(Ordering::SeqCst) != 2 {
            std::thread::yield_now();
        }
    }
}

pub fn run(a: WpBenchArgs, as_json: bool) -> anyhow::Result<u8> {
    let size = a.region_mib as usize * 1024 * 1024;
    let pages = size / PAGE;
    if !as_json {
        emit(&format!(
            "forkd wp-bench\n  region: {} MiB ({pages} pages of {PAGE} bytes)\n  snapshot output: {}\n",
            a.region_mib,
            a.snapshot.display()
        ))?;
    }
    // The region: a memfd mapped shared, as guest memory is.
    let name = std::ffi::CString::new("forkd-wp-bench")?;
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(os_err("memfd_create").into());
    }
    let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
    if unsafe { libc::ftruncate(memfd.as_raw_fd(), size as libc::off_t) } != 0 {
        return Err(os_err("ftruncate").into());
    }
    let region =
        unsafe { libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0) };
    if region == libc::MAP_FAILED {
        return Err(os_err("mmap").into());
    }
    let base = region as u64;
    let t = Instant::now();
    unsafe { std::ptr::write_bytes(region as *mut u8, BEFORE, size) };
    let populate = t.elapsed();

    // userfaultfd with write-protect faults on shared memory (Linux 5.19+).
    let ufd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if ufd < 0 {
        return Err(os_err("userfaultfd (root, or sysctl vm.unprivileged_userfaultfd=1)").into());
    }
    let uffd = unsafe { OwnedFd::from_raw_fd(ufd as RawFd) };
    let wanted = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
    let mut api = UffdioApi { api: UFFD_API, features: wanted, ioctls: 0 };
    if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
        return Err(
            os_err("UFFDIO_API: this kernel has no write-protect faults on shared memory (needs Linux 5.19+)").into()
        );
    }
    let mut reg =
        UffdioRegister { range: Range { start: base, len: size as u64 }, mode: UFFDIO_REGISTER_MODE_WP, ioctls: 0 };
    if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } != 0 {
        return Err(os_err("UFFDIO_REGISTER (write-protect mode)").into());
    }
    let file = std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(&a.snapshot)?;
    file.set_len(size as u64)?;
    let copier = Arc::new(Copier { base, file, claimed: (0..pages).map(|_| AtomicU8::new(0)).collect() });

    // Arm: the pause a branch would have.
    let t = Instant::now();
    protect(uffd.as_raw_fd(), base, size as u64, true).map_err(|e| CliError::new(FAILURE, format!("arm: {e}")))?;
    let arm = t.elapsed();
    let started = Instant::now();

    // The fault handler: a write to a page not copied yet waits here.
    let stop = Arc::new(AtomicBool::new(false));
    let by_fault = Arc::new(AtomicU64::new(0));
    let handler = {
        let (copier, stop, by_fault, ufd) = (copier.clone(), stop.clone(), by_fault.clone(), uffd.as_raw_fd());
        std::thread::spawn(move || -> std::io::Result<()> {
            let mut msg = [0u8; 32];
            while !stop.load(Ordering::SeqCst) {
                let mut p = libc::pollfd { fd: ufd, events: libc::POLLIN, revents: 0 };
                if unsafe { libc::poll(&mut p, 1, 50) } <= 0 {
                    continue;
                }
                let n = unsafe { libc::read(ufd, msg.as_mut_ptr().cast(), msg.len()) };
                if n != msg.len() as isize || msg[0] != UFFD_EVENT_PAGEFAULT {
                    continue;
                }
                let flags = u64::from_ne_bytes(msg[8..16].try_into().unwrap());
                let addr = u64::from_ne_bytes(msg[16..24].try_into().unwrap());
                if flags & UFFD_PAGEFAULT_FLAG_WP == 0 {
                    continue;
                }
                let page = ((addr - copier.base) as usize) / PAGE;
                if copier.copy(page)? {
                    by_fault.fetch_add(1, Ordering::Relaxed);
                }
                copier.wait_copied(page);
                protect(ufd, copier.base + (page * PAGE) as u64, PAGE as u64, false)?;
            }
            Ok(())
        })
    };
    // A writer dirtying pages while the copy runs (--dirty-pages).
    let writer = (a.dirty_pages > 0).then(|| {
        let n = a.dirty_pages.min(pages as u64) as usize;
        std::thread::spawn(move || {
            for i in 0..n {
                // Spread over the region, from the end, racing the bulk copy.
                let page = pages - 1 - (i * pages / n);
                unsafe { *((base as usize + page * PAGE) as *mut u8) = AFTER };
            }
        })
    });
    // The bulk copy of every page nobody wrote first.
    let t = Instant::now();
    let mut by_bulk = 0u64;
    for page in 0..pages {
        if copier.copy(page)? {
            by_bulk += 1;
        }
        // Lifting the protection wakes a writer the fault handler holds on
        // this page, so the handler's copy must have finished first.
        copier.wait_copied(page);
        protect(uffd.as_raw_fd(), base + (page * PAGE) as u64, PAGE as u64, false)?;
    }
    let bulk = t.elapsed();
    if let Some(w) = writer {
        let _ = w.join();
    }
    let t = Instant::now();
    stop.store(true, Ordering::SeqCst);
    handler.join().map_err(|_| CliError::new(FAILURE, "the fault handler panicked"))??;
    copier.file.sync_all()?;
    let finalize = t.elapsed();
    let total = started.elapsed() + arm;

    // The copy must be the memory as armed.
    let snap = std::fs::read(&a.snapshot)?;
    let bad = snap.iter().filter(|&&b| b != BEFORE).count();
    let consistent = snap.len() == size && bad == 0;
    unsafe { libc::munmap(region, size) };
    if !a.keep {
        let _ = std::fs::remove_file(&a.snapshot);
    }
    let by_fault = by_fault.load(Ordering::Relaxed);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    if as_json {
        emit_json(&json!({
            "region_mib": a.region_mib,
            "pages": pages,
            "populate_ms": ms(populate),
            "arm_ms": ms(arm),
            "bulk_copy_ms": ms(bulk),
            "finalize_ms": ms(finalize),
            "total_ms": ms(total),
            "pages_captured_by_fault": by_fault,
            "pages_captured_by_bulk": by_bulk,
            "dirty_pages_written": a.dirty_pages.min(pages as u64),
            "consistent": consistent,
        }))?;
    } else {
        emit(&format!(
            "  populated in {populate:?}\n  arm UFFDIO_WRITEPROTECT: {arm:?}\n  bulk copy: {by_bulk} pages in {bulk:?}\n  \
             finalize: {finalize:?}\n\n  arm_duration             {arm:?}\n  pages_captured_by_fault  {by_fault}\n  \
             pages_captured_by_bulk   {by_bulk}\n  total_pages              {pages}\n\n  total                    {total:?}\n\n"
        ))?;
        if consistent {
            emit(&format!("  snapshot consistent ({size} bytes, all as armed)\n"))?;
        }
    }
    if !consistent {
        return Err(CliError::new(FAILURE, format!("{bad} bytes of the copy differ from the memory as armed")).into());
    }
    Ok(0)
}
