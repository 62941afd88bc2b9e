//! Start-up facts about the host: the TSC frequency the guest kernel is told,
//! and whether KVM can really run the guest (booting it is the only reliable
//! test), cached per host kernel and guest kernel.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::agent::AgentClient;
use crate::core::runtime::GuestAssets;
use crate::core::snapshots::kernel_cmdline;
use crate::host::cgroup::{self, Cgroups};
use crate::vmm::accel::{AccelChoice, AccelDecision, KvmFacts, decide_from_facts};
use crate::vmm::qemu::{QemuBackend, QemuConfig};
use crate::vmm::{Accel, Backend, VmDir, VmSpec, process};

/// Host TSC frequency in kHz, from /proc/cpuinfo ("cpu MHz").
pub fn tsc_khz() -> u64 {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map(|mhz| (mhz * 1000.0) as u64)
        .unwrap_or(2_000_000)
}

/// Decides the accelerator, booting the guest under KVM when the facts do
/// not settle it.
pub async fn choose_accel(
    choice: AccelChoice,
    qemu: &Path,
    guest: &GuestAssets,
    data_dir: &Path,
    confinement: &QemuConfig,
) -> anyhow::Result<AccelDecision> {
    let facts = KvmFacts::read();
    if let Some(d) = decide_from_facts(choice, &facts).map_err(anyhow::Error::msg)? {
        return Ok(d);
    }
    let host_kernel =
        nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    let kernel_meta = std::fs::metadata(guest.kernel()).map(|m| m.len()).unwrap_or(0);
    let key = format!("{host_kernel}/{kernel_meta}");
    let cache = data_dir.join("accel-probe.json");
    if let Ok(text) = std::fs::read_to_string(&cache)
        && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        && v["key"] == key
        && let Ok(d) = serde_json::from_value::<AccelDecision>(v["decision"].clone())
    {
        return Ok(d);
    }
    let ok = boot_probe(qemu, guest, data_dir, confinement).await;
    let decision = if ok {
        AccelDecision { accel: Accel::Kvm, reason: "KVM booted the guest kernel (probe)".into() }
    } else {
        AccelDecision {
            accel: Accel::Tcg,
            reason: "/dev/kvm exists but could not boot the guest kernel (probe): guests run under TCG emulation"
                .into(),
        }
    };
    let tmp = cache.with_extension("tmp");
    let _ = std::fs::write(&tmp, serde_json::json!({ "key": key, "decision": decision }).to_string());
    let _ = std::fs::rename(&tmp, &cache);
    Ok(decision)
}

/// Boots the `minimal` image under KVM, confined as `confinement` says and
/// in a cgroup of its own, and asks its agent for a ping.
async fn boot_probe(qemu: &Path, guest: &GuestAssets, data_dir: &Path, confinement: &QemuConfig) -> bool {
    let Ok(image) = guest.image("minimal") else { return false };
    let dir = data_dir.join(format!("probe.{}", std::process::id()));
    if std::fs::create_dir_all(&dir).is_err() {
        return false;
    }
    let spec = VmSpec {
        kernel: guest.kernel(),
        initrd: guest.initrd(),
        cmdline: kernel_cmdline(tsc_khz(), &image),
        rootfs: image.path,
        mem_mib: 128,
        vcpus: 1,
        accel: Accel::Kvm,
        mem_file: dir.join("mem"),
        drives: vec![],
        nic: false,
    };
    let backend: Arc<dyn Backend> = match QemuBackend::with_config(PathBuf::from(qemu), Accel::Kvm, confinement.clone())
    {
        Ok(b) => Arc::new(b),
        Err(e) => {
            tracing::warn!("KVM probe: preparing VMM confinement: {e}");
            let _ = std::fs::remove_dir_all(&dir);
            return false;
        }
    };
    let vmdir = VmDir(dir.clone());
    let cgroups = Cgroups::host();
    let cgroup_name = cgroup::sandbox_name(&format!("probe-{}", std::process::id()));
    if let Some(cg) = &cgroups {
        let limits = cgroup::Limits {
            memory_bytes: (spec.mem_mib + crate::core::limits::BAKE_EXTRA_MIB) as u64 * 1024 * 1024,
            cpu_quota: 0.0,
            pids_max: crate::core::limits::VMM_THREAD_HEADROOM,
            background: false,
        };
        if let Err(e) = cg.create(&cgroup_name, &limits) {
            tracing::warn!("KVM probe: creating cgroup {cgroup_name}: {e}");
            let _ = std::fs::remove_dir_all(&dir);
            return false;
        }
    }
    let ok = match backend.boot(&spec, &vmdir).await {
        Ok(mut vm) => {
            let placed = cgroups.as_ref().is_none_or(|cg| cg.add_pid(&cgroup_name, vm.pid).is_ok());
            let answered = placed
                && async {
                    let agent = AgentClient::connect(&vmdir.agent_socket(), Duration::from_secs(5)).await.ok()?;
                    agent.ping(Duration::from_secs(10)).await.ok()
                }
                .await
                .is_some();
            process::kill_and_reap(vm.pid, vm.start_time, vm.child.take()).await;
            answered
        }
        Err(_) => false,
    };
    if let Some(cg) = &cgroups {
        let _ = cg.remove(&cgroup_name, Duration::from_secs(2));
    }
    let _ = std::fs::remove_dir_all(&dir);
    ok
}
