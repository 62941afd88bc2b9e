//! Port streams: a TCP connection to a port on the guest's loopback, carried
//! over the agent channel so the host can reach a server in the guest with
//! or without a network device.
//!
//! Each stream has one thread that polls the socket and a wake-up eventfd.
//! Data from the host arrives on the channel's reader thread (PortSend,
//! handled inline: it only appends to the stream's inbox) and is bounded by
//! the credit this side granted; data to the host is read from the socket
//! only while the host has granted credit. So a server that never reads,
//! or a host client that never reads, stalls its own stream and nothing
//! else, and neither side buffers more than a window.

use crate::server::{Agent, error, io_error};
use crate::sys;
use forkd_agent_protocol::v1::{
    AgentError, PortEvent, PortOpenRequest, PortSendRequest, agent_error::Kind, response::Body as Resp,
};
use forkd_agent_protocol::{PORT_MAX_DATA, port_charge};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Bytes the host may send ahead of what this side wrote to the server.
pub const WINDOW: u32 = 256 * 1024;
/// Most port streams at once.
pub const MAX_PORT_STREAMS: usize = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an idle stream looks at its cancel flag.
const IDLE_POLL: Duration = Duration::from_millis(500);

/// What the host sent that the server has not taken yet.
#[derive(Default)]
struct Inbox {
    data: Vec<u8>,
    eof: bool,
    /// The host sent more than its credit: the stream is closed.
    overrun: bool,
}

/// The shared side of one stream: the channel reader fills it, the
/// stream's thread drains it.
pub struct PortStream {
    inbox: Mutex<Inbox>,
    /// Credit for data to the host.
    credit: AtomicU64,
    cancelled: AtomicBool,
    wake: OwnedFd,
}

impl PortStream {
    fn new(window: u32) -> io::Result<Arc<PortStream>> {
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        let fd = sys::check(fd)?;
        Ok(Arc::new(PortStream {
            inbox: Mutex::new(Inbox::default()),
            credit: AtomicU64::new(window as u64),
            cancelled: AtomicBool::new(false),
            wake: unsafe { OwnedFd::from_raw_fd(fd) },
        }))
    }

    fn notify(&self) {
        let one = 1u64.to_ne_bytes();
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        self.notify();
    }

    /// Data, credit or an end from the host (called on the channel reader:
    /// never blocks).
    pub fn accept(&self, s: PortSendRequest) {
        if s.grant > 0 {
            self.credit.fetch_add(s.grant as u64, Ordering::SeqCst);
        }
        if !s.data.is_empty() || s.eof {
            let Ok(mut inbox) = self.inbox.lock() else { return };
            if inbox.data.len() + s.data.len() > WINDOW as usize || (inbox.eof && !s.data.is_empty()) {
                inbox.overrun = true;
            } else {
                inbox.data.extend_from_slice(&s.data);
                inbox.eof |= s.eof;
            }
        }
        self.notify();
    }
}

