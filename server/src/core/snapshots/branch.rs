//! Branching a running sandbox into a new snapshot (the sandbox keeps
//! running), compacting chains, and deriving snapshots from a command.
//!
//! The pause window only covers: stop the vCPUs, read pagemap, copy the
//! dirty pages into a buffer faulted in beforehand, save device state, resume.
//! Writing the layer and materializing the flat memory file happen after the
//! source runs again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use forkd_api::names::{SandboxId, Tag};

use crate::core::leases::Resource;
use crate::core::runtime::Runtime;
use crate::core::store::{SnapshotRecord, SnapshotStatus};
use crate::core::{Error, Result, ids, now_unix};
use crate::memory::dirty::{self, CaptureBuffer, PAGE};
use crate::memory::{digest, layer, layout};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BranchMode {
    /// A layer of the pages written since the parent snapshot.
    Diff,
    /// A flat, parentless memory file.
    Full,
}

impl BranchMode {
    /// `live` (the reference's live branch) is the lowest-pause branch
    /// forkd has: a diff branch, whose source runs again as soon as its
    /// memory is captured.
    pub fn parse(mode: &str, live: bool) -> Result<Self> {
        match mode {
            "full" if live => Err(Error::invalid("live", "a live branch is a diff branch, not mode \"full\"")),
            "" | "diff" | "live" => Ok(BranchMode::Diff),
            "full" => Ok(BranchMode::Full),
            other => Err(Error::invalid("mode", format!("{other:?}: use \"diff\", \"full\" or \"live\""))),
        }
    }
}

/// A branch request's mode and whether it only measures, from its fields
/// (forkd's `mode` and `live`, the reference's `diff` and `measure_diff`).
pub fn requested(mode: &str, live: bool, diff: Option<bool>, measure_diff: bool) -> Result<(BranchMode, bool)> {
    if let (Some(d), false) = (diff, mode.is_empty()) {
        return Err(Error::invalid("diff", format!("{d} and mode {mode:?}: give one of them")));
    }
    let mode = match diff {
        Some(true) => "diff",
        Some(false) => "full",
        None => mode,
    };
    if mode == "measure" {
        if live || measure_diff {
            return Err(Error::invalid("mode", "\"measure\" takes no branch: drop `live` and `measure_diff`"));
        }
        return Ok((BranchMode::Diff, true));
    }
    let parsed = BranchMode::parse(mode, live)?;
    if measure_diff {
        if live || !matches!(mode, "" | "full") {
            return Err(Error::invalid(
                "measure_diff",
                "it measures a full branch, so it does not go with a diff or live one (mode \"measure\" measures \
                 without branching)",
            ));
        }
        return Ok((BranchMode::Full, false));
    }
    Ok((parsed, false))
}

pub struct BranchRequest {
    pub id: SandboxId,
    pub tag: Option<Tag>,
    pub mode: BranchMode,
    pub measure_only: bool,
    pub wait: bool,
}

/// Slack added to the capture buffer over the dirty size seen before the
/// pause: the guest keeps writing until it is stopped.
const CAPTURE_SLACK: usize = 64 << 20;

