//! ImageService: the image store over gRPC (and REST). Import, pull and
//! build run as owned operations: a client that goes away stops waiting,
//! not the work, which finishes or cleans up its staging.

use std::pin::Pin;

use forkd_api::v1::{self as api, image_service_server::ImageService};
use futures::Stream;
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

use super::Services;
use super::access::principal;
use crate::core::Error;
use crate::images::ImportLimits;
use crate::images::manage::Stored;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Largest archive an import receives.
const MAX_ARCHIVE_BYTES: u64 = 16 << 30;

fn image_view(svc: &Services, (rec, names): Stored) -> api::Image {
    let snapshots = svc.rt.snapshots_using_image(&rec.digest);
    api::Image {
        digest: rec.digest,
        names,
        source: rec.source,
        origin: rec.origin,
        size_bytes: rec.size_bytes,
        created_at_unix: rec.created_at_unix,
        config: Some(api::ImageConfig {
            env: rec.config.env,
            working_dir: rec.config.working_dir,
            user: rec.config.user,
            entrypoint: rec.config.entrypoint,
            cmd: rec.config.cmd,
            labels: rec.config.labels.into_iter().collect(),
        }),
        runtime: rec.runtime,
        snapshots,
    }
}

/// The built-in images, as the store lists them.
fn builtins(svc: &Services) -> Vec<api::Image> {
    ["python", "minimal"]
        .into_iter()
        .filter_map(|name| {
            let info = svc.rt.guest.image(name).ok()?;
            let size_bytes = std::fs::metadata(&info.path).map(|m| m.len()).unwrap_or(0);
            Some(api::Image {
                digest: String::new(),
                names: vec![name.to_string()],
                source: "builtin".into(),
                origin: info.path.display().to_string(),
                size_bytes,
                created_at_unix: 0,
                config: Some(api::ImageConfig::default()),
                runtime: if info.runtime == "none" { String::new() } else { info.runtime },
                snapshots: svc.rt.snapshots_using_image(name),
            })
        })
        .collect()
}

