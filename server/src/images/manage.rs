//! Getting an image into the store: import an archive, pull from a
//! registry, or build with packages. Each way stages a root tree under the
//! store, writes it as ext4, and only then moves it into place.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::store::{ImageRecord, ImageStore, check_name};
use super::{ImageConfig, ImageError, ImportLimits, SourceImage};

/// The image store and what it needs to fill it.
pub struct Images {
    pub store: ImageStore,
    /// Where package builds keep their download caches.
    pub cache: PathBuf,
    /// The guest assets directory (built-in images and their recipes).
    pub guest_dir: PathBuf,
    pub registry: super::registry::PullOptions,
    /// Digest → config, read once (an image never changes under a digest).
    configs: std::sync::Mutex<std::collections::HashMap<String, ImageConfig>>,
}

/// The result of a put: the record and the image's names.
pub type Stored = (ImageRecord, Vec<String>);

fn now_unix() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Removes a staging directory when dropped (on every error path).
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// "python" when the tree has python3 (a file or a link), else "".
fn runtime_of(root: &Path) -> String {
    let has = ["usr/bin/python3", "usr/local/bin/python3", "bin/python3"]
        .iter()
        .any(|p| std::fs::symlink_metadata(root.join(p)).is_ok());
    if has { "python".into() } else { String::new() }
}

impl Images {
    pub fn new(data_dir: &Path, cache: PathBuf, guest_dir: PathBuf) -> Arc<Self> {
        let store = ImageStore::new(data_dir.join("images"));
        store.clean_staging();
        Arc::new(Images {
            store,
            cache,
            guest_dir,
            registry: super::registry::PullOptions::from_env().unwrap_or_else(|e| {
                tracing::warn!("registry settings ignored: {e}");
                Default::default()
            }),
            configs: Default::default(),
        })
    }

    /// The config of a stored image (cached by digest).
    pub fn config(&self, digest: &str) -> Option<ImageConfig> {
        if let Some(c) = self.configs.lock().ok()?.get(digest) {
            return Some(c.clone());
        }
        let (rec, _) = self.store.get(digest)?;
        self.configs.lock().ok()?.insert(digest.to_string(), rec.config.clone());
        Some(rec.config)
    }

