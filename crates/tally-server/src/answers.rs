//! Answers kept ready: the `max_age` result cache, cached queries and cached datasets, and the
//! refresher that keeps them current.
//!
//! Definitions live in the catalog ([`ObjectKind`]); computed results live in memory here and on
//! disk in [`ResultFiles`], so after a restart they are served at once (their age shown in
//! `run_information`) and refreshed by the next tick. [`CachedAnswers::run_due`] is one tick of
//! the refresher: the server calls it on a timer, tests call it with a manual clock.
//!
//! A refresh that fails keeps the last good result; the failure shows in the object's
//! `run_information` and in `tally_cache_refreshes_total{outcome="failure"}`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tally_core::clock::Clock;
use tally_core::config::{CacheConfig, QueryConfig};
use tally_core::ids::ProjectId;
use tally_query::cache::ResultCache;
use tally_query::dataset::{Dataset, DatasetState, Update};
use tally_query::exec::Limits;
use tally_query::saved::{RefreshBounds, RunInfo, SavedQuery};
use tally_store::events::EventStore;
use tally_store::results::ResultFiles;
use tally_store::{Catalog, ObjectKind};

use crate::error::ApiError;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefreshLabels {
    kind: &'static str,
    outcome: &'static str,
}

/// A cached query's result and the lock its refreshes take.
#[derive(Debug, Default)]
struct SavedSlot {
    /// Held for a whole refresh, so two never interleave and a first request waits for a
    /// refresh in flight instead of starting another.
    refreshing: Mutex<()>,
    entry: Mutex<SavedEntry>,
}

/// A cached query's last result.
#[derive(Debug, Clone, Default)]
struct SavedEntry {
    /// The saved object's `result` (for a funnel, `{"steps", "result"}`).
    result: Option<Value>,
    run: RunInfo,
    /// When the next refresh is due (ms).
    next_run_ms: i64,
}

/// A dataset's buckets and how its refreshes went.
#[derive(Debug, Default)]
struct DatasetEntry {
    state: RwLock<DatasetState>,
    /// Held for a whole refresh, so two never interleave; results are served from `state`
    /// meanwhile.
    refreshing: Mutex<()>,
    run: Mutex<RunInfo>,
}

/// What one refresher tick did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TickReport {
    /// Cached queries refreshed.
    pub saved: usize,
    /// Datasets that had buckets to recompute or drop.
    pub datasets: usize,
}

/// See the module documentation.
#[derive(Debug)]
pub struct CachedAnswers {
    catalog: Arc<dyn Catalog>,
    store: Arc<EventStore>,
    files: ResultFiles,
    clock: Arc<dyn Clock>,
    query: QueryConfig,
    /// `refresh_rate` bounds for saved queries.
    pub bounds: RefreshBounds,
    /// The `max_age` cache of ad-hoc answers.
    pub results: ResultCache,
    saved: Mutex<HashMap<(ProjectId, String), Arc<SavedSlot>>>,
    datasets: Mutex<HashMap<(ProjectId, String), Arc<DatasetEntry>>>,
    refreshes: Family<RefreshLabels, Counter>,
    /// Seconds spent computing dataset refreshes, and the events they read: the cost of keeping
    /// datasets current (the refresh benchmark reads these).
    dataset_refresh_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    dataset_events_scanned: Counter,
}

fn bucket_part((start, end): (i64, i64)) -> String {
    format!("b{start}_{end}")
}

