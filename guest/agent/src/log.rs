//! Sparse logging. As PID 1 the agent writes to /dev/kmsg: info lines stay in
//! the ring buffer (visible with dmesg) while errors also reach the console,
//! which under TCG is slow enough that chatty output would cost boot time.

use std::io::Write;
use std::sync::Mutex;

static KMSG: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// Starts sending log lines to /dev/kmsg (called once /dev is mounted).
pub fn use_kmsg() {
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg")
        && let Ok(mut g) = KMSG.lock()
    {
        *g = Some(f);
    }
}

fn emit(level: u8, msg: &str) {
    if let Ok(mut g) = KMSG.lock()
        && let Some(f) = g.as_mut()
    {
        let _ = f.write_all(format!("<{level}>forkd-agent: {msg}\n").as_bytes());
        return;
    }
    eprintln!("forkd-agent: {msg}");
}

pub fn info(msg: &str) {
    emit(6, msg);
}

pub fn error(msg: &str) {
    emit(3, msg);
}