fn connect(port: u16) -> Result<TcpStream, AgentError> {
    let mut last = None;
    for ip in [SocketAddr::from((Ipv4Addr::LOCALHOST, port)), SocketAddr::from((Ipv6Addr::LOCALHOST, port))] {
        match TcpStream::connect_timeout(&ip, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    let e = last.unwrap_or_else(|| io::Error::from(io::ErrorKind::ConnectionRefused));
    if e.kind() == io::ErrorKind::ConnectionRefused {
        return Err(error(
            Kind::NotFound,
            format!("nothing listens on port {port} in the sandbox (127.0.0.1 and ::1)"),
        ));
    }
    Err(io_error(&format!("connecting to port {port}"), &e))
}

/// Opens the connection and moves bytes until both sides are done, the
/// host cancels, or the connection fails. Runs on its own thread.
pub fn run(agent: &Arc<Agent>, id: u64, req: PortOpenRequest, stream: &Arc<PortStream>) -> Result<(), AgentError> {
    let port = u16::try_from(req.port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| error(Kind::Invalid, format!("port {} is not a TCP port (1-65535)", req.port)))?;
    let mut sock = connect(port)?;
    sock.set_nonblocking(true).map_err(|e| io_error("socket", &e))?;
    let _ = sock.set_nodelay(true);
    agent.send(id, Resp::PortEvent(PortEvent { opened: true, grant: WINDOW, ..Default::default() }));
    let why = pump(agent, id, &mut sock, stream);
    agent.send(id, Resp::PortEvent(PortEvent { closed: true, error: why.unwrap_or_default(), ..Default::default() }));
    Ok(())
}

/// The stream's loop; answers why it ended when that was not a clean close.
fn pump(agent: &Agent, id: u64, sock: &mut TcpStream, stream: &PortStream) -> Option<String> {
    let mut buf = vec![0u8; PORT_MAX_DATA];
    let (mut read_eof, mut write_shut) = (false, false);
    loop {
        if stream.cancelled.load(Ordering::SeqCst) {
            return None;
        }
        let (pending, eof, overrun) = match stream.inbox.lock() {
            Ok(i) => (!i.data.is_empty(), i.eof, i.overrun),
            Err(_) => return Some("internal error".into()),
        };
        if overrun {
            return Some("the host sent more than its credit".into());
        }
        if !pending && eof && !write_shut {
            let _ = sock.shutdown(Shutdown::Write);
            write_shut = true;
        }
        if read_eof && write_shut {
            return None;
        }
        let credit = stream.credit.load(Ordering::SeqCst);
        let mut events = 0;
        if !read_eof && credit >= port_charge(1) as u64 {
            events |= libc::POLLIN;
        }
        if pending {
            events |= libc::POLLOUT;
        }
        // With nothing to wait for on the socket, leave it out: a hung-up
        // socket would otherwise wake the poll at once, again and again.
        let sock_fd = if events == 0 { -1 } else { sock.as_raw_fd() };
        let mut pfds = [
            libc::pollfd { fd: sock_fd, events, revents: 0 },
            libc::pollfd { fd: stream.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        if let Err(e) = sys::poll(&mut pfds, Some(IDLE_POLL)) {
            return Some(format!("poll: {e}"));
        }
        if pfds[1].revents & libc::POLLIN != 0 {
            let mut n = [0u8; 8];
            let _ = sys::read(stream.wake.as_raw_fd(), &mut n);
        }
        let rev = pfds[0].revents;
        if rev & libc::POLLOUT != 0 {
            match write_some(sock, stream) {
                Ok(0) => {}
                Ok(n) => agent.send(
                    id,
                    Resp::PortEvent(PortEvent { grant: n.min(u32::MAX as usize) as u32, ..Default::default() }),
                ),
                Err(e) => return Some(format!("writing to the server: {e}")),
            }
        }
        if rev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && events & libc::POLLIN != 0 {
            // Never more than the credit allows, charged as the host counts it.
            let room = (credit.min(PORT_MAX_DATA as u64)) as usize;
            match sock.read(&mut buf[..room]) {
                Ok(0) => {
                    read_eof = true;
                    agent.send(id, Resp::PortEvent(PortEvent { eof: true, ..Default::default() }));
                }
                Ok(n) => {
                    stream.credit.fetch_sub(port_charge(n) as u64, Ordering::SeqCst);
                    agent.send(id, Resp::PortEvent(PortEvent { data: buf[..n].to_vec(), ..Default::default() }));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Some(format!("reading from the server: {e}")),
            }
        } else if rev & (libc::POLLHUP | libc::POLLERR) != 0 && read_eof && !write_shut {
            return Some("the server closed the connection".into());
        }
    }
}

/// Writes what the inbox holds without blocking; answers how much went out.
fn write_some(sock: &mut TcpStream, stream: &PortStream) -> io::Result<usize> {
    let Ok(mut inbox) = stream.inbox.lock() else { return Ok(0) };
    let mut written = 0;
    while written < inbox.data.len() {
        match sock.write(&inbox.data[written..]) {
            Ok(0) => break,
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => break,
            Err(e) => return Err(e),
        }
    }
    inbox.data.drain(..written);
    Ok(written)
}

/// Creates the shared side of a new stream (registered by the caller).
pub fn new_stream(window: u32) -> Result<Arc<PortStream>, AgentError> {
    PortStream::new(window).map_err(|e| io_error("eventfd", &e))
}