fn progress_stream(
    rx: tokio::sync::mpsc::Receiver<Result<api::ImageProgress, Status>>,
) -> BoxStream<api::ImageProgress> {
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl ImageService for Services {
    async fn list_images(
        &self,
        _r: Request<api::ListImagesRequest>,
    ) -> Result<Response<api::ListImagesResponse>, Status> {
        let mut images = builtins(self);
        images.extend(self.rt.images.store.list().into_iter().map(|s| image_view(self, s)));
        Ok(Response::new(api::ListImagesResponse { images }))
    }

    async fn get_image(&self, r: Request<api::GetImageRequest>) -> Result<Response<api::Image>, Status> {
        let name = r.into_inner().name;
        if let Some(b) = builtins(self).into_iter().find(|b| b.names.contains(&name)) {
            return Ok(Response::new(b));
        }
        let s = self
            .rt
            .images
            .store
            .get(&name)
            .ok_or_else(|| Error::NotFound(format!("image {name:?} not found (see `forkd image ls`)")))?;
        Ok(Response::new(image_view(self, s)))
    }

    async fn delete_image(
        &self,
        r: Request<api::DeleteImageRequest>,
    ) -> Result<Response<api::DeleteImageResponse>, Status> {
        let p = principal(&r);
        let name = r.into_inner().name;
        if matches!(name.as_str(), "python" | "minimal") {
            return Err(
                Error::FailedPrecondition(format!("{name:?} is built in (it comes with the guest assets)")).into()
            );
        }
        let images = self.rt.images.clone();
        if let Some((rec, _)) = images.store.get(&name)
            && !p.is_admin()
            && !p.owns(&rec.owner)
        {
            return Err(Error::NotFound(format!("image {name:?} not found")).into());
        }
        let rt = self.rt.clone();
        let (digest, removed) = tokio::task::spawn_blocking(move || {
            images.store.remove(&name, &|d| rt.snapshots_using_image(d)).map_err(Error::from)
        })
        .await
        .map_err(|e| Error::internal("remove image", e))??;
        Ok(Response::new(api::DeleteImageResponse { digest, removed }))
    }

    async fn import_image(
        &self,
        r: Request<Streaming<api::ImportImageRequest>>,
    ) -> Result<Response<api::Image>, Status> {
        let p = principal(&r);
        let mut s = r.into_inner();
        let first = s.message().await?.ok_or_else(|| Error::invalid("data", "the archive is empty"))?;
        let (name, reference, allow_devices) = (first.name.clone(), first.r#ref.clone(), first.allow_devices);
        if !name.is_empty() {
            crate::images::store::check_name(&name).map_err(Error::from)?;
        }
        // Receive the archive into the store's staging area first.
        let staging = self.rt.images.store.staging().map_err(Error::from)?;
        let archive = staging.join("archive.tar");
        let received = async {
            let mut f = tokio::fs::File::create(&archive).await.map_err(|e| Error::internal("create archive", e))?;
            let mut total = first.data.len() as u64;
            f.write_all(&first.data).await.map_err(|e| Error::internal("write archive", e))?;
            while let Some(m) = s.message().await? {
                total += m.data.len() as u64;
                if total > MAX_ARCHIVE_BYTES {
                    return Err(Error::invalid("data", format!("the archive exceeds {MAX_ARCHIVE_BYTES} bytes")).into());
                }
                f.write_all(&m.data).await.map_err(|e| Error::internal("write archive", e))?;
            }
            f.flush().await.map_err(|e| Error::internal("write archive", e))?;
            Ok::<(), Status>(())
        }
        .await;
        if let Err(e) = received {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
        let images = self.rt.images.clone();
        let owner = p.owner();
        let work = async move {
            let out = tokio::task::spawn_blocking(move || {
                let limits = ImportLimits { allow_devices, ..Default::default() };
                let r = images.import(
                    &archive,
                    &name,
                    (!reference.is_empty()).then_some(reference.as_str()),
                    &limits,
                    &owner,
                );
                let _ = std::fs::remove_dir_all(&staging);
                r
            })
            .await
            .map_err(|e| Error::internal("import", e))?;
            out.map_err(Error::from)
        };
        let stored = crate::core::operations::owned("image import", work, None).await?;
        crate::edge::audit::acted_on(format!("image {}", stored.0.digest));
        Ok(Response::new(image_view(self, stored)))
    }

    type PullImageStream = BoxStream<api::ImageProgress>;

    async fn pull_image(&self, r: Request<api::PullImageRequest>) -> Result<Response<Self::PullImageStream>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        if r.reference.is_empty() {
            return Err(Error::invalid("reference", "must name an image, e.g. localhost:5000/team/app:1").into());
        }
        if !r.name.is_empty() {
            crate::images::store::check_name(&r.name).map_err(Error::from)?;
        }
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let images = self.rt.images.clone();
        let svc = self.clone();
        let owner = p.owner();
        tokio::spawn(async move {
            let ptx = tx.clone();
            let progress = move |pp: crate::images::registry::PullProgress| {
                let ev = api::ImageProgress {
                    event: Some(api::image_progress::Event::Layer(api::LayerProgress {
                        digest: pp.layer,
                        done: pp.done,
                        total: pp.total,
                    })),
                };
                // Progress is advisory: a full queue drops an update.
                let _ = ptx.try_send(Ok(ev));
            };
            let work = {
                let images = images.clone();
                async move { images.pull(&r.reference, &r.name, &owner, &progress).await.map_err(Error::from) }
            };
            let msg = match crate::core::operations::owned("image pull", work, None).await {
                Ok(stored) => {
                    Ok(api::ImageProgress { event: Some(api::image_progress::Event::Image(image_view(&svc, stored))) })
                }
                Err(e) => Err(Status::from(e)),
            };
            let _ = tx.send(msg).await;
        });
        Ok(Response::new(progress_stream(rx)))
    }

    type BuildImageStream = BoxStream<api::ImageProgress>;

    async fn build_image(
        &self,
        r: Request<api::BuildImageRequest>,
    ) -> Result<Response<Self::BuildImageStream>, Status> {
        let p = principal(&r);
        let r = r.into_inner();
        crate::images::store::check_name(&r.name).map_err(Error::from)?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let images = self.rt.images.clone();
        let svc = self.clone();
        let owner = p.owner();
        tokio::spawn(async move {
            let ltx = tx.clone();
            let work = async move {
                tokio::task::spawn_blocking(move || {
                    let mut log = |line: &str| {
                        let ev = api::ImageProgress { event: Some(api::image_progress::Event::Log(line.to_string())) };
                        let _ = ltx.try_send(Ok(ev));
                    };
                    images.build(&r.name, &r.from, r.apt, r.pip, r.run, &owner, &mut log)
                })
                .await
                .map_err(|e| Error::internal("build", e))?
                .map_err(Error::from)
            };
            let msg = match crate::core::operations::owned("image build", work, None).await {
                Ok(stored) => {
                    Ok(api::ImageProgress { event: Some(api::image_progress::Event::Image(image_view(&svc, stored))) })
                }
                Err(e) => Err(Status::from(e)),
            };
            let _ = tx.send(msg).await;
        });
        Ok(Response::new(progress_stream(rx)))
    }
}
