//! Guest ports over gRPC: OpenPort (a bidirectional byte stream to a port
//! on the sandbox's loopback) and the links that share a port.

use forkd_api::v1 as api;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Request, Response, Status, Streaming};

use super::Services;
use super::access::principal;
use crate::core::Error;
use crate::core::ports::{GuestPort, OpenError, Share};

/// Bytes per data message to the client.
const CHUNK: usize = 64 * 1024;

pub type PortStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<api::PortOutput, Status>> + Send>>;

/// A failed open as a status: nothing listening is a precondition the
/// caller can fix (start the server).
pub fn open_status(e: OpenError) -> Status {
    match e {
        OpenError::NotListening(m) => Error::FailedPrecondition(m).into(),
        OpenError::Other(e) => e.into(),
    }
}

fn share_proto(s: Share) -> api::PortShare {
    api::PortShare {
        path: s.path(),
        sandbox_id: s.sandbox.to_string(),
        port: s.port.get() as u32,
        token: s.token,
        created_unix: s.created_unix,
    }
}

impl Services {
    pub(crate) async fn open_port_stream(&self, r: Request<Streaming<api::PortInput>>) -> Result<PortStream, Status> {
        use api::port_input::Input;
        let p = principal(&r);
        let mut input = r.into_inner();
        let target = match input.message().await? {
            Some(api::PortInput { input: Some(Input::Open(t)) }) => t,
            Some(_) => return Err(Error::invalid("open", "the first message must name the sandbox and port").into()),
            None => return Err(Error::invalid("open", "the stream ended before an open message").into()),
        };
        let id = self.own_sandbox(&p, &target.id).await?;
        let port = GuestPort::new("port", target.port)?;
        let io = self.rt.open_port(&id, port).await.map_err(open_status)?;
        let (mut rd, mut wr) = tokio::io::split(io);
        // Client → guest; the end of the client's stream is the end of its input.
        tokio::spawn(async move {
            while let Ok(Some(m)) = input.message().await {
                match m.input {
                    Some(Input::Data(d)) if wr.write_all(&d).await.is_err() => return,
                    Some(Input::Eof(true)) => break,
                    _ => {}
                }
            }
            let _ = wr.shutdown().await;
        });
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            let opened = api::port_output::Output::Opened(target);
            if tx.send(Ok(api::PortOutput { output: Some(opened) })).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; CHUNK];
            loop {
                let out = match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => api::port_output::Output::Eof(true),
                    Ok(n) => api::port_output::Output::Data(buf[..n].to_vec()),
                };
                let end = matches!(out, api::port_output::Output::Eof(_));
                if tx.send(Ok(api::PortOutput { output: Some(out) })).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    pub(crate) async fn share_port(
        &self,
        r: Request<api::SharePortRequest>,
    ) -> Result<Response<api::PortShare>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let id = self.own_sandbox(&p, &r.id).await?;
        let port = GuestPort::new("port", r.port)?;
        Ok(Response::new(share_proto(self.rt.share_port(&id, port).await?)))
    }

    pub(crate) async fn list_port_shares(
        &self,
        r: Request<api::ListPortSharesRequest>,
    ) -> Result<Response<api::ListPortSharesResponse>, Status> {
        let p = principal(&r);
        let id = self.own_sandbox(&p, &r.get_ref().id).await?;
        self.rt.sandbox(&id).await?;
        let shares = self.rt.port_shares.list(&id).into_iter().map(share_proto).collect();
        Ok(Response::new(api::ListPortSharesResponse { shares }))
    }

    pub(crate) async fn unshare_port(
        &self,
        r: Request<api::UnsharePortRequest>,
    ) -> Result<Response<api::UnsharePortResponse>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        let id = self.own_sandbox(&p, &r.id).await?;
        let port = GuestPort::new("port", r.port)?;
        Ok(Response::new(api::UnsharePortResponse { removed: self.rt.port_shares.unshare(&id, port) }))
    }
}
