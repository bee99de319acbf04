//! Tally's ingest path: from request bytes to durable, acknowledged events.
//!
//! * [`decode`]: content types, the batch envelope and the image beacon's base64 `data`;
//! * [`validate`]: Keen's event rules, checked in one streaming pass;
//! * [`dedupe`]: `keen.uniqueness_token` de-duplication, rebuilt from the log after a restart;
//! * [`log`]: the embedded event log (segment files, group commit, recovery);
//! * [`ingestor`]: the pipeline that ties them together for the HTTP (and later Kafka) front
//!   doors: validate, stamp, de-duplicate, append, answer.

pub mod decode;
pub mod dedupe;
pub mod ingestor;
pub mod log;
pub mod validate;

pub use ingestor::{EventOutcome, IngestError, Ingestor, RequestMeta};
pub use log::EmbeddedEventLog;
