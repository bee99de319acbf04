//! The catalog: projects, their API keys, and the named objects a project defines (saved
//! queries, cached datasets).
//!
//! Keys are never stored, only their SHA-256 ([`KeyHash`]); a new project's keys, and a new
//! access key, are shown once, when they are created. [`Catalog::authenticate`] looks a presented
//! key up by its hash and compares the stored hash in constant time; a revoked key
//! (`active: false`) authenticates as nothing, at once.
//!
//! Besides the master, write and read keys every project has, a project may have any number of
//! **access keys** (reference §6): each carries an [`AccessKeyDefinition`] (name, permissions,
//! options) that the server validated before storing it and applies on every request the key
//! makes. The catalog only keeps it; it does not interpret it. An access key is named in the keys
//! API either by the key itself or by its id, the first 16 hex digits of its hash (what a
//! listing shows, since the key itself is not kept).
//!
//! [`EmbeddedCatalog`] keeps the catalog in memory and writes it to one JSON file, replaced
//! atomically on every change. Catalog changes are rare (project and key administration), so a
//! whole-file rewrite is simple and cheap.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use tally_core::fsutil::write_atomically;
use tally_core::ids::{KeyHash, ProjectId, new_api_key};

/// The kinds of project key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    /// Works everywhere in its project, including administration.
    Master,
    /// Records events.
    Write,
    /// Runs queries and reads results and schema.
    Read,
    /// An access key: what it may do is in its [`AccessKeyDefinition`].
    Access,
}

/// An access key's definition, as the keys API accepted it (validated by the server).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessKeyDefinition {
    /// A name for people.
    pub name: String,
    /// The permissions (`writes`, `queries`, `saved_queries`, `cached_queries`, `datasets`,
    /// `schema`).
    pub permitted: Vec<String>,
    /// The options object: `writes`, `queries`, `saved_queries`, `cached_queries`, `datasets`.
    pub options: serde_json::Value,
}

/// An access key as the keys API shows it (never the key itself: only its id).
#[derive(Debug, Clone, PartialEq)]
pub struct AccessKeyInfo {
    /// The first 16 hex digits of the key's hash: names the key without revealing it.
    pub id: String,
    /// The key's project.
    pub project: ProjectId,
    /// False once revoked.
    pub active: bool,
    /// Creation time, ISO 8601.
    pub created_at: String,
    /// What the key may do.
    pub definition: Arc<AccessKeyDefinition>,
}

/// The kinds of named definition a project keeps in the catalog. The catalog stores them as
/// JSON, already validated by whoever puts them; their cached results live elsewhere
/// ([`crate::results`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    /// A saved (or cached) query.
    SavedQuery,
    /// A cached dataset.
    Dataset,
    /// A dashboard of the web UI.
    Dashboard,
}

/// What a presented key may do: which project, and as what kind of key.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyGrant {
    /// The key's project.
    pub project: ProjectId,
    /// The key's kind.
    pub kind: KeyKind,
    /// The presented key's hash (rate limits count per key).
    pub hash: KeyHash,
    /// For an access key, its definition.
    pub access: Option<Arc<AccessKeyDefinition>>,
}

/// A project as the catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectInfo {
    /// The id.
    pub id: ProjectId,
    /// The name given at creation.
    pub name: String,
    /// Creation time, ISO 8601.
    pub created_at: String,
}

/// A project just created, with its keys in the clear: the only time they are shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewProject {
    /// The id.
    pub id: ProjectId,
    /// The name.
    pub name: String,
    /// The master key.
    pub master_key: String,
    /// The write key.
    pub write_key: String,
    /// The read key.
    pub read_key: String,
}

