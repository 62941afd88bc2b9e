//! A real OCI distribution registry for the image-pull tests: Debian's
//! `docker-registry` (installed by scripts/setup-registry.sh) serving a
//! temporary directory on a loopback port, without auth; and `skopeo` to
//! push OCI image layouts into it.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `docker-registry`: $FORKD_DOCKER_REGISTRY, else the Debian package's.
pub fn registry_bin() -> PathBuf {
    tool("FORKD_DOCKER_REGISTRY", "/usr/bin/docker-registry")
}

/// `skopeo`: $FORKD_SKOPEO, else the Debian package's.
pub fn skopeo_bin() -> PathBuf {
    tool("FORKD_SKOPEO", "/usr/bin/skopeo")
}

fn tool(var: &str, default: &str) -> PathBuf {
    let p = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(default));
    assert!(p.is_file(), "{} missing (run scripts/setup-registry.sh as root, or set {var})", p.display());
    p
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Registry {
    child: Child,
    pub addr: SocketAddr,
    /// The filesystem driver's root directory.
    pub storage: PathBuf,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry on 127.0.0.1 at a free port and waits until
    /// `/v2/` answers.
    pub async fn start() -> Self {
        let bin = registry_bin();
        let dir = tempfile::Builder::new().prefix("forkd-registry-").tempdir_in("/tmp").expect("temp dir");
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage).unwrap();
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n",
                storage.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(&bin)
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let mut reg = Registry { child, addr, storage, dir };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(format!("http://{addr}/v2/")).send().await
                && r.status().is_success()
            {
                break;
            }
            if let Ok(Some(status)) = reg.child.try_wait() {
                panic!("docker-registry exited ({status}): {}", reg.log());
            }
            assert!(Instant::now() < deadline, "docker-registry did not answer on {addr}: {}", reg.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        reg
    }

    /// `127.0.0.1:PORT`, the host part of references to this registry.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The registry's own log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Pushes the image tagged `tag` in the OCI layout at `layout_dir` to
    /// `repo:tag` here; returns the manifest digest skopeo wrote.
    pub fn push_oci_layout(&self, layout_dir: &Path, tag: &str, repo: &str) -> String {
        self.push_with(layout_dir, tag, repo, &[])
    }

    /// [`push_oci_layout`](Self::push_oci_layout) with more `skopeo copy`
    /// arguments (`--all` for an index, `--format v2s2` for a Docker
    /// schema 2 manifest).
    pub fn push_with(&self, layout_dir: &Path, tag: &str, repo: &str, args: &[&str]) -> String {
        let digest_file = self.dir.path().join(format!("digest-{}", free_port()));
        let out = Command::new(skopeo_bin())
            .args(["--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false"])
            .args(args)
            .arg("--digestfile")
            .arg(&digest_file)
            .arg(format!("oci:{}:{tag}", layout_dir.display()))
            .arg(format!("docker://{}/{repo}:{tag}", self.host()))
            .stdin(Stdio::null())
            .output()
            .expect("run skopeo");
        assert!(
            out.status.success(),
            "skopeo copy to {repo}:{tag} failed: {}\nregistry log: {}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        std::fs::read_to_string(&digest_file).expect("skopeo --digestfile").trim().to_string()
    }

    /// The manifest of `repo:tag` as the registry serves it (`skopeo
    /// inspect --raw`).
    pub fn raw_manifest(&self, repo: &str, tag: &str) -> Vec<u8> {
        let out = Command::new(skopeo_bin())
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{}/{repo}:{tag}", self.host()))
            .stdin(Stdio::null())
            .output()
            .expect("run skopeo");
        assert!(out.status.success(), "skopeo inspect {repo}:{tag} failed: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }

    /// Where the filesystem driver keeps the blob `sha256:<hex>`.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self.storage.join("docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
