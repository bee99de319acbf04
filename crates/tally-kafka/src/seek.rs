//! The consumer context both of Tally's consumers use: on every assignment it seeks each
//! partition to the larger of Tally's own recorded position and the group's committed offset,
//! and it counts assignments so a consumer can tell that records it holds may belong to a
//! partition it no longer owns.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tally_core::event::{PartitionPositions, partition_key};

/// Where Tally says each partition goes on; called during a rebalance.
pub(crate) type OwnPositions = Box<dyn Fn() -> PartitionPositions + Send + Sync>;

pub(crate) struct SeekContext {
    own: OwnPositions,
    /// Inbound only: Tally's own record is durable, so on a revocation it is committed to the
    /// group at once (synchronously), before the partitions' next owner reads the group's offset.
    commit_on_revoke: bool,
    /// The offset each assigned partition was sought to: a floor for what is committed back, so
    /// a stale own record never moves the group's offset backwards.
    sought: Mutex<PartitionPositions>,
    /// Bumped by every assignment and revocation.
    generation: AtomicU64,
    /// The partitions assigned now.
    assigned: Mutex<Vec<(String, i32)>>,
    /// For logs.
    what: &'static str,
}

impl SeekContext {
    pub(crate) fn new(what: &'static str, own: OwnPositions, commit_on_revoke: bool) -> Self {
        Self {
            own,
            commit_on_revoke,
            sought: Mutex::new(PartitionPositions::new()),
            generation: AtomicU64::new(0),
            assigned: Mutex::new(Vec::new()),
            what,
        }
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn assigned(&self) -> Vec<(String, i32)> {
        self.assigned.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn assign(&self, consumer: &BaseConsumer<Self>, offered: &TopicPartitionList) {
        let own = (self.own)();
        let committed = consumer
            .committed_offsets(offered.clone(), Duration::from_secs(10))
            .map_err(|e| tracing::warn!(consumer = self.what, error = %e, "cannot read the group's committed offsets; using Tally's own"))
            .ok();
        let mut seeks = TopicPartitionList::new();
        let mut assigned = Vec::new();
        let mut sought = PartitionPositions::new();
        for elem in offered.elements() {
            let (topic, partition) = (elem.topic(), elem.partition());
            let mine = own.get(&partition_key(topic, partition)).map(|&o| o as i64);
            let group = committed
                .as_ref()
                .and_then(|c| c.find_partition(topic, partition))
                .and_then(|e| e.offset().to_raw())
                .filter(|&o| o >= 0);
            let offset = match mine.max(group) {
                Some(o) => {
                    sought.insert(partition_key(topic, partition), o as u64);
                    Offset::Offset(o)
                }
                None => Offset::Invalid,
            };
            tracing::info!(consumer = self.what, topic, partition, own = ?mine, group = ?group, "partition assigned");
            if let Err(e) = seeks.add_partition_offset(topic, partition, offset) {
                tracing::error!(consumer = self.what, error = %e, "cannot set a start offset");
            }
            assigned.push((topic.to_owned(), partition));
        }
        if let Err(e) = consumer.assign(&seeks) {
            tracing::error!(consumer = self.what, error = %e, "assigning partitions failed");
        }
        *self.assigned.lock().unwrap_or_else(|p| p.into_inner()) = assigned;
        *self.sought.lock().unwrap_or_else(|p| p.into_inner()) = sought;
    }

    /// What to commit to the group for the partitions assigned now: `positions`, never below
    /// where a partition was sought to.
    pub(crate) fn commit_list(&self, positions: &PartitionPositions) -> TopicPartitionList {
        let sought = self.sought.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut merged = positions.clone();
        for (key, offset) in sought {
            let at = merged.entry(key).or_insert(offset);
            *at = (*at).max(offset);
        }
        commit_list(&merged, &self.assigned())
    }
}

impl ClientContext for SeekContext {}

impl ConsumerContext for SeekContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.assign(consumer, tpl),
            other => {
                if other != RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS {
                    tracing::error!(consumer = self.what, error = ?other, "rebalance error; giving up the partitions");
                } else {
                    tracing::info!(
                        consumer = self.what,
                        partitions = tpl.count(),
                        "partitions revoked"
                    );
                    if self.commit_on_revoke {
                        let list = self.commit_list(&(self.own)());
                        if list.count() > 0
                            && let Err(e) = consumer.commit(&list, rdkafka::consumer::CommitMode::Sync)
                        {
                            tracing::warn!(consumer = self.what, error = %e, "committing offsets at revocation failed");
                        }
                    }
                }
                if let Err(e) = consumer.unassign() {
                    tracing::error!(consumer = self.what, error = %e, "unassigning partitions failed");
                }
                self.assigned.lock().unwrap_or_else(|p| p.into_inner()).clear();
            }
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// The offsets to commit to the group: `positions` of the `assigned` partitions.
fn commit_list(positions: &PartitionPositions, assigned: &[(String, i32)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (topic, partition) in assigned {
        if let Some(&offset) = positions.get(&partition_key(topic, *partition)) {
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(offset as i64));
        }
    }
    tpl
}
