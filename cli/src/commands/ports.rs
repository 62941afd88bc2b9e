//! Reaching servers inside a sandbox: `port-forward` (a local listener
//! whose connections are carried over gRPC OpenPort) and `url` (the
//! daemon's proxy URL of a port, and links that share it).

use forkd_api::v1::{
    ListPortSharesRequest, PortInput, PortTarget, SharePortRequest, UnsharePortRequest, port_input, port_output,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::args::{PortForwardArgs, UrlArgs};
use crate::client::Conn;
use crate::exit::{CliError, FAILURE, USAGE};
use crate::output::{emit, emit_json};

/// Bytes read from a local connection per message.
const CHUNK: usize = 64 * 1024;

pub async fn port_forward(conn: &Conn, args: PortForwardArgs) -> anyhow::Result<u8> {
    let listener = TcpListener::bind((args.address, args.ports.local))
        .await
        .map_err(|e| CliError::new(USAGE, format!("cannot listen on {}:{}: {e}", args.address, args.ports.local)))?;
    let local = listener.local_addr()?;
    // Check the sandbox before saying we forward to it.
    conn.call(conn.sandboxes().get_sandbox(forkd_api::v1::GetSandboxRequest { id: args.id.to_string() })).await?;
    emit(&format!("Forwarding from {local} -> {}:{}\n", args.id, args.ports.remote))?;
    let target = PortTarget { id: args.id.to_string(), port: args.ports.remote as u32 };
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (sock, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        eprintln!("forkd: accept: {e}");
                        continue;
                    }
                };
                let _ = sock.set_nodelay(true);
                let client = conn.sandboxes();
                let target = target.clone();
                tokio::spawn(async move {
                    if let Err(e) = carry(client, target, sock).await {
                        eprintln!("forkd: connection from {peer}: {e}");
                    }
                });
            }
            _ = tokio::signal::ctrl_c() => return Ok(0),
        }
    }
}

/// Carries one local connection over an OpenPort stream.
async fn carry(
    mut client: forkd_api::v1::sandbox_service_client::SandboxServiceClient<crate::client::Svc>,
    target: PortTarget,
    sock: TcpStream,
) -> Result<(), String> {
    let (mut rd, mut wr) = sock.into_split();
    let (tx, rx) = tokio::sync::mpsc::channel::<PortInput>(4);
    tx.send(PortInput { input: Some(port_input::Input::Open(target)) }).await.map_err(|e| e.to_string())?;
    let resp =
        client.open_port(tokio_stream::wrappers::ReceiverStream::new(rx)).await.map_err(|s| s.message().to_string())?;
    let mut out = resp.into_inner();
    let upstream = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let msg = match rd.read(&mut buf).await {
                Ok(0) | Err(_) => port_input::Input::Eof(true),
                Ok(n) => port_input::Input::Data(buf[..n].to_vec()),
            };
            let end = matches!(msg, port_input::Input::Eof(_));
            if tx.send(PortInput { input: Some(msg) }).await.is_err() || end {
                // Keep the request stream open until the answer ends.
                if end {
                    std::future::pending::<()>().await;
                }
                return;
            }
        }
    });
    let result = loop {
        match out.message().await {
            Ok(Some(m)) => match m.output {
                Some(port_output::Output::Data(d)) if wr.write_all(&d).await.is_err() => break Ok(()),
                Some(port_output::Output::Eof(_)) => {
                    let _ = wr.shutdown().await;
                    break Ok(());
                }
                _ => {}
            },
            Ok(None) => break Ok(()),
            Err(s) => break Err(s.message().to_string()),
        }
    };
    upstream.abort();
    result
}

pub async fn url(conn: &Conn, args: UrlArgs, as_json: bool) -> anyhow::Result<u8> {
    let base = conn.url.trim_end_matches('/').to_string();
    let id = args.id.to_string();
    let port = args.port as u32;
    if args.unshare {
        let r = conn.call(conn.sandboxes().unshare_port(UnsharePortRequest { id: id.clone(), port })).await?;
        if as_json {
            emit_json(&json!({ "id": id, "port": port, "removed": r.removed }))?;
        } else if !r.removed {
            return Err(CliError::new(FAILURE, format!("port {port} of {id} was not shared")).into());
        }
        return Ok(0);
    }
    if args.share {
        let s = conn.call(conn.sandboxes().share_port(SharePortRequest { id: id.clone(), port })).await?;
        let url = format!("{base}{}", s.path);
        if as_json {
            emit_json(&json!({ "id": id, "port": port, "url": url, "token": s.token, "shared": true }))?;
        } else {
            emit(&format!("{url}\n"))?;
        }
        return Ok(0);
    }
    // Checks the sandbox exists and is the caller's.
    let shares = conn.call(conn.sandboxes().list_port_shares(ListPortSharesRequest { id: id.clone() })).await?;
    let url = format!("{base}/v1/sandboxes/{id}/ports/{port}/");
    if as_json {
        let shared = shares.shares.iter().find(|s| s.port == port).map(|s| format!("{base}{}", s.path));
        emit_json(&json!({ "id": id, "port": port, "url": url, "shared_url": shared }))?;
    } else {
        emit(&format!("{url}\n"))?;
    }
    Ok(0)
}