impl Runtime {
    pub async fn branch(self: &Arc<Self>, req: BranchRequest) -> Result<SnapshotRecord> {
        let sb = self.sandbox(&req.id).await?;
        sb.ensure_running()?;
        let source_tag = sb.snapshot().snapshot_tag;
        let parent = self.store.get_snapshot(source_tag.as_str())?.ok_or_else(|| {
            Error::FailedPrecondition(format!("sandbox {}'s snapshot {source_tag:?} no longer exists", req.id))
        })?;
        let parent_tag = parent.tag.clone();
        let parent_mem = std::fs::canonicalize(self.layout.snapshot_dir(&parent_tag).join("mem"))
            .map_err(|e| Error::internal("parent memory file", e))?;
        let mapping =
            dirty::find_mapping(sb.pid, &parent_mem).map_err(|e| Error::internal("locate guest memory", e))?;
        let before = crate::core::blocking::run(|| dirty::dirty_pages(sb.pid, &mapping))
            .map_err(|e| Error::internal("read pagemap", e))?;
        if req.measure_only {
            let mut rec = parent.clone();
            // The record keeps the parent's tag: nothing is stored under it.
            rec.status_reason = "measured only; no snapshot was taken".into();
            rec.dirty_bytes = before.len() as u64 * PAGE;
            rec.branched_from = req.id.to_string();
            return Ok(rec);
        }
        // A diff branch writes its layer (the dirty pages) and a flat memory
        // file for spawning; a full one the flat file.
        let ram = parent.mem_mib as u64 * crate::core::snapshots::MIB;
        let estimate = match req.mode {
            BranchMode::Diff => ram + before.len() as u64 * PAGE,
            BranchMode::Full => ram,
        };
        let what = format!("branch {:?}", req.tag.as_ref().map(|t| t.as_str()).unwrap_or("(generated)"));
        self.admit_snapshot_write(&what, estimate)?;
        let _permit = self.branch_slots.clone().try_acquire_owned().map_err(|_| {
            Error::ResourceExhausted("too many branches in flight; retry shortly (--branch-concurrency)".into())
        })?;
        let tag = req.tag.clone().unwrap_or_else(|| ids::branch_tag(&req.id));
        let final_dir = self.layout.snapshot_dir(&tag);
        if final_dir.exists() {
            return Err(Error::AlreadyExists(format!("snapshot {:?} already exists", tag.as_str())));
        }
        let mut spec = parent.vm_spec()?;
        spec.mem_file = final_dir.join("mem");
        // The new snapshot has the disks the source has, volumes it was
        // given of its own included: they are mounted in the memory captured.
        let source = sb.snapshot();
        if !source.drives.is_empty() {
            spec.drives = source.drives.clone();
        }
        let (kind, parent_field) = match req.mode {
            BranchMode::Diff => ("diff", Some(parent.tag.clone())),
            BranchMode::Full => ("full", None),
        };
        let mut rec = SnapshotRecord {
            tag: tag.clone(),
            status: SnapshotStatus::Writing,
            status_reason: String::new(),
            image: parent.image.clone(),
            vcpus: parent.vcpus,
            mem_mib: parent.mem_mib,
            kind: kind.into(),
            parent_tag: parent_field,
            created_at_unix: now_unix(),
            memory_digest: String::new(),
            state_digest: String::new(),
            parent_memory_digest: if req.mode == BranchMode::Diff {
                parent.memory_digest.clone()
            } else {
                String::new()
            },
            branched_from: req.id.to_string(),
            pause_ms: 0.0,
            dirty_bytes: 0,
            diff_ms: 0.0,
            backend: parent.backend.clone(),
            accel: parent.accel.clone(),
            volumes: if source.drives.is_empty() { parent.volumes.clone() } else { source.settings.volumes.clone() },
            labels: parent.labels.clone(),
            warm_ms: 0.0,
            runtime: parent.runtime.clone(),
            physical_size_bytes: 0,
            vm: Some(spec),
            // A branch belongs to whoever owns the sandbox it was taken from.
            owner: source.owner.clone(),
            shared: false,
        };
        self.store.insert_snapshot(&rec)?;
        // Until the snapshot is in place, its row and staging dir are leases:
        // any failure below (or a panic) releases both.
        let row = self.lease(Resource::SnapshotRow(tag.to_string()));
        let staging = self.layout.staging_for(&tag, &ids::nonce());
        let staging_key = staging.display().to_string();
        self.store.ledger_add("staging", &staging_key, tag.as_str())?;
        let staged = self.lease(Resource::Staging(staging.clone()));
        let captured = async {
            std::fs::create_dir_all(&staging).map_err(|e| Error::internal("create staging dir", e))?;
            let mut buf = CaptureBuffer::new(before.len() * PAGE as usize + CAPTURE_SLACK)
                .map_err(|e| Error::internal("capture buffer", e))?;
            let mut pagemap =
                dirty::PagemapReader::new(sb.pid, &mapping).map_err(|e| Error::internal("open pagemap", e))?;
            let mut control = sb.control.lock().await;
            let t0 = Instant::now();
            control.pause().await?;
            // Resumes the source if this future stops (a panic) before it
            // resumes it itself below.
            let mut resume_guard = ResumeOnDrop(Some(sb.clone()));
            let t_stop = t0.elapsed();
            let inside = crate::core::blocking::run(|| -> Result<(Vec<u64>, usize)> {
                let pages = pagemap.dirty_pages().map_err(|e| Error::internal("read pagemap", e))?;
                let runs = dirty::runs(&pages);
                let n = buf.copy_from(sb.pid, &mapping, &runs).map_err(|e| Error::internal("copy dirty pages", e))?;
                Ok((pages, n))
            });
            let t_copy = t0.elapsed();
            let saved = match &inside {
                Ok(_) => control.save_state(&staging.join("state")).await.map_err(Error::from),
                Err(_) => Ok(()),
            };
            let t_save = t0.elapsed();
            // Whatever happened, the source runs again.
            let resumed = control.resume().await;
            resume_guard.0 = None;
            let pause = t0.elapsed();
            drop(control);
            tracing::info!(
                sandbox = %req.id,
                stop_ms = ms(t_stop),
                capture_ms = ms(t_copy - t_stop),
                save_ms = ms(t_save - t_copy),
                resume_ms = ms(pause - t_save),
                "branch pause window {:.2} ms",
                ms(pause)
            );
            resumed?;
            let (pages, n) = inside?;
            saved?;
            Ok::<_, Error>((pages, n, buf, pause))
        }
        .await;
        let (pages, n, buf, pause) = match captured {
            Ok(v) => v,
            Err(e) => {
                drop((row, staged));
                self.release_dropped().await;
                return Err(e);
            }
        };
        rec.pause_ms = pause.as_secs_f64() * 1000.0;
        rec.dirty_bytes = n as u64;
        let counted = {
            let mut r = sb.record.lock().unwrap_or_else(|p| p.into_inner());
            r.branch_count += 1;
            r.clone()
        };
        self.store.put_sandbox(&counted)?;
        let rt = self.clone();
        let parent_dir = self.layout.snapshot_dir(&parent_tag);
        let mode = req.mode;
        let staging2 = staging.clone();
        let finish = tokio::task::spawn_blocking(move || -> Result<SnapshotRecord> {
            let writing = std::time::Instant::now();
            let data = buf.as_slice(n);
            let mem = staging2.join("mem");
            layer::clone_or_copy(&parent_dir.join("mem"), &mem)
                .map_err(|e| Error::internal("copy parent memory", e))?;
            let f =
                std::fs::OpenOptions::new().write(true).open(&mem).map_err(|e| Error::internal("open memory", e))?;
            use std::os::unix::fs::FileExt;
            for (i, p) in pages.iter().enumerate() {
                let chunk = &data[i * PAGE as usize..(i + 1) * PAGE as usize];
                f.write_all_at(chunk, p * PAGE).map_err(|e| Error::internal("write memory", e))?;
            }
            f.sync_all().map_err(|e| Error::internal("sync memory", e))?;
            drop(f);
            rec.memory_digest = match mode {
                BranchMode::Diff => layer::write_layer(&staging2.join("layer"), &pages, data)
                    .map_err(|e| Error::internal("write diff layer", e))?,
                BranchMode::Full => digest::sha256_file(&mem).map_err(|e| Error::internal("digest", e))?,
            };
            rec.state_digest =
                digest::sha256_file(&staging2.join("state")).map_err(|e| Error::internal("digest", e))?;
            if let Some(spec) = &rec.vm {
                crate::core::snapshots::write_vm_json(&staging2, spec)?;
            }
            rec.physical_size_bytes = layout::disk_usage(&staging2);
            rec.diff_ms = writing.elapsed().as_secs_f64() * 1000.0;
            Ok(rec)
        });
        let finish = async move {
            let written = finish.await.map_err(|e| Error::internal("branch writer", e)).and_then(|r| r);
            let placed = written.and_then(|mut rec| {
                let final_dir = rt.layout.snapshot_dir(&rec.tag);
                std::fs::rename(&staging, &final_dir).map_err(|e| Error::internal("rename snapshot into place", e))?;
                staged.commit();
                let _ = rt.store.ledger_remove("staging", &staging_key);
                rec.status = SnapshotStatus::Ready;
                rt.store.update_snapshot(&rec)?;
                Ok(rec)
            });
            match placed {
                Ok(rec) => {
                    row.commit();
                    rt.events.emit_ws("branch_done", rec.branched_from.as_str(), "", rec.tag.as_str(), &rec.owner, "");
                    Ok(rec)
                }
                Err(e) => {
                    drop(row);
                    rt.release_dropped().await;
                    Err(e)
                }
            }
        };
        if req.wait {
            finish.await
        } else {
            let pending = self
                .store
                .get_snapshot(tag.as_str())?
                .ok_or_else(|| Error::Internal(format!("branch {:?} vanished", tag.as_str())))?;
            tokio::spawn(async move {
                if let Err(e) = finish.await {
                    tracing::warn!("branch failed after capture: {e}");
                }
            });
            let mut p = pending;
            p.pause_ms = pause.as_secs_f64() * 1000.0;
            p.dirty_bytes = n as u64;
            Ok(p)
        }
    }

