//! forkd-agent: PID 1 of every forkd guest.
//!
//! As PID 1 (inside the initramfs) it mounts the root image under a RAM
//! overlay, starts the warm runtime and serves `forkd.agent.v1` on the
//! virtio-serial port `forkd.agent`. Run as an ordinary process it can serve
//! the same protocol on a Unix socket, which is how it is exercised on a
//! development host:
//!
//!   forkd-agent --listen /tmp/agent.sock [--runtime python] [--warm numpy]

mod cmdline;
mod exec;
mod files;
mod init;
mod limits;
mod log;
mod ports;
mod proc;
mod procs;
mod reinit;
mod runtime;
mod server;
mod sys;
#[cfg(test)]
mod tests;
mod users;
mod watch;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::Arc;

fn main() {
    if std::process::id() == 1 {
        init::boot();
    }
    if let Err(msg) = dev_main() {
        eprintln!("forkd-agent: {msg}");
        std::process::exit(2);
    }
}

fn dev_main() -> Result<(), String> {
    let mut listen = None;
    let mut kind = String::new();
    let mut warm = Vec::new();
    let mut script_dir = std::env::temp_dir().join(format!("forkd-agent-{}", std::process::id()));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--listen" => listen = Some(value()?),
            "--runtime" => kind = value()?,
            "--warm" => warm = value()?.split(',').filter(|s| !s.is_empty()).map(String::from).collect(),
            "--script-dir" => script_dir = value()?.into(),
            "--version" => {
                println!("forkd-agent {}", env!("CARGO_PKG_VERSION"));
                return Ok(());
            }
            other => {
                return Err(format!(
                    "unknown argument {other}; usage: forkd-agent --listen SOCKET [--runtime python] [--warm a,b]"
                ));
            }
        }
    }
    let listen = listen.ok_or("not PID 1: pass --listen SOCKET to serve on a Unix socket")?;
    let _ = std::fs::remove_file(&listen);
    let listener = UnixListener::bind(&listen).map_err(|e| format!("bind {listen}: {e}"))?;
    proc::start_reaper();
    let dir = script_dir.to_string_lossy();
    let runtime = runtime::Runtime::new(&kind, warm, &dir);
    runtime.start_background();
    let agent = server::Agent::new(runtime, &dir);
    serve_connections(&agent, listener);
    Ok(())
}

/// Serves one connection at a time, like the single virtio-serial port.
fn serve_connections(agent: &Arc<server::Agent>, listener: UnixListener) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let fd: std::os::fd::OwnedFd = conn.into();
        let _ = sys::set_nonblocking(fd.as_raw_fd());
        let fd = Arc::new(fd);
        agent.writer.set(Some(fd.clone()));
        server::serve(agent, fd.as_raw_fd(), false);
        agent.writer.set(None);
    }
}
