//! Event sinks the process stage can write to before the columnar store exists.
//!
//! [`JsonLinesSink`] appends enriched events to one JSON-lines file, each batch followed by a
//! commit line `{"committed_position": N}`, and fsyncs. On open, anything after the last commit
//! line (a batch cut short by a crash) is removed, so the file and its committed position always
//! agree: the process stage resumes from that position and writes nothing twice.
//! [`MemorySink`] keeps events in memory, for tests.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{Value, json};
use tally_core::event::{EnrichedEvent, EventSink, PartitionPositions, SinkError};

/// Enriched events in a JSON-lines file.
#[derive(Debug)]
pub struct JsonLinesSink {
    path: PathBuf,
    state: Mutex<(File, Option<u64>)>,
}

/// One stored line: `{"project_id", "collection", "event"}`.
pub type StoredLine = Value;

/// Reads the committed lines of a sink file and the position after the last commit line.
pub fn read_committed(path: &Path) -> io::Result<(Vec<StoredLine>, Option<u64>, u64)> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), None, 0)),
        Err(e) => return Err(e),
    };
    let mut events = Vec::new();
    let mut pending = Vec::new();
    let mut committed = None;
    let mut committed_len = 0u64;
    let mut offset = 0u64;
    for line in BufReader::new(file).split(b'\n') {
        let line = line?;
        offset += line.len() as u64 + 1;
        let Ok(value) = serde_json::from_slice::<Value>(&line) else {
            break;
        };
        if let Some(position) = value.get("committed_position").and_then(Value::as_u64) {
            events.append(&mut pending);
            committed = Some(position);
            committed_len = offset;
        } else {
            pending.push(value);
        }
    }
    Ok((events, committed, committed_len))
}

impl JsonLinesSink {
    /// Opens (creating) the sink file, dropping any uncommitted tail.
    pub fn open(path: &Path) -> io::Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let (_, committed, committed_len) = read_committed(path)?;
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        if file.metadata()?.len() > committed_len {
            tracing::warn!(path = %path.display(), "dropping an uncommitted tail of the enriched-events file");
            file.set_len(committed_len)?;
            file.sync_all()?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            state: Mutex::new((file, committed)),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl EventSink for JsonLinesSink {
    fn write(&self, events: &[EnrichedEvent], log_position: u64) -> Result<(), SinkError> {
        let mut buffer = Vec::with_capacity(events.len() * 600);
        for event in events {
            // The event is already JSON text: copied, not re-serialised.
            buffer.extend_from_slice(b"{\"project_id\":\"");
            buffer.extend_from_slice(event.project.to_string().as_bytes());
            buffer.extend_from_slice(b"\",\"collection\":");
            serde_json::to_writer(&mut buffer, &event.collection).map_err(|e| SinkError(e.to_string()))?;
            buffer.extend_from_slice(b",\"event\":");
            buffer.extend_from_slice(event.json.as_bytes());
            buffer.extend_from_slice(
                b"}
",
            );
        }
        serde_json::to_writer(&mut buffer, &json!({"committed_position": log_position}))
            .map_err(|e| SinkError(e.to_string()))?;
        buffer.push(b'\n');
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let written = state.0.write_all(&buffer).and_then(|()| state.0.sync_data());
        written.map_err(|e| SinkError(format!("{}: {e}", self.path.display())))?;
        state.1 = Some(log_position);
        Ok(())
    }

    fn committed_position(&self) -> Result<Option<u64>, SinkError> {
        Ok(self.state.lock().unwrap_or_else(|p| p.into_inner()).1)
    }
}

/// Events kept in memory, for tests.
#[derive(Debug, Default)]
pub struct MemorySink {
    state: Mutex<(Vec<EnrichedEvent>, Option<u64>, PartitionPositions)>,
}

impl MemorySink {
    /// Everything written so far.
    pub fn events(&self) -> Vec<EnrichedEvent> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0.clone()
    }
}

impl EventSink for MemorySink {
    fn write(&self, events: &[EnrichedEvent], log_position: u64) -> Result<(), SinkError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.0.extend_from_slice(events);
        state.1 = Some(log_position);
        Ok(())
    }

    fn committed_position(&self) -> Result<Option<u64>, SinkError> {
        Ok(self.state.lock().unwrap_or_else(|p| p.into_inner()).1)
    }

    fn write_partitioned(
        &self,
        events: &[EnrichedEvent],
        positions: &PartitionPositions,
    ) -> Result<(), SinkError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.0.extend_from_slice(events);
        state.2.extend(positions.iter().map(|(k, v)| (k.clone(), *v)));
        Ok(())
    }

    fn durable_partitions(&self) -> Result<PartitionPositions, SinkError> {
        Ok(self.state.lock().unwrap_or_else(|p| p.into_inner()).2.clone())
    }
}