    /// Writes a flat, parentless copy of `tag` as `to`.
    pub async fn compact(self: &Arc<Self>, tag: &Tag, to: &Tag, owner: String) -> Result<SnapshotRecord> {
        let src = self.get_snapshot(tag)?;
        if src.status != SnapshotStatus::Ready {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {:?} is {}, not ready",
                src.tag,
                src.status.as_str()
            )));
        }
        self.admit_snapshot_write(
            &format!("compacting {:?} into {:?}", src.tag, to.as_str()),
            src.mem_mib as u64 * crate::core::snapshots::MIB,
        )?;
        let final_dir = self.layout.snapshot_dir(to);
        let mut spec = src.vm_spec()?;
        spec.mem_file = final_dir.join("mem");
        let mut rec = src.clone();
        rec.tag = to.clone();
        rec.status = SnapshotStatus::Writing;
        rec.kind = "full".into();
        rec.parent_tag = None;
        rec.parent_memory_digest = String::new();
        rec.created_at_unix = now_unix();
        rec.vm = Some(spec);
        rec.owner = owner;
        rec.shared = false;
        if final_dir.exists() {
            return Err(Error::AlreadyExists(format!("snapshot {:?} already exists", to.as_str())));
        }
        self.store.insert_snapshot(&rec)?;
        let row = self.lease(Resource::SnapshotRow(to.to_string()));
        let staging = self.layout.staging_for(to, &ids::nonce());
        let staging_key = staging.display().to_string();
        self.store.ledger_add("staging", &staging_key, to.as_str())?;
        let staged = self.lease(Resource::Staging(staging.clone()));
        let src_dir = self.layout.snapshot_dir(tag);
        let st = staging.clone();
        let spec_for_json = rec.vm.clone();
        let result = tokio::task::spawn_blocking(move || -> std::io::Result<(String, String, u64)> {
            std::fs::create_dir_all(&st)?;
            layer::clone_or_copy(&src_dir.join("mem"), &st.join("mem"))?;
            std::fs::copy(src_dir.join("state"), st.join("state"))?;
            if let Some(spec) = &spec_for_json {
                std::fs::write(st.join("vm.json"), serde_json::to_vec_pretty(spec).unwrap_or_default())?;
            }
            Ok((
                digest::sha256_file(&st.join("mem"))?,
                digest::sha256_file(&st.join("state"))?,
                layout::disk_usage(&st),
            ))
        })
        .await
        .map_err(|e| Error::internal("compact", e))
        .and_then(|r| r.map_err(|e| Error::internal("compact", e)));
        let renamed = result.and_then(|v| {
            std::fs::rename(&staging, &final_dir).map_err(|e| Error::internal("rename snapshot into place", e))?;
            staged.commit();
            let _ = self.store.ledger_remove("staging", &staging_key);
            Ok(v)
        });
        let finished = renamed.and_then(|(m, s, size)| {
            rec.memory_digest = m;
            rec.state_digest = s;
            rec.physical_size_bytes = size;
            rec.status = SnapshotStatus::Ready;
            self.store.update_snapshot(&rec)
        });
        match finished {
            Ok(()) => {
                row.commit();
                Ok(rec)
            }
            Err(e) => {
                // The leases not committed release the row and the staging dir.
                drop(row);
                self.release_dropped().await;
                Err(e)
            }
        }
    }

    /// Spawns from `from`, runs `args`, diff-branches into `tag`, and kills
    /// the transient sandbox on every path.
    pub async fn derive(
        self: &Arc<Self>,
        from: &Tag,
        tag: &Tag,
        args: Vec<String>,
        timeout: Duration,
        by: crate::core::tenants::Principal,
    ) -> Result<SnapshotRecord> {
        if args.is_empty() {
            return Err(Error::invalid("exec", "must name a command"));
        }
        if self.store.get_snapshot(tag.as_str())?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {:?} already exists", tag.as_str())));
        }
        // Checked again with the dirty size when the branch is taken.
        let ram = self.get_snapshot(from)?.mem_mib as u64 * crate::core::snapshots::MIB;
        self.admit_snapshot_write(&format!("deriving {:?} from {:?}", tag.as_str(), from.as_str()), ram)?;
        let kids = self
            .create_sandboxes(crate::core::sandboxes::CreateSandboxes {
                tag: from.clone(),
                n: 1,
                settings: Default::default(),
                workspace: String::new(),
                prewarm: false,
                owner: by.owner(),
                by,
            })
            .await?;
        let id = kids[0].id.clone();
        let result = async {
            let mut stream = self
                .exec(
                    &id,
                    forkd_agent_protocol::v1::ExecRequest {
                        args,
                        timeout_ms: timeout.as_millis() as u32,
                        ..Default::default()
                    },
                )
                .await?;
            let mut stderr = vec![];
            loop {
                match stream.next().await? {
                    Some(crate::agent::ExecEvent::Stderr(d)) => stderr.extend(d),
                    Some(crate::agent::ExecEvent::Stdout(_)) => {}
                    Some(crate::agent::ExecEvent::Exit(x)) => {
                        if x.timed_out {
                            return Err(Error::DeadlineExceeded(format!(
                                "the command ran longer than {} s",
                                timeout.as_secs()
                            )));
                        }
                        if x.exit_code != 0 {
                            return Err(Error::FailedPrecondition(format!(
                                "the command exited {}: {}",
                                x.exit_code,
                                String::from_utf8_lossy(&stderr).trim()
                            )));
                        }
                        break;
                    }
                    None => break,
                }
            }
            self.branch(BranchRequest {
                id: id.clone(),
                tag: Some(tag.clone()),
                mode: BranchMode::Diff,
                measure_only: false,
                wait: true,
            })
            .await
        }
        .await;
        let _ = self.delete_sandboxes(&[id], None, false).await;
        result
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Resumes a paused sandbox when dropped while still armed, so a branch
/// that stops between pause and resume never leaves its source paused.
struct ResumeOnDrop(Option<Arc<crate::core::sandboxes::Sandbox>>);

