//! Cached answers on disk: the last results of cached queries and the buckets of cached
//! datasets, so that after a restart they are served at once (stale, with their age shown)
//! while a refresh runs.
//!
//! Each object (a saved query, a dataset) is a directory of JSON *parts*, each replaced
//! atomically on its own: a dataset refresh that recomputes two buckets writes two small files,
//! not the whole dataset. A crash between parts leaves some parts newer than others; that is
//! harmless because the store's change tracking does not survive a restart (see
//! [`crate::events::DataVersion`]), so every loaded object is recomputed in full before its
//! parts are trusted as current again.
//!
//! ```text
//! <dir>/<kind>/<project id>/<name>/<part>.json
//! ```
//!
//! Names reaching this module were validated as `[A-Za-z0-9_-]` by the API; parts are chosen
//! by the caller from the same alphabet.

use std::io;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tally_core::fsutil::write_atomically;
use tally_core::ids::ProjectId;

use crate::catalog::ObjectKind;

/// The files of cached answers under one directory.
#[derive(Debug, Clone)]
pub struct ResultFiles {
    dir: PathBuf,
}

fn kind_dir(kind: ObjectKind) -> &'static str {
    match kind {
        ObjectKind::SavedQuery => "saved",
        ObjectKind::Dataset => "datasets",
        // Dashboards have no results of their own (their tiles are saved queries).
        ObjectKind::Dashboard => "dashboards",
    }
}

fn checked(name: &str) -> io::Result<&str> {
    let ok = !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(name)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a storable name: {name:?}"),
        ))
    }
}

impl ResultFiles {
    /// Cached answers under `dir` (created on first write).
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn object_dir(&self, project: &ProjectId, kind: ObjectKind, name: &str) -> io::Result<PathBuf> {
        Ok(self
            .dir
            .join(kind_dir(kind))
            .join(project.to_string())
            .join(checked(name)?))
    }

    /// Replaces one part of an object.
    pub fn save(
        &self,
        project: &ProjectId,
        kind: ObjectKind,
        name: &str,
        part: &str,
        value: &Value,
    ) -> io::Result<()> {
        let dir = self.object_dir(project, kind, name)?;
        std::fs::create_dir_all(&dir)?;
        let bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
        write_atomically(&dir.join(format!("{}.json", checked(part)?)), &bytes)
    }

    /// Removes one part of an object (absent is fine).
    pub fn remove(&self, project: &ProjectId, kind: ObjectKind, name: &str, part: &str) -> io::Result<()> {
        let path = self
            .object_dir(project, kind, name)?
            .join(format!("{}.json", checked(part)?));
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every part of an object, by part name. A part that is not valid JSON is skipped with a
    /// warning (it will be recomputed).
    pub fn load(
        &self,
        project: &ProjectId,
        kind: ObjectKind,
        name: &str,
    ) -> io::Result<Vec<(String, Value)>> {
        let dir = self.object_dir(project, kind, name)?;
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut parts = Vec::new();
        for entry in entries {
            let path = entry?.path();
            let Some(part) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .map(str::to_owned)
            else {
                continue;
            };
            match std::fs::read(&path).map(|b| serde_json::from_slice::<Value>(&b)) {
                Ok(Ok(value)) => parts.push((part, value)),
                Ok(Err(e)) => {
                    tracing::warn!(file = %path.display(), error = %e, "cached answer file is damaged; it will be recomputed")
                }
                Err(e) => return Err(e),
            }
        }
        parts.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(parts)
    }

    /// Removes an object and all its parts.
    pub fn remove_all(&self, project: &ProjectId, kind: ObjectKind, name: &str) -> io::Result<()> {
        match std::fs::remove_dir_all(self.object_dir(project, kind, name)?) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn parts_round_trip_and_bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let files = ResultFiles::new(dir.path());
        let p = ProjectId::random();
        files
            .save(&p, ObjectKind::Dataset, "d", "b-1", &json!([1]))
            .unwrap();
        files
            .save(&p, ObjectKind::Dataset, "d", "state", &json!({"v": 1}))
            .unwrap();
        files
            .save(&p, ObjectKind::Dataset, "d", "b-1", &json!([2]))
            .unwrap();
        let parts = files.load(&p, ObjectKind::Dataset, "d").unwrap();
        assert_eq!(
            parts,
            vec![("b-1".into(), json!([2])), ("state".into(), json!({"v": 1}))]
        );
        files.remove(&p, ObjectKind::Dataset, "d", "b-1").unwrap();
        assert_eq!(files.load(&p, ObjectKind::Dataset, "d").unwrap().len(), 1);
        assert!(files.load(&p, ObjectKind::SavedQuery, "d").unwrap().is_empty());
        assert!(
            files
                .save(&p, ObjectKind::Dataset, "../x", "a", &json!(1))
                .is_err()
        );
        assert!(
            files
                .save(&p, ObjectKind::Dataset, "x", "a/b", &json!(1))
                .is_err()
        );
        files.remove_all(&p, ObjectKind::Dataset, "d").unwrap();
        assert!(files.load(&p, ObjectKind::Dataset, "d").unwrap().is_empty());
    }
}
