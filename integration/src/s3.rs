//! A real S3 API server for the remote tests: moto's server mode (installed
//! by scripts/setup-s3.sh) on a loopback port, with a bucket made for the
//! test; and a TCP proxy in front of it that a test can cut and restore,
//! to interrupt transfers at a moment of its choosing.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// moto_server: $FORKD_MOTO_SERVER, else where scripts/setup-s3.sh puts it.
pub fn moto_bin() -> PathBuf {
    let p = std::env::var_os("FORKD_MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/forkd/s3-venv/bin/moto_server"));
    assert!(p.is_file(), "no S3 API server at {} (run scripts/setup-s3.sh)", p.display());
    p
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct S3Server {
    child: Child,
    pub addr: SocketAddr,
}

impl S3Server {
    /// Starts moto_server and creates `bucket`.
    pub async fn start(bucket: &str) -> Self {
        let port = free_port();
        let child = Command::new(moto_bin())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let s = S3Server { child, addr };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = http.put(format!("http://{addr}/{bucket}")).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(Instant::now() < deadline, "moto_server did not answer on {addr}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        s
    }

    /// The environment a daemon needs to use this server at `endpoint`
    /// (the server itself, or a proxy in front of it).
    pub fn env(endpoint: SocketAddr) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "testing".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "testing".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ENDPOINT", format!("http://{endpoint}")),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// A presigned URL for one `method` ("get_object" or "put_object") of
    /// `bucket/key`, made by boto3 from the server's own environment (the
    /// way an object store hands out upload and download links).
    pub fn presign(&self, method: &str, bucket: &str, key: &str) -> String {
        let python = moto_bin().with_file_name("python");
        let script = "import boto3, sys\n\
            c = boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id='testing', \
            aws_secret_access_key='testing', region_name='us-east-1')\n\
            print(c.generate_presigned_url(sys.argv[2], Params={'Bucket': sys.argv[3], 'Key': sys.argv[4]}, \
            ExpiresIn=3600))";
        let out = Command::new(&python)
            .args(["-c", script, &format!("http://{}", self.addr), method, bucket, key])
            .output()
            .expect("run the S3 server's python");
        assert!(out.status.success(), "presign: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Every object of `bucket` as (key, size, last-modified), from
    /// ListObjectsV2 (its XML read just enough for this).
    pub async fn objects(&self, bucket: &str) -> Vec<(String, u64, String)> {
        let xml = reqwest::get(format!("http://{}/{bucket}?list-type=2&max-keys=1000", self.addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let field = |block: &str, name: &str| -> String {
            let open = format!("<{name}>");
            let start = block.find(&open).map(|i| i + open.len()).unwrap_or(0);
            let end = block[start..].find(&format!("</{name}>")).map(|i| start + i).unwrap_or(start);
            block[start..end].to_string()
        };
        let mut out: Vec<_> = xml
            .split("<Contents>")
            .skip(1)
            .map(|b| (field(b, "Key"), field(b, "Size").parse().unwrap_or(0), field(b, "LastModified")))
            .collect();
        out.sort();
        out
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy to `upstream` on a loopback port. `cut` drops every
/// connection and refuses new ones until `restore`.
pub struct CutProxy {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let flag = open.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else { return };
                if !flag.load(Ordering::SeqCst) {
                    continue; // dropped at once: the client sees a reset
                }
                let flag = flag.clone();
                tokio::spawn(async move {
                    let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else { return };
                    let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
                    let watch = async {
                        while flag.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    };
                    tokio::select! {
                        _ = copy => {}
                        _ = watch => {}
                    }
                });
            }
        });
        CutProxy { addr, open, task }
    }

    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
