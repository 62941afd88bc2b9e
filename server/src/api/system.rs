//! SystemService: version and accelerator facts.

use forkd_api::v1::{GetVersionRequest, VersionInfo, system_service_server::SystemService};
use tonic::{Request, Response, Status};

use super::Services;

#[tonic::async_trait]
impl SystemService for Services {
    async fn get_version(&self, _req: Request<GetVersionRequest>) -> Result<Response<VersionInfo>, Status> {
        Ok(Response::new(VersionInfo {
            version: forkd_api::VERSION.into(),
            api: "v1".into(),
            backend: self.rt.backend.name().into(),
            accel: self.rt.accel.accel.as_str().into(),
            accel_reason: self.rt.accel.reason.clone(),
            git_commit: option_env!("FORKD_GIT_COMMIT").unwrap_or("").into(),
            data_dir: self.data_dir.clone(),
            sandboxes: self.rt.live_sandbox_count().await as u32,
            snapshots: self.rt.snapshot_count() as u32,
            vmm_confinement: if self.rt.config.vmm_jail {
                "jail: own uid, no capabilities, no_new_privs, seccomp, own mount and network namespace".into()
            } else {
                "off: VMMs run as the daemon's uid without capabilities (--vmm-jail off)".into()
            },
            auth: self.auth.as_str().into(),
        }))
    }
}