impl Drop for ResumeOnDrop {
    fn drop(&mut self) {
        let Some(sb) = self.0.take() else { return };
        tracing::warn!(sandbox = %sb.id, "a branch stopped while its source was paused; resuming it");
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Err(e) = sb.control.lock().await.resume().await {
                    tracing::warn!(sandbox = %sb.id, "resume after an interrupted branch: {e}");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_a_mode_in_forkd_s_or_the_reference_s_words() {
        let ok = |mode, live, diff, measure| requested(mode, live, diff, measure).unwrap();
        assert!(matches!(ok("", false, None, false), (BranchMode::Diff, false)), "forkd's default");
        assert!(matches!(ok("live", false, None, false), (BranchMode::Diff, false)));
        assert!(matches!(ok("", true, None, false), (BranchMode::Diff, false)));
        assert!(matches!(ok("", false, Some(true), false), (BranchMode::Diff, false)));
        assert!(matches!(ok("", false, Some(false), false), (BranchMode::Full, false)));
        assert!(matches!(ok("full", false, None, true), (BranchMode::Full, false)));
        assert!(matches!(ok("", false, None, true), (BranchMode::Full, false)), "the reference's measured branch");
        assert!(matches!(ok("measure", false, None, false), (BranchMode::Diff, true)), "measure only");
        for (mode, live, diff, measure, field) in [
            ("full", false, Some(true), false, "diff"),
            ("diff", false, Some(false), false, "diff"),
            ("diff", false, None, true, "measure_diff"),
            ("live", false, None, true, "measure_diff"),
            ("", true, None, true, "measure_diff"),
            ("", false, Some(true), true, "measure_diff"),
            ("measure", true, None, false, "mode"),
            ("measure", false, None, true, "mode"),
            ("full", true, None, false, "live"),
            ("fast", false, None, false, "mode"),
        ] {
            let e = requested(mode, live, diff, measure).unwrap_err().to_string();
            assert!(e.contains(field), "{mode:?} live={live} diff={diff:?} measure={measure}: {e}");
        }
    }
}
