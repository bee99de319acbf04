use std::sync::Arc;

use prometheus_client::registry::Registry;
use tally_core::ProjectId;
use tally_core::config::LogConfig;
use tally_core::event::{AcceptedEvent, LoggedEvent};
use tally_core::log::{EventLog, LogError};

use std::os::unix::fs::FileExt;

use super::*;

fn event(n: usize) -> AcceptedEvent {
    AcceptedEvent {
        project: ProjectId::from_bytes([7; 12]),
        collection: "c".into(),
        uniqueness_token: None,
        created_at_ms: n as i64,
        keen_json: format!("{{\"id\":\"{n}\"}}"),
        body_json: format!("{{\"n\":{n}}}").into_bytes().into(),
    }
}

/// The default settings, writing segments with `O_DIRECT` or through the page cache.
fn log_config(direct: bool) -> LogConfig {
    LogConfig {
        direct_io: direct,
        ..LogConfig::default()
    }
}

/// Runs each test twice: segments written and read with `O_DIRECT`, and through the page cache.
macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        mod direct_io {
            $(#[tokio::test]
            async fn $name() {
                super::$name(true).await
            })*
        }
        mod page_cache {
            $(#[tokio::test]
            async fn $name() {
                super::$name(false).await
            })*
        }
    };
}

in_both_modes!(
    concurrent_appends_share_fsyncs_and_all_survive_reopening,
    appends_gathered_while_the_writer_lingers_all_survive,
    a_torn_tail_is_cut_and_appends_continue_after_it,
    a_stale_frame_behind_a_torn_one_is_never_resurrected,
    readers_see_only_durable_records_and_resume_from_a_position,
    retention_and_the_unconsumed_bound,
    page_padding_never_leaves_gaps_or_garbage,
);

/// Opens the log, checking it writes the way `config` asks: with `O_DIRECT` wherever the
/// file system allows it (every file system here but tmpfs), so the tests run `in_both_modes!`
/// really cover both.
fn open(dir: &Path, config: LogConfig) -> EmbeddedEventLog {
    let direct_io = config.direct_io;
    let log = EmbeddedEventLog::open(dir, config, &mut Registry::default()).unwrap();
    if direct_io {
        assert!(
            log.writes_directly() || tally_core::fsutil::is_tmpfs(dir),
            "O_DIRECT refused outside tmpfs"
        );
    } else {
        assert!(!log.writes_directly(), "O_DIRECT used though not asked for");
    }
    log
}

fn read_all(dir: &Path) -> Vec<i64> {
    let mut reader = LogReader::offline(dir, 0);
    let mut out = Vec::new();
    loop {
        let batch = reader.read_batch(1 << 20).unwrap();
        if batch.is_empty() {
            return out;
        }
        for entry in batch {
            out.push(LoggedEvent::decode(&entry.payload).unwrap().created_at_ms);
        }
    }
}

async fn concurrent_appends_share_fsyncs_and_all_survive_reopening(direct: bool) {
    concurrent_appends_all_survive(direct, 0).await;
}

/// The same with a writer that lingers 5 ms after busy groups (the first slice of its lingering
/// trial lingers): 200 appends at once make some groups of six or more (how many depends on
/// scheduling, and the test does not), and nothing is lost, duplicated or answered early.
async fn appends_gathered_while_the_writer_lingers_all_survive(direct: bool) {
    concurrent_appends_all_survive(direct, 5_000).await;
}

async fn concurrent_appends_all_survive(direct: bool, group_commit_linger_us: u64) {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(open(
        dir.path(),
        LogConfig {
            segment_bytes: 4096,
            group_commit_linger_us,
            ..log_config(direct)
        },
    ));
    let mut tasks = Vec::new();
    for n in 0..200 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let end = log.append(&[event(n)]).await?;
            // Answered only once everything up to its end is durable, earlier groups included.
            assert!(log.status().durable_end >= end, "answered before durable");
            Ok::<u64, LogError>(end)
        }));
    }
    let mut ends = Vec::new();
    for task in tasks {
        ends.push(task.await.unwrap().unwrap());
    }
    for n in 200..210 {
        ends.push(log.append(&[event(n)]).await.unwrap());
    }
    ends.sort_unstable();
    ends.dedup();
    assert_eq!(ends.len(), 210, "every append gets its own end position");
    log.close();
    assert!(list_segments(dir.path()).unwrap().len() > 1, "segments rolled");

    let mut seen = read_all(dir.path());
    seen.sort_unstable();
    assert_eq!(seen, (0..210).collect::<Vec<_>>());
    let reopened = open(dir.path(), log_config(direct));
    assert_eq!(reopened.recovery().cut_bytes, 0);
    assert_eq!(reopened.status().durable_end, *ends.last().unwrap());
}

async fn a_torn_tail_is_cut_and_appends_continue_after_it(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), log_config(direct));
    let end = log.append(&[event(1), event(2)]).await.unwrap();
    log.close();
    drop(log);
    // A crash in the middle of the next group: a frame header promising more than was written.
    let file = OpenOptions::new()
        .write(true)
        .open(segment_path(dir.path(), 0))
        .unwrap();
    file.write_all_at(&[42, 0, 0, 0, 1, 2, 3], end).unwrap();
    drop(file);

    let log = open(dir.path(), log_config(direct));
    assert_eq!(
        log.recovery(),
        RecoveryReport {
            durable_end: end,
            cut_bytes: 7
        }
    );
    log.append(&[event(3)]).await.unwrap();
    log.close();
    assert_eq!(read_all(dir.path()), vec![1, 2, 3]);
}

