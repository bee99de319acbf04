//! The catalog: projects, their API keys, and the named objects a project defines (saved
//! queries, cached datasets).
//!
//! Keys are never stored, only their SHA-256 ([`KeyHash`]); a new project's keys are shown once,
//! when it is created. [`Catalog::authenticate`] looks a presented key up by its hash and compares
//! the stored hash in constant time; a revoked key (`active: false`) authenticates as nothing, at
//! once.
//!
//! [`EmbeddedCatalog`] keeps the catalog in memory and writes it to one JSON file, replaced
//! atomically on every change. Catalog changes are rare (project and key administration), so a
//! whole-file rewrite is simple and cheap.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

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
}

/// What a presented key may do: which project, and as what kind of key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyGrant {
    /// The key's project.
    pub project: ProjectId,
    /// The key's kind.
    pub kind: KeyKind,
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
    /// Revokes (`false`) or restores (`true`) a key of `project`.
    fn set_key_active(&self, project: &ProjectId, key: &str, active: bool) -> Result<(), CatalogError>;
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredProject {
    #[serde(flatten)]
    info: ProjectInfo,
    keys: Vec<StoredKey>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    saved_queries: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    datasets: BTreeMap<String, serde_json::Value>,
}

impl StoredProject {
    fn objects(&self, kind: ObjectKind) -> &BTreeMap<String, serde_json::Value> {
        match kind {
            ObjectKind::SavedQuery => &self.saved_queries,
            ObjectKind::Dataset => &self.datasets,
        }
    }

    fn objects_mut(&mut self, kind: ObjectKind) -> &mut BTreeMap<String, serde_json::Value> {
        match kind {
            ObjectKind::SavedQuery => &mut self.saved_queries,
            ObjectKind::Dataset => &mut self.datasets,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CatalogFile {
    version: u32,
    projects: Vec<StoredProject>,
}

#[derive(Debug, Clone, Copy)]
struct KeyEntry {
    hash: KeyHash,
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
                        hash,
                        grant: KeyGrant {
                            project: project.info.id,
                            kind: key.kind,
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
                })
                .collect(),
            saved_queries: BTreeMap::new(),
            datasets: BTreeMap::new(),
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
        (entry.active && entry.hash.ct_eq(&presented)).then_some(entry.grant)
    }

    fn set_key_active(&self, project: &ProjectId, key: &str, active: bool) -> Result<(), CatalogError> {
        let hash = KeyHash::of(key).to_hex();
        let mut state = self.write();
        let mut file = state.file.clone();
        let stored = file
            .projects
            .iter_mut()
            .find(|p| p.info.id == *project)
            .ok_or(CatalogError::ProjectNotFound)?;
        let stored_key = stored
            .keys
            .iter_mut()
            .find(|k| k.hash == hash)
            .ok_or(CatalogError::KeyNotFound)?;
        stored_key.active = active;
        self.persist(&file)?;
        *state = State::index(file, &self.path)?;
        Ok(())
    }

    fn put_object(
        &self,
        project: &ProjectId,
        kind: ObjectKind,
        name: &str,
        definition: serde_json::Value,
    ) -> Result<bool, CatalogError> {
        let mut state = self.write();
        let mut file = state.file.clone();
        let stored = file
            .projects
            .iter_mut()
            .find(|p| p.info.id == *project)
            .ok_or(CatalogError::ProjectNotFound)?;
        let created = stored
            .objects_mut(kind)
            .insert(name.to_owned(), definition)
            .is_none();
        self.persist(&file)?;
        state.file = file;
        Ok(created)
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
        let mut state = self.write();
        let mut file = state.file.clone();
        let stored = file
            .projects
            .iter_mut()
            .find(|p| p.info.id == *project)
            .ok_or(CatalogError::ProjectNotFound)?;
        if stored.objects_mut(kind).remove(name).is_none() {
            return Ok(false);
        }
        self.persist(&file)?;
        state.file = file;
        Ok(true)
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
                kind: KeyKind::Write
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
}