    /// Stages `tree` as ext4 and stores it.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        staging: &Path,
        tree: &Path,
        digest: String,
        config: ImageConfig,
        source: &str,
        origin: String,
        names: &[String],
        owner: &str,
    ) -> Result<Stored, ImageError> {
        let runtime = runtime_of(tree);
        let out = staging.join("image").join("rootfs.ext4");
        std::fs::create_dir_all(out.parent().expect("parent")).map_err(|e| ImageError::io("staging", e))?;
        let size_bytes = super::ext4::make_ext4(tree, &out)?;
        let rec = ImageRecord {
            digest: digest.clone(),
            source: source.into(),
            origin,
            size_bytes,
            created_at_unix: now_unix(),
            config,
            runtime,
            owner: owner.into(),
        };
        self.store.put(&out, &rec, names)?;
        self.store.get(&digest).ok_or_else(|| ImageError::NotFound(format!("image {digest} vanished")))
    }

    /// Imports an OCI layout/archive or `docker save` tarball at `archive`.
    pub fn import(
        &self,
        archive: &Path,
        name: &str,
        reference: Option<&str>,
        limits: &ImportLimits,
        owner: &str,
    ) -> Result<Stored, ImageError> {
        if !name.is_empty() {
            check_name(name)?;
        }
        let staging = Staging(self.store.staging()?);
        let scratch = staging.0.join("source");
        let src = super::source::read_source_ref(archive, &scratch, reference)?;
        self.apply_and_store(&staging.0, src, name, "import", String::new(), limits, owner)
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_and_store(
        &self,
        staging: &Path,
        src: SourceImage,
        name: &str,
        source: &str,
        origin: String,
        limits: &ImportLimits,
        owner: &str,
    ) -> Result<Stored, ImageError> {
        let mut names = vec![];
        if !name.is_empty() {
            names.push(name.to_string());
        } else if let Some(r) = src.ref_name.as_deref().filter(|r| check_name(r).is_ok()) {
            names.push(r.to_string());
        }
        if self.store.resolve(&src.digest).is_some() {
            // The same image again: only the names change.
            let (rec, _) = self.store.get(&src.digest).expect("resolved");
            let dummy = staging.join("unused");
            self.store.put(&dummy, &rec, &names)?;
            return self.store.get(&src.digest).ok_or_else(|| ImageError::NotFound(src.digest.clone()));
        }
        let tree = staging.join("root");
        std::fs::create_dir_all(&tree).map_err(|e| ImageError::io("staging root", e))?;
        super::layers::apply_layers(&src.layers, &tree, limits)?;
        self.finish(staging, &tree, src.digest, src.config, source, origin, &names, owner)
    }

    /// Pulls `reference` from its registry.
    pub async fn pull(
        self: &Arc<Self>,
        reference: &str,
        name: &str,
        owner: &str,
        progress: &(dyn Fn(super::registry::PullProgress) + Send + Sync),
    ) -> Result<Stored, ImageError> {
        if !name.is_empty() {
            check_name(name)?;
        }
        let staging = Staging(self.store.staging()?);
        let layout = staging.0.join("layout");
        std::fs::create_dir_all(&layout).map_err(|e| ImageError::io("staging layout", e))?;
        let pulled = super::registry::pull(reference, &layout, &self.registry, progress).await?;
        let me = self.clone();
        let name = if name.is_empty() { reference.to_string() } else { name.to_string() };
        let owner = owner.to_string();
        let reference = reference.to_string();
        tokio::task::spawn_blocking(move || {
            let staging = staging;
            let scratch = staging.0.join("source");
            let src = super::source::read_source_ref(&layout, &scratch, None)?;
            if src.digest != pulled.digest {
                return Err(ImageError::Invalid(format!(
                    "the pulled layout's manifest is {} but the registry said {}",
                    src.digest, pulled.digest
                )));
            }
            me.apply_and_store(&staging.0, src, &name, "pull", reference, &ImportLimits::default(), &owner)
        })
        .await
        .map_err(|e| ImageError::Unavailable(format!("pull task: {e}")))?
    }

    /// Builds an image from a base and packages, or answers the stored one
    /// with the same inputs.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        &self,
        name: &str,
        from: &str,
        apt: Vec<String>,
        pip: Vec<String>,
        run: Vec<String>,
        owner: &str,
        log: &mut dyn FnMut(&str),
    ) -> Result<Stored, ImageError> {
        use super::build::{BuildBase, BuildSpec, Recipe};
        check_name(name)?;
        let from = if from.is_empty() { "python" } else { from };
        let staging = Staging(self.store.staging()?);
        let (base, base_digest) = match from {
            "python" | "minimal" => (
                BuildBase::Recipe(Recipe::load(&self.guest_dir.join(super::build::RECIPES_SUBDIR), from)?),
                String::new(),
            ),
            other => {
                let digest = self
                    .store
                    .resolve(other)
                    .ok_or_else(|| ImageError::NotFound(format!("base image {other:?} is not in the store")))?;
                let (rec, _) = self.store.get(&digest).ok_or_else(|| ImageError::NotFound(digest.clone()))?;
                let tree = staging.0.join("base");
                super::ext4::unpack_ext4(&self.store.rootfs(&digest), &tree)?;
                (BuildBase::Tree { dir: tree, config: rec.config }, digest)
            }
        };
        let mut spec = BuildSpec::new(base);
        spec.apt = apt;
        spec.pip = pip;
        spec.run = run;
        spec.validate()?;
        let digest = super::build::input_digest(&spec, &base_digest);
        if self.store.resolve(&digest).is_some() {
            log(&format!("same inputs as {digest}: taken from the store"));
            let (rec, _) = self.store.get(&digest).ok_or_else(|| ImageError::NotFound(digest.clone()))?;
            self.store.put(&staging.0.join("unused"), &rec, &[name.to_string()])?;
            return self.store.get(&digest).ok_or_else(|| ImageError::NotFound(digest.clone()));
        }
        let tree = staging.0.join("root");
        std::fs::create_dir_all(&tree).map_err(|e| ImageError::io("staging root", e))?;
        let config = super::build::build(&spec, &tree, &self.cache.join("build"), log)?;
        let origin = format!("from {from}; apt {:?}; pip {:?}; run {:?}", spec.apt, spec.pip, spec.run);
        self.finish(&staging.0, &tree, digest, config, "build", origin, &[name.to_string()], owner)
    }
}