/// Catalog failures.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// A bad project name.
    #[error("invalid project name: {0}")]
    InvalidName(String),
    /// No such project.
    #[error("project not found")]
    ProjectNotFound,
    /// No such key in the project.
    #[error("key not found")]
    KeyNotFound,
    /// The project already has as many access keys as it may.
    #[error("a project may have at most {0} access keys")]
    TooManyKeys(usize),
    /// The catalog could not be read or written.
    #[error("catalog storage error: {0}")]
    Io(#[from] io::Error),
    /// The catalog file is damaged.
    #[error("catalog file {path} is damaged: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Projects and keys.
pub trait Catalog: Send + Sync + std::fmt::Debug {
    /// Creates a project with new master, write and read keys.
    fn create_project(&self, name: &str, created_at: &str) -> Result<NewProject, CatalogError>;
    /// The project with this id.
    fn project(&self, id: &ProjectId) -> Option<ProjectInfo>;
    /// Whether a project with this id exists (cheaper than [`Catalog::project`]).
    fn has_project(&self, id: &ProjectId) -> bool {
        self.project(id).is_some()
    }
    /// Every project.
    fn projects(&self) -> Vec<ProjectInfo>;
    /// What the presented key may do; `None` for an unknown or revoked key.
    fn authenticate(&self, key: &str) -> Option<KeyGrant>;
    /// Revokes (`false`) or restores (`true`) a key of `project`, named by the key itself or,
    /// for an access key, its id.
    fn set_key_active(&self, project: &ProjectId, key: &str, active: bool) -> Result<(), CatalogError>;
    /// Creates an access key, active or already revoked: the key in the clear (shown only now)
    /// and how it is listed.
    fn create_access_key(
        &self,
        project: &ProjectId,
        definition: AccessKeyDefinition,
        active: bool,
        created_at: &str,
    ) -> Result<(String, AccessKeyInfo), CatalogError>;
    /// The project's access keys, oldest first.
    fn access_keys(&self, project: &ProjectId) -> Vec<AccessKeyInfo>;
    /// One access key, named by the key or its id.
    fn access_key(&self, project: &ProjectId, key: &str) -> Option<AccessKeyInfo>;
    /// Replaces an access key's definition and, when given, whether it is active.
    fn update_access_key(
        &self,
        project: &ProjectId,
        key: &str,
        definition: AccessKeyDefinition,
        active: Option<bool>,
    ) -> Result<AccessKeyInfo, CatalogError>;
    /// Deletes an access key; `false` if there was none.
    fn delete_access_key(&self, project: &ProjectId, key: &str) -> Result<bool, CatalogError>;
    /// Creates or replaces a named definition; `true` when it is new.
    fn put_object(
        &self,
        project: &ProjectId,
        kind: ObjectKind,
        name: &str,
        definition: serde_json::Value,
    ) -> Result<bool, CatalogError>;
    /// The named definition.
    fn object(&self, project: &ProjectId, kind: ObjectKind, name: &str) -> Option<serde_json::Value>;
    /// The project's definitions of `kind`, sorted by name.
    fn objects(&self, project: &ProjectId, kind: ObjectKind) -> Vec<(String, serde_json::Value)>;
    /// Deletes the named definition; `false` if there was none.
    fn delete_object(&self, project: &ProjectId, kind: ObjectKind, name: &str) -> Result<bool, CatalogError>;
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredKey {
    hash: String,
    kind: KeyKind,
    active: bool,
    /// Access keys only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access: Option<Arc<AccessKeyDefinition>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    created_at: Option<String>,
}

impl StoredKey {
    /// Whether `key` (a presented key, or an access key's id) names this key.
    fn named_by(&self, key: &str, presented: &str) -> bool {
        self.hash == presented
            || (self.access.is_some() && key.len() == ACCESS_KEY_ID_LEN && self.hash.starts_with(key))
    }

    fn access_info(&self, project: ProjectId) -> Option<AccessKeyInfo> {
        Some(AccessKeyInfo {
            id: self.hash[..ACCESS_KEY_ID_LEN].to_owned(),
            project,
            active: self.active,
            created_at: self.created_at.clone().unwrap_or_default(),
            definition: self.access.clone()?,
        })
    }
}

/// Hex digits of an access key's id.
const ACCESS_KEY_ID_LEN: usize = 16;

/// The most access keys one project may have.
pub const MAX_ACCESS_KEYS: usize = 10_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredProject {
    #[serde(flatten)]
    info: ProjectInfo,
    keys: Vec<StoredKey>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    saved_queries: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    datasets: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    dashboards: BTreeMap<String, serde_json::Value>,
}

impl StoredProject {
    fn objects(&self, kind: ObjectKind) -> &BTreeMap<String, serde_json::Value> {
        match kind {
            ObjectKind::SavedQuery => &self.saved_queries,
            ObjectKind::Dataset => &self.datasets,
            ObjectKind::Dashboard => &self.dashboards,
        }
    }

    fn objects_mut(&mut self, kind: ObjectKind) -> &mut BTreeMap<String, serde_json::Value> {
        match kind {
            ObjectKind::SavedQuery => &mut self.saved_queries,
            ObjectKind::Dataset => &mut self.datasets,
            ObjectKind::Dashboard => &mut self.dashboards,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CatalogFile {
    version: u32,
    projects: Vec<StoredProject>,
}

#[derive(Debug, Clone)]
struct KeyEntry {
    grant: KeyGrant,
    active: bool,
}

#[derive(Debug, Default)]
struct State {
    file: CatalogFile,
    keys: HashMap<KeyHash, KeyEntry>,
}

impl State {
    fn index(file: CatalogFile, path: &Path) -> Result<Self, CatalogError> {
        let mut keys = HashMap::new();
        for project in &file.projects {
            for key in &project.keys {
                let hash = KeyHash::from_hex(&key.hash).ok_or_else(|| CatalogError::Corrupt {
                    path: path.to_path_buf(),
                    reason: format!("bad key hash in project {}", project.info.id),
                })?;
                keys.insert(
                    hash,
                    KeyEntry {
                        grant: KeyGrant {
                            project: project.info.id,
                            kind: key.kind,
                            hash,
                            access: key.access.clone(),
                        },
                        active: key.active,
                    },
                );
            }
        }
        Ok(Self { file, keys })
    }
}

/// The catalog in one JSON file.
#[derive(Debug)]
pub struct EmbeddedCatalog {
    path: PathBuf,
    state: RwLock<State>,
}

/// The longest project name.
pub const MAX_PROJECT_NAME_CHARS: usize = 256;

impl EmbeddedCatalog {
    /// Opens the catalog file at `path`, or starts an empty catalog if it does not exist.
    pub fn open(path: &Path) -> Result<Self, CatalogError> {
        let file = match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice::<CatalogFile>(&bytes).map_err(|e| CatalogError::Corrupt {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => CatalogFile {
                version: 1,
                projects: Vec::new(),
            },
            Err(e) => return Err(e.into()),
        };
        Ok(Self {
            path: path.to_path_buf(),
            state: RwLock::new(State::index(file, path)?),
        })
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, file: &CatalogFile) -> Result<(), CatalogError> {
        let bytes = serde_json::to_vec_pretty(file).map_err(io::Error::other)?;
        write_atomically(&self.path, &bytes)?;
        Ok(())
    }
}

impl EmbeddedCatalog {
    /// Changes one key of `project` (named by the key or an access key's id), persists, and
    /// re-indexes, so the change applies to the very next request.
    fn change_key(
        &self,
        project: &ProjectId,
        key: &str,
        change: impl FnOnce(&mut StoredKey) -> Result<(), CatalogError>,
    ) -> Result<Option<AccessKeyInfo>, CatalogError> {
        let presented = KeyHash::of(key).to_hex();
        self.change_project(project, |stored| {
            let stored_key = stored
                .keys
                .iter_mut()
                .find(|k| k.named_by(key, &presented))
                .ok_or(CatalogError::KeyNotFound)?;
            change(stored_key)?;
            Ok((stored_key.access_info(*project), true))
        })
    }

    /// Changes one project; when `change` says it changed something, persists and re-indexes,
    /// so the change applies to the very next request.
    fn change_project<T>(
        &self,
        project: &ProjectId,
        change: impl FnOnce(&mut StoredProject) -> Result<(T, bool), CatalogError>,
    ) -> Result<T, CatalogError> {
        let mut state = self.write();
        let mut file = state.file.clone();
        let stored = file
            .projects
            .iter_mut()
            .find(|p| p.info.id == *project)
            .ok_or(CatalogError::ProjectNotFound)?;
        let (out, changed) = change(stored)?;
        if changed {
            self.persist(&file)?;
            *state = State::index(file, &self.path)?;
        }
        Ok(out)
    }
}

fn check_project_name(name: &str) -> Result<(), CatalogError> {
    if name.trim().is_empty() {
        return Err(CatalogError::InvalidName("a project needs a name".into()));
    }
    if name.chars().count() > MAX_PROJECT_NAME_CHARS {
        return Err(CatalogError::InvalidName(format!(
            "a project name may be at most {MAX_PROJECT_NAME_CHARS} characters"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(CatalogError::InvalidName(
            "a project name may not contain control characters".into(),
        ));
    }
    Ok(())
}

impl Catalog for EmbeddedCatalog {
    fn create_project(&self, name: &str, created_at: &str) -> Result<NewProject, CatalogError> {
        check_project_name(name)?;
        let created = NewProject {
            id: ProjectId::random(),
            name: name.to_string(),
            master_key: new_api_key(),
            write_key: new_api_key(),
            read_key: new_api_key(),
        };
        let keys = [
            (&created.master_key, KeyKind::Master),
            (&created.write_key, KeyKind::Write),
            (&created.read_key, KeyKind::Read),
        ];
        let mut state = self.write();
        let mut file = state.file.clone();
        file.projects.push(StoredProject {
            info: ProjectInfo {
                id: created.id,
                name: created.name.clone(),
                created_at: created_at.to_string(),
            },
            keys: keys
                .iter()
                .map(|(key, kind)| StoredKey {
                    hash: KeyHash::of(key).to_hex(),
                    kind: *kind,
                    active: true,
                    access: None,
                    created_at: None,
                })
                .collect(),
            saved_queries: BTreeMap::new(),
            datasets: BTreeMap::new(),
            dashboards: BTreeMap::new(),
        });
        self.persist(&file)?;
        *state = State::index(file, &self.path)?;
        Ok(created)
    }

    fn project(&self, id: &ProjectId) -> Option<ProjectInfo> {
        self.read()
            .file
            .projects
            .iter()
            .find(|p| p.info.id == *id)
            .map(|p| p.info.clone())
    }

    fn has_project(&self, id: &ProjectId) -> bool {
        self.read().file.projects.iter().any(|p| p.info.id == *id)
    }

    fn projects(&self) -> Vec<ProjectInfo> {
        self.read().file.projects.iter().map(|p| p.info.clone()).collect()
    }

    fn authenticate(&self, key: &str) -> Option<KeyGrant> {
        let presented = KeyHash::of(key);
        let state = self.read();
        let entry = state.keys.get(&presented)?;
        (entry.active && entry.grant.hash.ct_eq(&presented)).then(|| entry.grant.clone())
    }

    fn set_key_active(&self, project: &ProjectId, key: &str, active: bool) -> Result<(), CatalogError> {
        self.change_key(project, key, |stored| {
            stored.active = active;
            Ok(())
        })
        .map(|_| ())
    }

    fn create_access_key(
        &self,
        project: &ProjectId,
        definition: AccessKeyDefinition,
        active: bool,
        created_at: &str,
    ) -> Result<(String, AccessKeyInfo), CatalogError> {
        let key = new_api_key();
        let info = self.change_project(project, |stored| {
            if stored.keys.iter().filter(|k| k.access.is_some()).count() >= MAX_ACCESS_KEYS {
                return Err(CatalogError::TooManyKeys(MAX_ACCESS_KEYS));
            }
            let new = StoredKey {
                hash: KeyHash::of(&key).to_hex(),
                kind: KeyKind::Access,
                active,
                access: Some(Arc::new(definition)),
                created_at: Some(created_at.to_owned()),
            };
            let info = new.access_info(*project).expect("an access key");
            stored.keys.push(new);
            Ok((info, true))
        })?;
        Ok((key, info))
    }

    fn access_keys(&self, project: &ProjectId) -> Vec<AccessKeyInfo> {
        let state = self.read();
        state
            .file
            .projects
            .iter()
            .find(|p| p.info.id == *project)
            .map(|p| p.keys.iter().filter_map(|k| k.access_info(*project)).collect())
            .unwrap_or_default()
    }

    fn access_key(&self, project: &ProjectId, key: &str) -> Option<AccessKeyInfo> {
        let presented = KeyHash::of(key).to_hex();
        let state = self.read();
        let stored = state.file.projects.iter().find(|p| p.info.id == *project)?;
        stored
            .keys
            .iter()
            .find(|k| k.access.is_some() && k.named_by(key, &presented))
            .and_then(|k| k.access_info(*project))
    }

    fn update_access_key(
        &self,
        project: &ProjectId,
        key: &str,
        definition: AccessKeyDefinition,
        active: Option<bool>,
    ) -> Result<AccessKeyInfo, CatalogError> {
        let definition = Arc::new(definition);
        self.change_key(project, key, |stored| {
            if stored.access.is_none() {
                return Err(CatalogError::KeyNotFound);
            }
            stored.access = Some(definition.clone());
            if let Some(active) = active {
                stored.active = active;
            }
            Ok(())
        })
        .map(|info| info.expect("an access key"))
    }

    fn delete_access_key(&self, project: &ProjectId, key: &str) -> Result<bool, CatalogError> {
        let presented = KeyHash::of(key).to_hex();
        self.change_project(project, |stored| {
            let before = stored.keys.len();
            stored
                .keys
                .retain(|k| !(k.access.is_some() && k.named_by(key, &presented)));
            let deleted = stored.keys.len() < before;
            Ok((deleted, deleted))
        })
    }

    fn put_object(
        &self,
        project: &ProjectId,
        kind: ObjectKind,
        name: &str,
        definition: serde_json::Value,
    ) -> Result<bool, CatalogError> {
        self.change_project(project, |stored| {
            let created = stored
                .objects_mut(kind)
                .insert(name.to_owned(), definition)
                .is_none();
            Ok((created, true))
        })
    }

    fn object(&self, project: &ProjectId, kind: ObjectKind, name: &str) -> Option<serde_json::Value> {
        let state = self.read();
        let stored = state.file.projects.iter().find(|p| p.info.id == *project)?;
        stored.objects(kind).get(name).cloned()
    }

    fn objects(&self, project: &ProjectId, kind: ObjectKind) -> Vec<(String, serde_json::Value)> {
        let state = self.read();
        state
            .file
            .projects
            .iter()
            .find(|p| p.info.id == *project)
            .map(|p| {
                p.objects(kind)
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn delete_object(&self, project: &ProjectId, kind: ObjectKind, name: &str) -> Result<bool, CatalogError> {
        self.change_project(project, |stored| {
            let deleted = stored.objects_mut(kind).remove(name).is_some();
            Ok((deleted, deleted))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projects_and_keys_survive_reopening_and_keys_are_stored_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.json");
        let catalog = EmbeddedCatalog::open(&path).unwrap();
        let created = catalog
            .create_project("default", "2026-01-01T00:00:00.000Z")
            .unwrap();
        assert_eq!(
            catalog.authenticate(&created.write_key),
            Some(KeyGrant {
                project: created.id,
                kind: KeyKind::Write,
                hash: KeyHash::of(&created.write_key),
                access: None,
            })
        );
        assert_eq!(catalog.authenticate("nope"), None);

        let text = std::fs::read_to_string(&path).unwrap();
        for key in [&created.master_key, &created.write_key, &created.read_key] {
            assert!(!text.contains(key.as_str()), "a key is stored in the clear");
        }

        let reopened = EmbeddedCatalog::open(&path).unwrap();
        assert_eq!(reopened.projects().len(), 1);
        assert_eq!(
            reopened.authenticate(&created.read_key).unwrap().kind,
            KeyKind::Read
        );
        reopened
            .set_key_active(&created.id, &created.read_key, false)
            .unwrap();
        assert_eq!(
            reopened.authenticate(&created.read_key),
            None,
            "revocation is immediate"
        );
        assert_eq!(
            EmbeddedCatalog::open(&path)
                .unwrap()
                .authenticate(&created.read_key),
            None
        );
    }

    #[test]
    fn named_objects_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.json");
        let catalog = EmbeddedCatalog::open(&path).unwrap();
        let p = catalog.create_project("p", "t").unwrap().id;
        let q = serde_json::json!({"query": {"analysis_type": "count"}});
        assert!(
            catalog
                .put_object(&p, ObjectKind::SavedQuery, "b", q.clone())
                .unwrap()
        );
        assert!(
            catalog
                .put_object(&p, ObjectKind::SavedQuery, "a", q.clone())
                .unwrap()
        );
        assert!(
            !catalog
                .put_object(&p, ObjectKind::SavedQuery, "a", q.clone())
                .unwrap()
        );
        assert!(catalog.object(&p, ObjectKind::Dataset, "a").is_none());
        let reopened = EmbeddedCatalog::open(&path).unwrap();
        let names: Vec<String> = reopened
            .objects(&p, ObjectKind::SavedQuery)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert!(reopened.delete_object(&p, ObjectKind::SavedQuery, "a").unwrap());
        assert!(!reopened.delete_object(&p, ObjectKind::SavedQuery, "a").unwrap());
        assert_eq!(
            EmbeddedCatalog::open(&path)
                .unwrap()
                .objects(&p, ObjectKind::SavedQuery)
                .len(),
            1
        );
        assert!(matches!(
            reopened.put_object(&ProjectId::random(), ObjectKind::Dataset, "x", q),
            Err(CatalogError::ProjectNotFound)
        ));
    }

    #[test]
    fn bad_names_and_damaged_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.json");
        let catalog = EmbeddedCatalog::open(&path).unwrap();
        assert!(matches!(
            catalog.create_project(" ", "t"),
            Err(CatalogError::InvalidName(_))
        ));
        assert!(matches!(
            catalog.create_project("a\nb", "t"),
            Err(CatalogError::InvalidName(_))
        ));
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(
            EmbeddedCatalog::open(&path),
            Err(CatalogError::Corrupt { .. })
        ));
    }

    #[test]
    fn access_keys_are_named_by_key_or_id_and_changes_apply_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.json");
        let catalog = EmbeddedCatalog::open(&path).unwrap();
        let p = catalog.create_project("p", "t").unwrap();
        let definition = AccessKeyDefinition {
            name: "customer a".into(),
            permitted: vec!["queries".into()],
            options: serde_json::json!({"queries": {"filters": []}}),
        };
        let (key, info) = catalog
            .create_access_key(&p.id, definition.clone(), true, "2026-01-01T00:00:00.000Z")
            .unwrap();
        assert!(!std::fs::read_to_string(&path).unwrap().contains(&key));
        let grant = catalog.authenticate(&key).unwrap();
        assert_eq!(grant.kind, KeyKind::Access);
        assert_eq!(grant.access.as_deref(), Some(&definition));
        assert_eq!(catalog.access_key(&p.id, &info.id), Some(info.clone()));
        assert_eq!(catalog.access_key(&p.id, &key), Some(info.clone()));
        assert_eq!(catalog.access_keys(&p.id), vec![info.clone()]);
        // The project's own keys are not access keys.
        assert!(catalog.access_key(&p.id, &p.read_key).is_none());
        assert!(matches!(
            catalog.update_access_key(&p.id, &p.read_key, definition.clone(), None),
            Err(CatalogError::KeyNotFound)
        ));

        catalog.set_key_active(&p.id, &info.id, false).unwrap();
        assert!(catalog.authenticate(&key).is_none(), "revoked at once");
        let renamed = AccessKeyDefinition {
            name: "renamed".into(),
            ..definition
        };
        let updated = catalog
            .update_access_key(&p.id, &key, renamed.clone(), Some(true))
            .unwrap();
        assert!(updated.active);
        let reopened = EmbeddedCatalog::open(&path).unwrap();
        assert_eq!(
            reopened.authenticate(&key).unwrap().access.as_deref(),
            Some(&renamed)
        );
        assert!(reopened.delete_access_key(&p.id, &key).unwrap());
        assert!(!reopened.delete_access_key(&p.id, &key).unwrap());
        assert!(reopened.authenticate(&key).is_none(), "deleted at once");
        assert!(reopened.authenticate(&p.master_key).is_some());
    }
}