impl CachedAnswers {
    /// Loads the results kept on disk for every cached query and dataset in the catalog.
    pub fn open(
        catalog: Arc<dyn Catalog>,
        store: Arc<EventStore>,
        files: ResultFiles,
        clock: Arc<dyn Clock>,
        query: QueryConfig,
        cache: &CacheConfig,
        registry: &mut Registry,
    ) -> Self {
        let refreshes = Family::<RefreshLabels, Counter>::default();
        registry.register(
            "tally_cache_refreshes",
            "Refreshes of cached queries and datasets, by kind and outcome",
            refreshes.clone(),
        );
        let dataset_refresh_seconds = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "tally_dataset_refresh_seconds",
            "Seconds spent computing dataset buckets",
            dataset_refresh_seconds.clone(),
        );
        let dataset_events_scanned = Counter::default();
        registry.register(
            "tally_dataset_refresh_events_scanned",
            "Events read by dataset refreshes",
            dataset_events_scanned.clone(),
        );
        let answers = Self {
            catalog,
            store,
            files,
            clock,
            query,
            bounds: RefreshBounds {
                min_secs: cache.min_refresh_rate_secs,
                max_secs: cache.max_refresh_rate_secs.max(cache.min_refresh_rate_secs),
            },
            results: ResultCache::new(cache.result_cache_bytes),
            saved: Mutex::new(HashMap::new()),
            datasets: Mutex::new(HashMap::new()),
            refreshes,
            dataset_refresh_seconds,
            dataset_events_scanned,
        };
        answers.load();
        answers
    }

    fn load(&self) {
        let now = self.clock.now_ms();
        for project in self.catalog.projects() {
            let p = project.id;
            for (name, stored) in self.catalog.objects(&p, ObjectKind::SavedQuery) {
                if SavedQuery::from_stored(&stored).is_none_or(|s| s.refresh_rate == 0) {
                    continue;
                }
                let parts = self
                    .files
                    .load(&p, ObjectKind::SavedQuery, &name)
                    .unwrap_or_default();
                if let Some((_, kept)) = parts.into_iter().find(|(part, _)| part == "result") {
                    let entry = SavedEntry {
                        result: kept.get("result").cloned(),
                        run: serde_json::from_value(kept["run"].clone()).unwrap_or_default(),
                        // Served as it is, refreshed by the next tick.
                        next_run_ms: now,
                    };
                    let slot = SavedSlot {
                        refreshing: Mutex::new(()),
                        entry: Mutex::new(entry),
                    };
                    self.saved
                        .lock()
                        .expect("saved lock")
                        .insert((p, name), Arc::new(slot));
                }
            }
            for (name, _) in self.catalog.objects(&p, ObjectKind::Dataset) {
                let parts = self
                    .files
                    .load(&p, ObjectKind::Dataset, &name)
                    .unwrap_or_default();
                let parts: HashMap<String, Value> = parts.into_iter().collect();
                let Some(kept) = parts.get("state") else { continue };
                let mut state = DatasetState::default();
                for pair in kept["buckets"].as_array().into_iter().flatten() {
                    let (Some(start), Some(end)) = (pair[0].as_i64(), pair[1].as_i64()) else {
                        continue;
                    };
                    if let Some(Value::Object(values)) = parts.get(&bucket_part((start, end))) {
                        let values: HashMap<String, Value> = values.clone().into_iter().collect();
                        state.buckets.insert((start, end), Arc::new(values));
                    }
                }
                let entry = DatasetEntry {
                    state: RwLock::new(state),
                    refreshing: Mutex::new(()),
                    run: Mutex::new(serde_json::from_value(kept["run"].clone()).unwrap_or_default()),
                };
                self.datasets
                    .lock()
                    .expect("datasets lock")
                    .insert((p, name), Arc::new(entry));
            }
        }
    }

    /// Limits for one query started now.
    fn limits(&self) -> Limits {
        Limits::starting_now(&self.query)
    }

    fn count(&self, kind: &'static str, ok: bool) {
        self.refreshes
            .get_or_create(&RefreshLabels {
                kind,
                outcome: if ok { "success" } else { "failure" },
            })
            .inc();
    }

    // -----------------------------------------------------------------------------------------
    // Saved and cached queries

    /// Runs a saved query now: its `result` value.
    pub fn run_saved(&self, project: ProjectId, saved: &SavedQuery, now_ms: i64) -> Result<Value, ApiError> {
        let prepared = saved.prepare(now_ms)?;
        let body = prepared
            .run_json(|c| self.store.snapshot(project, c), &self.limits())
            .map_err(ApiError::from)?;
        Ok(saved_result(saved, body))
    }

    fn saved_slot(&self, project: ProjectId, name: &str) -> Arc<SavedSlot> {
        self.saved
            .lock()
            .expect("saved lock")
            .entry((project, name.to_owned()))
            .or_default()
            .clone()
    }

    fn is_current_saved(&self, project: ProjectId, name: &str, saved: &SavedQuery) -> bool {
        self.catalog
            .object(&project, ObjectKind::SavedQuery, name)
            .and_then(|stored| SavedQuery::from_stored(&stored))
            .is_some_and(|current| current == *saved)
    }

    /// Refreshes a cached query now, keeping the last good result if this run fails.
    pub fn refresh_saved(&self, project: ProjectId, name: &str, saved: &SavedQuery) -> Result<(), ApiError> {
        let slot = self.saved_slot(project, name);
        let _one_at_a_time = slot.refreshing.lock().expect("refresh lock");
        self.refresh_saved_locked(project, name, saved, &slot)
    }

    /// The refresh itself; the caller holds `slot.refreshing`.
    fn refresh_saved_locked(
        &self,
        project: ProjectId,
        name: &str,
        saved: &SavedQuery,
        slot: &Arc<SavedSlot>,
    ) -> Result<(), ApiError> {
        let now = self.clock.now_ms();
        let outcome = self.run_saved(project, saved, now);
        // Deleted or redefined meanwhile: this result belongs to nothing.
        let registered = self
            .saved
            .lock()
            .expect("saved lock")
            .get(&(project, name.to_owned()))
            .is_some_and(|s| Arc::ptr_eq(s, slot));
        if !registered || !self.is_current_saved(project, name, saved) {
            return Ok(());
        }
        let mut entry = slot.entry.lock().expect("saved entry");
        entry.next_run_ms = now + (saved.refresh_rate as i64) * 1000;
        self.count("cached_query", outcome.is_ok());
        match outcome {
            Ok(result) => {
                entry.result = Some(result);
                entry.run.record(now, None);
            }
            Err(e) => {
                tracing::warn!(%project, name, error = %e, "cached query refresh failed; the last result stays");
                entry.run.record(now, Some(&e.message));
            }
        }
        let kept = json!({"result": entry.result, "run": entry.run});
        drop(entry);
        self.files
            .save(&project, ObjectKind::SavedQuery, name, "result", &kept)
            .map_err(ApiError::internal)
    }

    /// A cached query's result and run information (computing it first if it never ran; a
    /// request arriving while that first run is in flight waits for it).
    pub fn cached_result(
        &self,
        project: ProjectId,
        name: &str,
        saved: &SavedQuery,
    ) -> Result<(Value, Value), ApiError> {
        let slot = self.saved_slot(project, name);
        let have = |slot: &SavedSlot| slot.entry.lock().expect("saved entry").result.is_some();
        if !have(&slot) {
            let _one_at_a_time = slot.refreshing.lock().expect("refresh lock");
            if !have(&slot) {
                self.refresh_saved_locked(project, name, saved, &slot)?;
            }
        }
        let entry = slot.entry.lock().expect("saved entry").clone();
        let Some(result) = entry.result else {
            let message = entry.run.last_error.unwrap_or_else(|| "no result yet".into());
            return Err(ApiError::new(
                tally_core::error::ErrorCode::InvalidParameter,
                format!("The cached query could not be computed: {message}"),
            ));
        };
        Ok((
            result,
            entry.run.to_json(self.clock.now_ms(), Some(entry.next_run_ms)),
        ))
    }

    /// The `run_information` of a cached query (null when it is not cached).
    pub fn run_information(&self, project: ProjectId, name: &str, saved: &SavedQuery) -> Value {
        if saved.refresh_rate == 0 {
            return Value::Null;
        }
        let slot = self
            .saved
            .lock()
            .expect("saved lock")
            .get(&(project, name.to_owned()))
            .cloned();
        let entry = slot
            .map(|s| s.entry.lock().expect("saved entry").clone())
            .unwrap_or_default();
        entry.run.to_json(
            self.clock.now_ms(),
            entry.result.is_some().then_some(entry.next_run_ms),
        )
    }

    /// Forgets a saved query's cached result (deleted or redefined), after any refresh in flight.
    pub fn forget_saved(&self, project: ProjectId, name: &str) {
        let slot = self
            .saved
            .lock()
            .expect("saved lock")
            .remove(&(project, name.to_owned()));
        let _in_flight_done = slot.as_ref().map(|s| s.refreshing.lock().expect("refresh lock"));
        if let Err(e) = self.files.remove_all(&project, ObjectKind::SavedQuery, name) {
            tracing::warn!(error = %e, "could not remove a cached query's files");
        }
    }

    // -----------------------------------------------------------------------------------------
    // Datasets

    fn dataset_entry(&self, project: ProjectId, name: &str) -> Arc<DatasetEntry> {
        self.datasets
            .lock()
            .expect("datasets lock")
            .entry((project, name.to_owned()))
            .or_default()
            .clone()
    }

    /// Brings a dataset up to date with the store; returns what the refresh recomputed.
    pub fn refresh_dataset(
        &self,
        project: ProjectId,
        name: &str,
        dataset: &Dataset,
    ) -> Result<Update, ApiError> {
        let entry = self.dataset_entry(project, name);
        let _one_at_a_time = entry.refreshing.lock().expect("refresh lock");
        // Deleted or redefined while this waited: nothing to do.
        let registered = self
            .datasets
            .lock()
            .expect("datasets lock")
            .get(&(project, name.to_owned()))
            .is_some_and(|e| Arc::ptr_eq(e, &entry));
        let current = self
            .catalog
            .object(&project, ObjectKind::Dataset, name)
            .and_then(|stored| Dataset::from_stored(&stored))
            .is_some_and(|d| d == *dataset);
        if !registered || !current {
            return Err(ApiError::not_found());
        }
        let now = self.clock.now_ms();
        let started = Instant::now();
        let planned = {
            let state = entry.state.read().expect("dataset state");
            state.plan_refresh(dataset, &self.store, project, now, &self.limits())
        };
        self.dataset_refresh_seconds
            .inc_by(started.elapsed().as_secs_f64());
        if let Ok(update) = &planned {
            self.dataset_events_scanned.inc_by(update.events_scanned);
        }
        let mut run = entry.run.lock().expect("run lock");
        self.count("dataset", planned.is_ok());
        let update = match planned {
            Ok(update) => update,
            Err(e) => {
                let e = ApiError::from(e);
                tracing::warn!(%project, name, error = %e, "dataset refresh failed; the last buckets stay");
                run.record(now, Some(&e.message));
                return Err(e);
            }
        };
        run.record(now, None);
        let run_json = serde_json::to_value(&*run).expect("run info serialises");
        drop(run);
        let changed = !update.set.is_empty() || !update.removed.is_empty();
        let persisted = if changed {
            self.persist_dataset(project, name, &entry, &update, run_json)
        } else {
            Ok(())
        };
        entry.state.write().expect("dataset state").apply(update.clone());
        persisted.map_err(ApiError::internal)?;
        Ok(update)
    }

    fn persist_dataset(
        &self,
        project: ProjectId,
        name: &str,
        entry: &DatasetEntry,
        update: &Update,
        run: Value,
    ) -> std::io::Result<()> {
        for (key, bucket) in &update.set {
            let values: serde_json::Map<String, Value> =
                bucket.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            self.files.save(
                &project,
                ObjectKind::Dataset,
                name,
                &bucket_part(*key),
                &Value::Object(values),
            )?;
        }
        let mut keys: Vec<(i64, i64)> = entry
            .state
            .read()
            .expect("dataset state")
            .buckets
            .keys()
            .copied()
            .collect();
        keys.retain(|k| !update.removed.contains(k));
        keys.extend(update.set.iter().map(|(k, _)| *k));
        keys.sort_unstable();
        keys.dedup();
        self.files.save(
            &project,
            ObjectKind::Dataset,
            name,
            "state",
            &json!({"buckets": keys, "run": run}),
        )?;
        for key in &update.removed {
            self.files
                .remove(&project, ObjectKind::Dataset, name, &bucket_part(*key))?;
        }
        Ok(())
    }

    /// A dataset's results for one index value (as `Dataset::index_candidates`) and timeframe, refreshing first if a bucket the
    /// timeframe needs was never computed.
    pub fn dataset_results(
        &self,
        project: ProjectId,
        name: &str,
        dataset: &Dataset,
        candidates: &[Vec<Value>],
        timeframe: Option<&Value>,
    ) -> Result<Value, ApiError> {
        let entry = self.dataset_entry(project, name);
        let now = self.clock.now_ms();
        if let Some(result) = entry
            .state
            .read()
            .expect("dataset state")
            .results(dataset, candidates, timeframe, now)?
        {
            return Ok(result);
        }
        self.refresh_dataset(project, name, dataset)?;
        let now = self.clock.now_ms();
        entry
            .state
            .read()
            .expect("dataset state")
            .results(dataset, candidates, timeframe, now)?
            .ok_or_else(|| ApiError::internal("dataset buckets missing right after a refresh"))
    }

    /// The dataset's refresh status for its definition echo: how its refreshes went, and the
    /// end of the newest computed bucket.
    pub fn dataset_status(&self, project: ProjectId, name: &str) -> (RunInfo, Option<i64>) {
        let Some(entry) = self
            .datasets
            .lock()
            .expect("datasets lock")
            .get(&(project, name.to_owned()))
            .cloned()
        else {
            return (RunInfo::default(), None);
        };
        let run = entry.run.lock().expect("run lock").clone();
        let newest = entry
            .state
            .read()
            .expect("dataset state")
            .buckets
            .keys()
            .next_back()
            .map(|k| k.1);
        (run, newest)
    }

    /// Forgets a dataset's buckets (deleted or redefined).
    pub fn forget_dataset(&self, project: ProjectId, name: &str) {
        self.datasets
            .lock()
            .expect("datasets lock")
            .remove(&(project, name.to_owned()));
        if let Err(e) = self.files.remove_all(&project, ObjectKind::Dataset, name) {
            tracing::warn!(error = %e, "could not remove a dataset's files");
        }
    }

    /// Forgets the cached answers of a deleted or redefined definition of `kind`.
    pub fn forget(&self, project: ProjectId, kind: ObjectKind, name: &str) {
        match kind {
            ObjectKind::SavedQuery => self.forget_saved(project, name),
            ObjectKind::Dataset => self.forget_dataset(project, name),
            ObjectKind::Dashboard => {}
        }
    }

    // -----------------------------------------------------------------------------------------
    // The refresher

    /// One refresher tick: refreshes every cached query that is due and brings every dataset
    /// up to date with its events. Failures are recorded on the object and counted.
    pub fn run_due(&self) -> TickReport {
        let mut report = TickReport::default();
        for project in self.catalog.projects() {
            let p = project.id;
            for (name, stored) in self.catalog.objects(&p, ObjectKind::SavedQuery) {
                let Some(saved) = SavedQuery::from_stored(&stored).filter(|s| s.refresh_rate > 0) else {
                    continue;
                };
                let slot = self
                    .saved
                    .lock()
                    .expect("saved lock")
                    .get(&(p, name.clone()))
                    .cloned();
                let due = slot
                    .is_none_or(|s| s.entry.lock().expect("saved entry").next_run_ms <= self.clock.now_ms());
                if due {
                    let _ = self.refresh_saved(p, &name, &saved);
                    report.saved += 1;
                }
            }
            for (name, stored) in self.catalog.objects(&p, ObjectKind::Dataset) {
                let Some(dataset) = Dataset::from_stored(&stored) else {
                    continue;
                };
                if let Ok(update) = self.refresh_dataset(p, &name, &dataset)
                    && (!update.set.is_empty() || !update.removed.is_empty())
                {
                    report.datasets += 1;
                }
            }
        }
        report
    }
}

/// A saved query's `result` value from its query's answer: a funnel's whole answer (its
/// `result` and `steps`), any other analysis' `result`.
pub fn saved_result(saved: &SavedQuery, body: Value) -> Value {
    if saved.analysis() == "funnel" {
        body
    } else {
        body.get("result").cloned().unwrap_or(Value::Null)
    }
}