async fn a_stale_frame_behind_a_torn_one_is_never_resurrected(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), log_config(direct));
    let end = log.append(&[event(1)]).await.unwrap();
    log.close();
    drop(log);
    // The crashed group: its first frame torn, a later frame fully on disk (pages reach the disk
    // in any order). Recovery must zero the later one, or it could line up behind new records.
    let mut torn = Vec::new();
    frame::write_frame_with(&mut torn, |out| event(100).encode_into(out));
    let torn_len = torn.len() as u64;
    let mut stale = Vec::new();
    frame::write_frame_with(&mut stale, |out| event(666).encode_into(out));
    let file = OpenOptions::new()
        .write(true)
        .open(segment_path(dir.path(), 0))
        .unwrap();
    file.write_all_at(&torn[..torn.len() / 2], end).unwrap();
    file.write_all_at(&stale, end + torn_len).unwrap();
    drop(file);

    let log = open(dir.path(), log_config(direct));
    assert_eq!(log.recovery().durable_end, end);
    // event(101) has the same size as event(100), so without the zeroing the stale frame would
    // start exactly where the new record ends.
    log.append(&[event(101)]).await.unwrap();
    assert_eq!(log.status().durable_end, end + torn_len);
    log.close();
    assert_eq!(read_all(dir.path()), vec![1, 101]);
}

async fn readers_see_only_durable_records_and_resume_from_a_position(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let log = open(
        dir.path(),
        LogConfig {
            segment_bytes: 200,
            ..log_config(direct)
        },
    );
    for n in 0..20 {
        log.append(&[event(n)]).await.unwrap();
    }
    let mut reader = log.reader(0);
    let first = reader.read_batch(100).unwrap();
    assert!(!first.is_empty() && first.len() < 20);
    let resume_at = first.last().unwrap().next;
    let mut rest = log.reader(resume_at);
    let mut ns: Vec<i64> = first
        .iter()
        .map(|e| LoggedEvent::decode(&e.payload).unwrap().created_at_ms)
        .collect();
    loop {
        let batch = rest.read_batch(1000).unwrap();
        if batch.is_empty() {
            break;
        }
        ns.extend(
            batch
                .iter()
                .map(|e| LoggedEvent::decode(&e.payload).unwrap().created_at_ms),
        );
    }
    assert_eq!(ns, (0..20).collect::<Vec<_>>());
    assert_eq!(rest.position(), log.status().durable_end);
}

async fn retention_and_the_unconsumed_bound(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: 100,
        max_unconsumed_bytes: 300,
        ..log_config(direct)
    };
    let log = open(dir.path(), config.clone());
    let mut end = 0;
    let mut refused = None;
    for n in 0..50 {
        match log.append(&[event(n)]).await {
            Ok(e) => end = e,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    assert!(
        matches!(refused, Some(LogError::Overloaded { .. })),
        "{refused:?}"
    );
    log.commit_consumed(end).unwrap();
    log.append(&[event(99)])
        .await
        .expect("accepted again once consumed");
    let files_before = segment_files(dir.path());
    let removed = log.retain_from(end).unwrap();
    assert!(removed > 0);
    assert_eq!(log.status().consumed, end);
    let files_after = segment_files(dir.path());
    assert!(
        files_after.len() < files_before.len(),
        "{files_before:?} -> {files_after:?}"
    );
    assert!(
        !files_after.iter().any(|f| f.ends_with(".retired")),
        "nothing retired is left: {files_after:?}"
    );
    log.close();
    drop(log);
    // A retired segment a crash left behind is deleted at the next open.
    let leftover = dir
        .path()
        .join("segments")
        .join("00000000000000000000.log.retired");
    std::fs::write(&leftover, [1u8; 10_000]).unwrap();
    let reopened = open(dir.path(), config);
    assert!(!leftover.exists());
    assert_eq!(reopened.status().consumed, end);
    let mut reader = reopened.reader(end);
    let rest = reader.read_batch(1 << 20).unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(LoggedEvent::decode(&rest[0].payload).unwrap().created_at_ms, 99);
}

/// Groups are padded with zeros to a page boundary, and the next group starts where the data
/// ends, not after the padding: appends of sizes that are not page multiples, one after another,
/// read back contiguously, leave only zeros after the data, and reopen with nothing cut.
async fn page_padding_never_leaves_gaps_or_garbage(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: 64 * 1024,
        ..log_config(direct)
    };
    let log = open(dir.path(), config.clone());
    let mut end = 0;
    for n in 0..300 {
        // 1 to 5 records per append: group sizes of every remainder modulo the page size.
        let events: Vec<_> = (0..1 + n % 5).map(|k| event(n * 10 + k)).collect();
        let next = log.append(&events).await.unwrap();
        assert!(next > end);
        end = next;
    }
    drop(log);
    let expected: Vec<i64> = (0..300)
        .flat_map(|n| (0..1 + n % 5).map(move |k| (n * 10 + k) as i64))
        .collect();
    assert_eq!(read_all(dir.path()), expected);
    let last = list_segments(dir.path()).unwrap().into_iter().last().unwrap();
    let file = File::open(segment_path(dir.path(), last)).unwrap();
    let valid = frame::scan_valid_len(&file).unwrap();
    let mut tail = vec![0u8; (file.metadata().unwrap().len() - valid) as usize];
    file.read_exact_at(&mut tail, valid).unwrap();
    assert!(tail.iter().all(|b| *b == 0), "non-zero bytes after the data");
    let reopened = open(dir.path(), config);
    assert_eq!(reopened.recovery().cut_bytes, 0);
    assert_eq!(reopened.recovery().durable_end, end);
}

/// The names of the files in the log's segment folder, sorted.
fn segment_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
