//! The store conformance suite: what every backend behind `sluice::store::Store` must do, run
//! against each one through the same public interface (SPEC §1–2).
//!
//! A backend plugs in by implementing [`Backend`] and adding one line to the `suite!` list at
//! the bottom. `settle` must leave the store in its "fully organised" state (for SQLite: every
//! journal generation compacted into chunks), so each property is checked on both sides of it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::config::StorageSettings;
use sluice::reading::{DeviceId, MetricValue, Reading};
use sluice::store::rollup::{
    AggAnswer, AggFn, AggQuery, AggSeries, AggSource, AggValue, SeriesBuilder,
};
use sluice::store::{self, Opened, Order, ReadingsQuery, Store, StoredRow};
use sluice::telemetry::metrics::Metrics;

#[path = "common/pg.rs"]
mod pg;

/// One backend under test, with a private place to keep its data.
trait Backend {
    /// Opens the store (again, after a restart: the same data).
    fn open(&self) -> Opened;
    /// Waits until the store has organised everything it holds.
    fn settle(&self, store: &mut dyn Store);
}

/// The embedded store in a temp dir; every commit's generation is sealed at the next
/// `maintain`.
struct Sqlite {
    dir: tempfile::TempDir,
    metrics: Arc<Metrics>,
    tweak: fn(&mut StorageSettings),
}

impl Sqlite {
    fn new() -> Self {
        Self::with(|_| {})
    }
    fn with(tweak: fn(&mut StorageSettings)) -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            metrics: Arc::new(Metrics::new()),
            tweak,
        }
    }
    fn settings(&self) -> StorageSettings {
        let mut s = StorageSettings {
            data_dir: self.dir.path().to_path_buf(),
            compaction_interval: Duration::from_millis(1),
            retention: Duration::from_secs(100 * 365 * 86400),
            ..StorageSettings::default()
        };
        (self.tweak)(&mut s);
        s
    }
}

impl Backend for Sqlite {
    fn open(&self) -> Opened {
        store::open(&self.settings(), &self.metrics).expect("store opens")
    }
    fn settle(&self, store: &mut dyn Store) {
        std::thread::sleep(Duration::from_millis(2)); // past compaction_interval (1 ms)
        store.maintain().expect("maintain");
        wait_until(|| self.metrics.store_journal_readings.get() == 0);
    }
}

/// The PostgreSQL backend on a fresh database of the machine's server. Nothing to settle: a
/// commit is organised when it returns.
struct Postgres {
    db: pg::TestDb,
    metrics: Arc<Metrics>,
}

impl Postgres {
    fn new() -> Self {
        Self {
            db: pg::TestDb::new(),
            metrics: Arc::new(Metrics::new()),
        }
    }
    fn settings(&self) -> StorageSettings {
        let mut s = StorageSettings {
            backend: sluice::config::Backend::Postgres,
            retention: Duration::from_secs(100 * 365 * 86400),
            ..StorageSettings::default()
        };
        s.postgres.url = sluice::config::DbUrl::new(self.db.url());
        s
    }
}

impl Backend for Postgres {
    fn open(&self) -> Opened {
        store::open(&self.settings(), &self.metrics).expect("store opens")
    }
    fn settle(&self, _store: &mut dyn Store) {}
}

fn wait_until(mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "condition not met within 20 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

const T0: i64 = 1_790_000_000_000;

fn reading(
    device: &str,
    seq: Option<u64>,
    ts_ms: i64,
    metrics: Vec<(&str, MetricValue)>,
) -> Reading {
    Reading {
        device_id: DeviceId::parse(device).expect("device id"),
        ts_ms,
        seq,
        metrics: metrics
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        tags: Vec::new(),
    }
}

fn simple(device: &str, seq: u64) -> Reading {
    reading(
        device,
        Some(seq),
        T0 + seq as i64 * 1000,
        vec![("v", MetricValue::Int(seq as i64))],
    )
}

fn commit(store: &mut dyn Store, readings: &[Reading]) -> Vec<bool> {
    let refs: Vec<&Reading> = readings.iter().collect();
    store
        .commit(&refs, sluice::reading::now_ms())
        .expect("commit")
}

fn query(store: &dyn Store, device: &str, order: Order, limit: usize) -> Option<Vec<StoredRow>> {
    store
        .reader()
        .readings(&ReadingsQuery {
            device_id: device.into(),
            from_ms: i64::MIN,
            to_ms: i64::MAX,
            metric: None,
            limit,
            order,
            after: None,
        })
        .expect("query")
}

fn seqs(rows: &[StoredRow]) -> Vec<u64> {
    rows.iter().map(|r| r.seq.expect("seq")).collect()
}

/// One answer per reading, in order; a duplicate inside one batch is stored once.
fn answers_in_order_and_dedupes_within_a_batch(b: &dyn Backend) {
    let mut s = b.open().store;
    let batch = [
        simple("a", 1),
        simple("b", 1),
        simple("a", 1),
        simple("a", 2),
        simple("a", 1),
    ];
    assert_eq!(commit(&mut *s, &batch), [true, true, false, true, false]);
    assert_eq!(
        seqs(&query(&*s, "a", Order::Asc, 100).expect("known")),
        [1, 2]
    );
    // Readings without seq are never duplicates.
    let noseq = reading("c", None, T0, vec![("v", MetricValue::Bool(true))]);
    assert_eq!(commit(&mut *s, &[noseq.clone(), noseq]), [true, true]);
    assert_eq!(query(&*s, "c", Order::Asc, 100).expect("known").len(), 2);
    assert!(query(&*s, "nobody", Order::Asc, 100).is_none());
}

/// Duplicates are found in the journal, after compaction, across a restart, out of order.
fn dedupes_everywhere(b: &dyn Backend) {
    let mut s = b.open().store;
    assert_eq!(
        commit(&mut *s, &[simple("d", 5), simple("d", 7)]),
        [true, true]
    );
    // Still in the journal (or its equivalent): a resend and an out-of-order new seq.
    assert_eq!(
        commit(&mut *s, &[simple("d", 5), simple("d", 6)]),
        [false, true]
    );
    b.settle(&mut *s);
    // Compacted: the same again, plus one more gap filled.
    assert_eq!(
        commit(&mut *s, &[simple("d", 7), simple("d", 6), simple("d", 3)]),
        [false, false, true]
    );
    drop(s);
    let mut s = b.open().store;
    // Across a restart, with part compacted (3 is not yet settled).
    assert_eq!(
        commit(
            &mut *s,
            &[
                simple("d", 3),
                simple("d", 5),
                simple("d", 8),
                simple("d", 8)
            ]
        ),
        [false, false, true, false]
    );
    b.settle(&mut *s);
    drop(s);
    let mut s = b.open().store;
    assert_eq!(
        commit(&mut *s, &[simple("d", 8), simple("d", 4)]),
        [false, true]
    );
    assert_eq!(
        seqs(&query(&*s, "d", Order::Asc, 100).expect("known")),
        [3, 4, 5, 6, 7, 8]
    );
}

/// Queries answer the same before and after compaction, with data split across both.
fn queries_agree_across_compaction(b: &dyn Backend) {
    let mut s = b.open().store;
    let mk = |seq: u64| {
        // Two readings share each timestamp; every third carries a second metric.
        let mut m = vec![("temp", MetricValue::Float(seq as f64 / 10.0))];
        if seq % 3 == 0 {
            m.push(("door", MetricValue::Bool(seq % 2 == 0)));
        }
        reading("q", Some(seq), T0 + (seq as i64 / 2) * 1000, m)
    };
    let first: Vec<Reading> = (1..=40).map(mk).collect();
    commit(&mut *s, &first);
    b.settle(&mut *s);
    let second: Vec<Reading> = (41..=60).map(mk).collect();
    commit(&mut *s, &second);
    let queries = |s: &dyn Store| {
        let mut out = Vec::new();
        for order in [Order::Asc, Order::Desc] {
            for (from, to) in [(i64::MIN, i64::MAX), (T0 + 10_000, T0 + 25_000)] {
                for metric in [None, Some("door".to_owned())] {
                    for limit in [1, 7, 1000] {
                        let q = ReadingsQuery {
                            device_id: "q".into(),
                            from_ms: from,
                            to_ms: to,
                            metric: metric.clone(),
                            limit,
                            order,
                            after: None,
                        };
                        out.push(s.reader().readings(&q).expect("query").expect("known"));
                    }
                }
            }
        }
        out
    };
    let before = queries(&*s);
    b.settle(&mut *s);
    let after = queries(&*s);
    assert_eq!(before, after);
    // Spot checks of the semantics themselves.
    let all = query(&*s, "q", Order::Asc, 1000).expect("known");
    assert_eq!(seqs(&all), (1..=60).collect::<Vec<_>>());
    let last = query(&*s, "q", Order::Desc, 7).expect("known");
    assert_eq!(seqs(&last), (54..=60).rev().collect::<Vec<_>>());
    let doors = &before[5]; // asc, whole range, metric=door, limit 1000
    assert!(doors
        .iter()
        .all(|r| r.metrics.len() == 1 && r.metrics[0].0 == "door"));
}

/// Paging by cursor (`after`) sees every reading once, in order, in both directions, with
/// readings sharing a timestamp, and while the store organises itself between two pages.
fn pages_see_every_reading_once(b: &dyn Backend) {
    let mut s = b.open().store;
    let mk = |seq: u64| {
        let mut m = vec![("temp", MetricValue::Float(seq as f64))];
        if seq % 4 == 0 {
            m.push(("door", MetricValue::Bool(true)));
        }
        // Three readings share each timestamp, so pages end inside a run of equal ts.
        reading("p", Some(seq), T0 + (seq as i64 / 3) * 1000, m)
    };
    commit(&mut *s, &(1..=50).map(mk).collect::<Vec<_>>());
    b.settle(&mut *s);
    commit(&mut *s, &(51..=80).map(mk).collect::<Vec<_>>());
    for order in [Order::Asc, Order::Desc] {
        for metric in [None, Some("door".to_owned())] {
            let q = |after: Option<(i64, u64)>, limit: usize| ReadingsQuery {
                device_id: "p".into(),
                from_ms: T0 + 2000,
                to_ms: T0 + 25_000,
                metric: metric.clone(),
                limit,
                order,
                after,
            };
            let whole = s
                .reader()
                .readings(&q(None, 1000))
                .expect("query")
                .expect("known");
            let mut paged: Vec<StoredRow> = Vec::new();
            let mut pages = 0;
            loop {
                let after = paged.last().map(|r| (r.ts_ms, r.rid));
                let page = s
                    .reader()
                    .readings(&q(after, 4))
                    .expect("query")
                    .expect("known");
                if page.is_empty() {
                    break;
                }
                pages += 1;
                assert!(pages < 100, "{order:?} {metric:?}: paging does not end");
                paged.extend(page);
                if pages == 3 {
                    // Organise the store between two pages: the cursor must still hold.
                    commit(&mut *s, &[mk(200)]);
                    b.settle(&mut *s);
                }
            }
            assert_eq!(paged, whole, "{order:?} {metric:?}");
            assert!(pages >= 3, "{order:?} {metric:?}: only {pages} pages");
            // Every reading in range is there (seqs 6..=74 have ts in [T0+2s, T0+25s)).
            let want: Vec<u64> = (6..=74)
                .filter(|n| metric.is_none() || n % 4 == 0)
                .collect();
            let mut got = seqs(&paged);
            got.sort_unstable();
            assert_eq!(got, want, "{order:?} {metric:?}");
        }
    }
}

/// Values read back exactly: integer extremes, awkward floats, booleans, long multibyte tags.
fn values_read_back_exactly(b: &dyn Backend) {
    let mut s = b.open().store;
    let tag_value: String = "ü€𝄞".repeat(43).chars().take(128).collect();
    let mut r = reading(
        "v",
        Some(u64::MAX),
        -1,
        vec![
            ("imin", MetricValue::Int(i64::MIN)),
            ("imax", MetricValue::Int(i64::MAX)),
            ("umax", MetricValue::UInt(u64::MAX)),
            ("tenth", MetricValue::Float(0.1)),
            ("negzero", MetricValue::Float(-0.0)),
            ("tiny", MetricValue::Float(f64::MIN_POSITIVE / 3.0)),
            ("big", MetricValue::Float(f64::MAX)),
            ("yes", MetricValue::Bool(true)),
            ("no", MetricValue::Bool(false)),
        ],
    );
    r.tags = (0..16)
        .map(|i| (format!("tag{i:02}"), tag_value.clone()))
        .collect();
    let r2 = reading("v", Some(0), 0, vec![("tenth", MetricValue::Int(1))]);
    commit(&mut *s, &[r.clone(), r2.clone()]);
    let check = |s: &dyn Store| {
        let rows = query(s, "v", Order::Asc, 10).expect("known");
        assert_eq!(rows.len(), 2);
        let got = &rows[0];
        assert_eq!((got.ts_ms, got.seq), (-1, Some(u64::MAX)));
        assert_eq!(got.tags, r.tags);
        assert_eq!(got.metrics.len(), r.metrics.len());
        for ((n1, v1), (n2, v2)) in got.metrics.iter().zip(&r.metrics) {
            assert_eq!(n1, n2);
            match (v1, v2) {
                (MetricValue::Float(a), MetricValue::Float(b)) => {
                    assert_eq!(a.to_bits(), b.to_bits(), "{n1}")
                }
                _ => assert_eq!(v1, v2, "{n1}"),
            }
        }
        assert_eq!(rows[1].metrics, r2.metrics);
        assert_eq!(rows[1].seq, Some(0));
    };
    check(&*s);
    b.settle(&mut *s);
    check(&*s);
    drop(s);
    let s = b.open().store;
    check(&*s);
}

/// Device state survives a restart exactly: true last_seen, every metric's latest value.
fn device_state_survives_restart(b: &dyn Backend) {
    let mut s = b.open().store;
    commit(
        &mut *s,
        &[
            reading(
                "st",
                Some(1),
                T0,
                vec![("a", MetricValue::Int(1)), ("b", MetricValue::Float(2.5))],
            ),
            reading("st", Some(2), T0 + 1000, vec![("a", MetricValue::Int(3))]),
            // Older ts arriving later does not replace a newer value.
            reading(
                "st",
                Some(3),
                T0 - 1000,
                vec![("a", MetricValue::Int(-1)), ("c", MetricValue::Bool(true))],
            ),
        ],
    );
    let opened = {
        drop(s);
        b.open()
    };
    let dev = opened
        .devices
        .iter()
        .find(|d| d.device_id == "st")
        .expect("restored");
    assert_eq!(dev.last_ts_ms, T0 + 1000);
    assert!(dev.last_seen_ms > T0, "last_seen is the commit time");
    let by_name = |n: &str| dev.metrics.iter().find(|m| m.0 == n).map(|m| (m.1, m.2));
    assert_eq!(by_name("a"), Some((MetricValue::Int(3), T0 + 1000)));
    assert_eq!(by_name("b"), Some((MetricValue::Float(2.5), T0)));
    assert_eq!(by_name("c"), Some((MetricValue::Bool(true), T0 - 1000)));
    let last_seen = dev.last_seen_ms;
    let mut s = opened.store;
    b.settle(&mut *s);
    drop(s);
    let again = b.open();
    let dev2 = again
        .devices
        .iter()
        .find(|d| d.device_id == "st")
        .expect("restored");
    assert_eq!(
        dev2.last_seen_ms, last_seen,
        "last_seen does not move on restart"
    );
    assert_eq!(dev2.metrics.len(), 3);
    // Later commits: a late reading (older than the newest) only fills what is older or
    // missing; a newer one replaces.
    let mut s = again.store;
    commit(
        &mut *s,
        &[reading(
            "st",
            Some(4),
            T0 - 2000,
            vec![("a", MetricValue::Int(-5)), ("d", MetricValue::Int(4))],
        )],
    );
    commit(
        &mut *s,
        &[reading(
            "st",
            Some(5),
            T0 + 2000,
            vec![("b", MetricValue::Float(9.5))],
        )],
    );
    b.settle(&mut *s);
    drop(s);
    let third = b.open();
    let dev3 = third
        .devices
        .iter()
        .find(|d| d.device_id == "st")
        .expect("restored");
    let by_name = |n: &str| dev3.metrics.iter().find(|m| m.0 == n).map(|m| (m.1, m.2));
    assert_eq!(by_name("a"), Some((MetricValue::Int(3), T0 + 1000)));
    assert_eq!(by_name("b"), Some((MetricValue::Float(9.5), T0 + 2000)));
    assert_eq!(by_name("c"), Some((MetricValue::Bool(true), T0 - 1000)));
    assert_eq!(by_name("d"), Some((MetricValue::Int(4), T0 - 2000)));
    assert_eq!(dev3.last_ts_ms, T0 + 2000);
}

/// `agg` of `device` at `step_ms` over `[from, to)`, every function per bucket and metric.
fn aggregate(
    store: &dyn Store,
    device: &str,
    step_ms: i64,
    range: (i64, i64),
    metric: Option<&str>,
) -> Vec<(i64, String, Vec<AggValue>)> {
    aggregate_over(store, device, step_ms, Some(range), metric)
}

/// [`aggregate`] over `range`, or with neither bound (the device's whole extent) for `None`.
fn aggregate_over(
    store: &dyn Store,
    device: &str,
    step_ms: i64,
    range: Option<(i64, i64)>,
    metric: Option<&str>,
) -> Vec<(i64, String, Vec<AggValue>)> {
    let answer = store
        .reader()
        .aggregate(&AggQuery {
            device_id: device.into(),
            from_ms: range.map(|r| r.0),
            to_ms: range.map(|r| r.1),
            metric: metric.map(str::to_owned),
            step_ms,
            max_buckets: 100_000,
        })
        .expect("aggregate")
        .expect("known device");
    let AggAnswer::Series(series) = answer else {
        panic!("too many buckets")
    };
    flatten(series)
}

fn flatten(series: AggSeries) -> Vec<(i64, String, Vec<AggValue>)> {
    let mut out = Vec::new();
    for (start, metrics) in series.buckets {
        for (ix, agg) in metrics {
            let values = AggFn::ALL.iter().map(|f| f.value(&agg)).collect();
            out.push((start, series.names[ix as usize].clone(), values));
        }
    }
    out.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    out
}

/// The same aggregation folded here from the readings query.
fn aggregate_raw(
    store: &dyn Store,
    device: &str,
    step_ms: i64,
    metric: Option<&str>,
) -> Vec<(i64, String, Vec<AggValue>)> {
    let mut series = SeriesBuilder::new(step_ms, metric.map(str::to_owned));
    for r in query(store, device, Order::Asc, 10_000).expect("known") {
        series.add_row(r.ts_ms, r.rid, &r.metrics);
    }
    flatten(series.finish(AggSource::Raw))
}

/// Aggregation queries (SPEC §12) equal the aggregate of the stored readings, before and after
/// the store organises them, at steps a level serves (1 min, 5 min, 1 h) and one none does
/// (7 s): with late readings into earlier buckets, duplicates that must not count, booleans,
/// and a metric filter. Empty buckets are left out.
fn aggregates_equal_raw_readings(b: &dyn Backend) {
    let mut s = b.open().store;
    let t0 = (T0 / 3_600_000) * 3_600_000;
    let at = |seq: u64, ts: i64| {
        reading(
            "agg",
            Some(seq),
            ts,
            vec![
                ("f", MetricValue::Float(seq as f64 * 0.5)),
                ("i", MetricValue::Int(10 - seq as i64)),
                ("b", MetricValue::Bool(seq % 2 == 0)),
            ],
        )
    };
    let first: Vec<Reading> = (1..=40).map(|i| at(i, t0 + i as i64 * 9_000)).collect();
    commit(&mut *s, &first);
    let range = (t0 - 3_600_000, t0 + 7_200_000);
    let check = |s: &dyn Store, when: &str| {
        for step in [60_000, 300_000, 3_600_000, 7_000] {
            assert_eq!(
                aggregate(s, "agg", step, range, None),
                aggregate_raw(s, "agg", step, None),
                "{when}: step {step}"
            );
        }
        assert_eq!(
            aggregate(s, "agg", 60_000, range, Some("b")),
            aggregate_raw(s, "agg", 60_000, Some("b")),
            "{when}: metric filter"
        );
        // No bounds: the device's oldest to newest reading.
        assert_eq!(
            aggregate_over(s, "agg", 7_000, None, None),
            aggregate_raw(s, "agg", 7_000, None),
            "{when}: whole extent"
        );
    };
    check(&*s, "in the journal");
    b.settle(&mut *s);
    check(&*s, "organised");
    // Late readings into organised buckets, a duplicate with another value and time, and a
    // reading far later (the buckets between stay empty).
    let late = [
        at(41, t0 + 1),
        at(3, t0 + 50 * 60_000),
        at(42, t0 + 5_400_000),
    ];
    assert_eq!(commit(&mut *s, &late), [true, false, true]);
    check(&*s, "late, in the journal");
    b.settle(&mut *s);
    check(&*s, "late, organised");
    let minutes = aggregate(&*s, "agg", 60_000, range, Some("i"));
    assert_eq!(
        minutes.len(),
        7 + 1,
        "empty buckets are left out: {minutes:?}"
    );
    let hour = aggregate(&*s, "agg", 3_600_000, range, Some("b"));
    // 41 readings in the first hour, 20 of them true (seq 2, 4, …, 40).
    assert_eq!(hour[0].2[4], AggValue::Count(41));
    assert_eq!(hour[0].2[3], AggValue::Number(20.0));
    drop(s);
    let s = b.open().store;
    check(&*s, "after a restart");
}

/// Large commits of many devices (PostgreSQL splits them into parallel transactions by
/// device) decide exactly like a model: the first of equal `(device, seq)` keys is new unless
/// an earlier commit stored it, out of order and across the u64 range (seqs at and above 2^63
/// order after those below it).
fn large_commits_dedupe_like_a_model(b: &dyn Backend) {
    let mut s = b.open().store;
    let mut model: std::collections::BTreeSet<(String, u64)> = Default::default();
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let high = [
        u64::MAX,
        u64::MAX - 1,
        1 << 63,
        (1 << 63) + 1,
        (1 << 63) - 1,
    ];
    for round in 0..4 {
        let batch: Vec<Reading> = (0..900)
            .map(|_| {
                let n = next() % 120;
                let device = format!("big{n}");
                // Half the devices also send seqs near the top of the range, whose jumps leave
                // the small seqs far below the SQLite store's seq window; the other half stay
                // within it, so the window answers most of their resends and gaps.
                let seq = match next() % 10 {
                    0 if n < 60 => high[(next() % high.len() as u64) as usize],
                    _ => next() % 40,
                };
                let ts = T0 + (next() % 600_000) as i64 - 300_000;
                reading(&device, Some(seq), ts, vec![("v", MetricValue::UInt(seq))])
            })
            .collect();
        let expected: Vec<bool> = batch
            .iter()
            .map(|r| model.insert((r.device_id.to_string(), r.seq.unwrap())))
            .collect();
        assert_eq!(commit(&mut *s, &batch), expected, "round {round}");
        if round == 1 {
            // A restart forgets what the windows knew below each high-water.
            drop(s);
            s = b.open().store;
        } else {
            b.settle(&mut *s);
        }
    }
    let devices: std::collections::BTreeSet<&String> = model.iter().map(|(d, _)| d).collect();
    for device in devices {
        let rows = query(&*s, device, Order::Asc, 10_000).expect("known");
        let mut got = seqs(&rows);
        got.sort_unstable();
        let want: Vec<u64> = model
            .iter()
            .filter(|(d, _)| d == device)
            .map(|(_, q)| *q)
            .collect();
        assert_eq!(got, want, "{device}");
        assert!(rows
            .iter()
            .all(|r| r.metrics == [("v".to_string(), MetricValue::UInt(r.seq.unwrap()))]));
    }
}

macro_rules! suite {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;
            #[test]
            fn answers_in_order_and_dedupes_within_a_batch() {
                super::answers_in_order_and_dedupes_within_a_batch(&$make);
            }
            #[test]
            fn dedupes_everywhere() {
                super::dedupes_everywhere(&$make);
            }
            #[test]
            fn queries_agree_across_compaction() {
                super::queries_agree_across_compaction(&$make);
            }
            #[test]
            fn pages_see_every_reading_once() {
                super::pages_see_every_reading_once(&$make);
            }
            #[test]
            fn values_read_back_exactly() {
                super::values_read_back_exactly(&$make);
            }
            #[test]
            fn device_state_survives_restart() {
                super::device_state_survives_restart(&$make);
            }
            #[test]
            fn aggregates_equal_raw_readings() {
                super::aggregates_equal_raw_readings(&$make);
            }
            #[test]
            fn large_commits_dedupe_like_a_model() {
                super::large_commits_dedupe_like_a_model(&$make);
            }
        }
    };
}

suite!(sqlite, Sqlite::new());
suite!(postgres, Postgres::new());

// ---- SQLite-only behaviour: the journal, retention, upgrade ----

/// A refused commit (journal full) stores nothing, and the store keeps working after.
#[test]
fn sqlite_nothing_committed_on_error() {
    let small = Sqlite::with(|s| {
        s.journal_max_readings = 3;
        s.compaction_interval = Duration::from_secs(3600);
        s.journal_seal_readings = 1000;
    });
    let mut s = small.open().store;
    let batch: Vec<Reading> = (1..=4).map(|i| simple("e", i)).collect();
    let refs: Vec<&Reading> = batch.iter().collect();
    let err = s.commit(&refs, 0).expect_err("over journal_max_readings");
    assert!(err.is_overload(), "{err}");
    assert!(query(&*s, "e", Order::Asc, 10).is_none());
    assert_eq!(commit(&mut *s, &batch[..3]), [true, true, true]);
    drop(s);
    let s = small.open().store;
    assert_eq!(
        seqs(&query(&*s, "e", Order::Asc, 10).expect("known")),
        [1, 2, 3]
    );
}

/// The embedded store with generations of 10 readings that queue up: each compaction takes
/// at least 2 × 150 ms, so generations committed in a few ms wait behind the first.
fn batching_sqlite() -> Sqlite {
    Sqlite::with(|s| {
        s.compaction_pause = Duration::from_millis(150);
        s.journal_seal_readings = 10;
        s.compaction_interval = Duration::from_secs(3600);
    })
}

/// Waits until all `gens` generations of 10 readings are compacted, and asserts that some
/// were compacted together.
fn compacted_in_batches(b: &Sqlite, s: &mut dyn Store, gens: u64) {
    b.settle(s);
    // The journal gauge drops before a compaction's counters are updated: wait for the
    // counter of compacted readings (updated last) to reach every reading.
    wait_until(|| b.metrics.store_compacted_readings.get() == gens * 10);
    let compactions = b.metrics.store_compaction_seconds.get_sample_count();
    assert!(
        compactions < gens,
        "{compactions} compactions for {gens} queued generations: none was batched"
    );
}

/// Generations that queue up behind a slow compaction are compacted together, in one
/// transaction, and the answer is the same as one by one: every reading once, in order,
/// duplicates found in the merged chunks, and device state from every generation.
#[test]
fn sqlite_compacts_queued_generations_together() {
    let b = batching_sqlite();
    let mut s = b.open().store;
    let gens = 6u64;
    // Three devices; each generation holds readings of all three, and device "q2" takes its
    // newest `hum` from the first generation only.
    for g in 0..gens {
        let batch: Vec<Reading> = (0..10u64)
            .map(|i| {
                let seq = g * 10 + i + 1;
                let dev = format!("q{}", seq % 3);
                let mut metrics = vec![("v", MetricValue::Int(seq as i64))];
                if g == 0 && dev == "q2" {
                    metrics.push(("hum", MetricValue::Float(0.5)));
                }
                reading(&dev, Some(seq), T0 + seq as i64 * 1000, metrics)
            })
            .collect();
        assert!(commit(&mut *s, &batch).iter().all(|&new| new));
    }
    compacted_in_batches(&b, &mut *s, gens);
    let expect = |d: u64| -> Vec<u64> { (1..=gens * 10).filter(|q| q % 3 == d).collect() };
    for d in 0..3 {
        let rows = query(&*s, &format!("q{d}"), Order::Asc, 1000).expect("known");
        assert_eq!(seqs(&rows), expect(d), "device q{d}");
        let desc = query(&*s, &format!("q{d}"), Order::Desc, 5).expect("known");
        let mut newest = expect(d);
        newest.reverse();
        newest.truncate(5);
        assert_eq!(seqs(&desc), newest, "device q{d}, newest first");
    }
    // Resends from the first and last generations are duplicates; a gap is new.
    let resend = [simple("q1", 1), simple("q0", 60), simple("q2", 58)];
    assert_eq!(commit(&mut *s, &resend), [false, false, true]);
    drop(s);
    let opened = b.open();
    let q2 = opened
        .devices
        .iter()
        .find(|d| d.device_id == "q2")
        .expect("restored");
    let by_name = |n: &str| q2.metrics.iter().find(|m| m.0 == n).map(|m| m.1);
    assert_eq!(by_name("hum"), Some(MetricValue::Float(0.5)));
    assert_eq!(by_name("v"), Some(MetricValue::Int(59)));
    assert_eq!(q2.last_ts_ms, T0 + 59_000);
}

/// A batch of queued generations whose device sets differ (a device in one generation only,
/// one in the last only, a generation of one device, names that are prefixes of others) is
/// merged device by device: every reading once, in order, under the right device.
#[test]
fn sqlite_batched_compaction_merges_different_device_sets() {
    let b = batching_sqlite();
    let mut s = b.open().store;
    let pattern = |g: u64, i: u64| -> &'static str {
        let pick = |names: &[&'static str]| names[(i as usize) % names.len()];
        match g {
            0 => "ab",
            1 => pick(&["a", "ab"]),
            2 => pick(&["b", "a", "abc"]),
            3 => "z",
            4 => pick(&["abc", "a"]),
            _ => pick(&["ab", "zz", "b", "a", "abc"]),
        }
    };
    let gens = 6u64;
    let mut want: std::collections::BTreeMap<&str, Vec<u64>> = Default::default();
    for g in 0..gens {
        let batch: Vec<Reading> = (0..10u64)
            .map(|i| {
                let dev = pattern(g, i);
                let n = g * 10 + i;
                let seqs = want.entry(dev).or_default();
                let seq = seqs.len() as u64 + 1;
                seqs.push(seq);
                reading(
                    dev,
                    Some(seq),
                    T0 + n as i64 * 1000,
                    vec![("v", MetricValue::UInt(n))],
                )
            })
            .collect();
        assert!(commit(&mut *s, &batch).iter().all(|&new| new));
    }
    compacted_in_batches(&b, &mut *s, gens);
    assert_eq!(want.len(), 6);
    for (dev, seqs_wanted) in &want {
        let rows = query(&*s, dev, Order::Asc, 1000).expect("known");
        assert_eq!(seqs(&rows), *seqs_wanted, "device {dev}");
    }
    // Each device's newest reading is a duplicate, in the merged chunks and after a restart.
    let resend: Vec<Reading> = want
        .iter()
        .map(|(dev, seqs)| simple(dev, *seqs.last().expect("seqs")))
        .collect();
    assert!(commit(&mut *s, &resend).iter().all(|&new| !new));
    drop(s);
    let mut s = b.open().store;
    assert!(commit(&mut *s, &resend).iter().all(|&new| !new));
}

/// Retention drops old chunks and keeps newer ones. A seq below a dropped one that was never
/// stored (a device whose counter restarted) is new, not a duplicate.
#[test]
fn sqlite_retention_drops_old_chunks() {
    let b = Sqlite::with(|s| {
        s.retention = Duration::from_secs(3600);
        s.retention_interval = Duration::from_millis(20);
    });
    let mut s = b.open().store;
    let now = sluice::reading::now_ms();
    let at = |seq: u64, ts: i64| reading("r", Some(seq), ts, vec![("v", MetricValue::Int(1))]);
    let two_hours_ago = now - 2 * 3600 * 1000;
    commit(&mut *s, &[at(1000, two_hours_ago), at(1001, two_hours_ago)]);
    b.settle(&mut *s);
    commit(&mut *s, &[at(1002, now)]);
    b.settle(&mut *s);
    wait_until(|| b.metrics.retention_deleted.get() >= 2);
    assert_eq!(
        seqs(&query(&*s, "r", Order::Asc, 10).expect("known")),
        [1002]
    );
    // Never stored, or no longer: new, although below the high-water (a counter that
    // restarted). 1001 is inside the writer's seq window, which knew it as committed until
    // retention deleted it.
    assert_eq!(
        commit(&mut *s, &[at(1, now + 1), at(1001, now + 2), at(1002, now)]),
        [true, true, false]
    );
    assert_eq!(
        seqs(&query(&*s, "r", Order::Asc, 10).expect("known")),
        [1002, 1, 1001]
    );
    // After a restart the same holds for 1000, and 1001 is stored again.
    drop(s);
    let mut s = b.open().store;
    assert_eq!(
        commit(&mut *s, &[at(1000, now + 3), at(1001, now + 4)]),
        [true, false]
    );
}

/// A database written by the first release (schema version 1: one row per reading) is
/// upgraded in place: readings, seqs and device state carry over.
#[test]
fn sqlite_upgrades_a_version_1_database() {
    let b = Sqlite::new();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v1/sluice.db"),
        b.dir.path().join("sluice.db"),
    )
    .expect("fixture");
    let opened = b.open();
    let names: std::collections::BTreeSet<&str> = opened
        .devices
        .iter()
        .map(|d| d.device_id.as_str())
        .collect();
    assert_eq!(names, ["legacy-1", "legacy-2"].into());
    let mut s = opened.store;
    let l1 = query(&*s, "legacy-1", Order::Asc, 10).expect("known");
    assert_eq!(seqs(&l1), [1, 2]);
    assert_eq!(
        l1[0].metrics[1],
        ("n".to_owned(), MetricValue::Int(i64::MIN))
    );
    assert_eq!(l1[0].metrics[2], ("ok".to_owned(), MetricValue::Bool(true)));
    let tag_keys: Vec<&str> = l1[0].tags.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(tag_keys, ["site", "zeta", "alpha"], "tag order kept");
    let l2 = query(&*s, "legacy-2", Order::Asc, 10).expect("known");
    assert_eq!(l2[1].seq, Some(u64::MAX));
    let MetricValue::Float(z) = l2[0].metrics[0].1 else {
        panic!("float")
    };
    assert_eq!(z.to_bits(), (-0.0f64).to_bits());
    // Dedupe continues across the upgrade; new readings sort after the old ones.
    let later = |seq| {
        reading(
            "legacy-1",
            Some(seq),
            1_795_946_410_000,
            vec![("v", MetricValue::Int(1))],
        )
    };
    assert_eq!(commit(&mut *s, &[later(2), later(3)]), [false, true]);
    let l2b = reading(
        "legacy-2",
        Some(u64::MAX),
        T0,
        vec![("y", MetricValue::Int(1))],
    );
    assert_eq!(commit(&mut *s, &[l2b]), [false]);
    b.settle(&mut *s);
    drop(s);
    let s = b.open().store;
    assert_eq!(
        seqs(&query(&*s, "legacy-1", Order::Asc, 10).expect("known")),
        [1, 2, 3]
    );
}

/// Two stores never share a data directory: the second waits (its open fails, naming the
/// reason) until the first is gone.
#[test]
fn sqlite_one_process_per_data_dir() {
    let b = Sqlite::new();
    let first = b.open();
    let second = store::open(&b.settings(), &b.metrics);
    let err = second
        .err()
        .expect("a second open of the same data dir fails");
    assert!(err.to_string().contains("another Sluice process"), "{err}");
    drop(first);
    let mut s = b.open().store;
    assert_eq!(commit(&mut *s, &[simple("lock", 1)]), [true]);
}

// ---- PostgreSQL-only behaviour: migrations, replicas on one database, lost connections ----

/// A database at schema version 1 (readings, before the device table) is migrated at open:
/// its readings stay queryable and dedupe against, and its devices appear with their latest
/// values. Version 7 moves the rows (one per reading until then) into chunks: seqs at the top
/// of the u64 range and readings without one come back exactly, and new readings get ids
/// above the old ones.
#[test]
fn postgres_upgrades_a_version_1_database() {
    let b = Postgres::new();
    sluice::store::postgres::migrate_to(&b.settings(), 1).expect("migrates to version 1");
    assert_eq!(b.db.sql("SELECT to_regclass('devices') IS NULL"), "t");
    b.db.sql(
        "INSERT INTO readings (device_id, seq, ts, metrics, tags) VALUES
           ('old', 1, to_timestamp(1790000000), '{\"t\": 20.5, \"n\": 1}', NULL),
           ('old', 2, to_timestamp(1790000001), '{\"t\": 21.5}', '{\"site\": \"a\"}'),
           ('top', -1, to_timestamp(1790000000), '{\"u\": 18446744073709551615}', NULL),
           ('top', NULL, to_timestamp(1790000000.5), '{\"u\": 1}', NULL)",
    );
    let opened = b.open();
    let old = opened
        .devices
        .iter()
        .find(|d| d.device_id == "old")
        .expect("device rebuilt from its readings");
    assert_eq!(old.last_ts_ms, 1_790_000_001_000);
    let by_name = |n: &str| old.metrics.iter().find(|m| m.0 == n).map(|m| (m.1, m.2));
    assert_eq!(
        by_name("t"),
        Some((MetricValue::Float(21.5), 1_790_000_001_000))
    );
    assert_eq!(by_name("n"), Some((MetricValue::Int(1), 1_790_000_000_000)));
    let mut s = opened.store;
    assert_eq!(
        commit(&mut *s, &[simple("old", 2), simple("old", 3)]),
        [false, true]
    );
    let rows = query(&*s, "old", Order::Asc, 10).expect("known");
    assert_eq!(seqs(&rows), [1, 2, 3]);
    assert_eq!(rows[1].tags, [("site".to_string(), "a".to_string())]);
    assert!(rows[2].rid > rows[1].rid, "a new id is above the old ones");
    let top = [
        reading("top", Some(u64::MAX), T0, vec![("u", MetricValue::Int(0))]),
        reading(
            "top",
            Some(u64::MAX - 1),
            T0,
            vec![("u", MetricValue::Int(0))],
        ),
    ];
    assert_eq!(commit(&mut *s, &top), [false, true]);
    let rows = query(&*s, "top", Order::Asc, 10).expect("known");
    let got: Vec<(Option<u64>, i64)> = rows.iter().map(|r| (r.seq, r.ts_ms)).collect();
    assert_eq!(
        got,
        [
            (Some(u64::MAX), T0),
            (Some(u64::MAX - 1), T0),
            (None, T0 + 500)
        ]
    );
    assert_eq!(
        rows[0].metrics,
        [("u".to_string(), MetricValue::UInt(u64::MAX))]
    );
    assert_eq!(b.db.sql("SELECT to_regclass('readings_v6') IS NULL"), "t");
    assert_eq!(
        b.db.sql("SELECT max(version) FROM refinery_schema_history"),
        sluice::store::postgres::schema_version().to_string()
    );
}

/// A back-fill below a device's seq high-water mark (seqs going down as `ts` goes back, one
/// reading a minute, so one chunk row each) is stored, and re-sent it is all duplicates.
/// Each of its readings is a dedupe lookup among the device's chunks; when that lookup read
/// every chunk above the seq, the third commit here outlasted the 10 s statement timeout and
/// was refused on every retry, so the history could never be filled in.
#[test]
fn postgres_backfill_below_the_high_water_is_stored() {
    let b = Postgres::new();
    let mut s = b.open().store;
    const PART: u64 = 10_000;
    let part = |p: u64| -> Vec<Reading> {
        (1 + p * PART..=(p + 1) * PART)
            .map(|k| {
                reading(
                    "backfill",
                    Some(4 * PART + 1 - k),
                    T0 - 60_000 * k as i64,
                    vec![("v", MetricValue::UInt(k))],
                )
            })
            .collect()
    };
    for p in 0..4 {
        let started = Instant::now();
        assert!(commit(&mut *s, &part(p)).iter().all(|new| *new), "part {p}");
        eprintln!("back-fill part {p}: {:?}", started.elapsed());
    }
    let started = Instant::now();
    assert!(commit(&mut *s, &part(1)).iter().all(|new| !*new));
    eprintln!("re-send of part 1: {:?}", started.elapsed());
    assert_eq!(
        b.db.sql("SELECT count(*), count(DISTINCT seq) FROM readings"),
        format!("{0}|{0}", 4 * PART)
    );
}

/// A database migrated by a newer Sluice is refused with a message that says so.
#[test]
fn postgres_refuses_a_newer_schema() {
    let b = Postgres::new();
    drop(b.open());
    b.db.sql(
        "INSERT INTO refinery_schema_history VALUES (99, 'future', '2030-01-01T00:00:00Z', '1')",
    );
    let err = match store::open(&b.settings(), &b.metrics) {
        Ok(_) => panic!("a newer schema must be refused"),
        Err(e) => e.to_string(),
    };
    let supported = sluice::store::postgres::schema_version();
    assert!(
        err.contains(&format!(
            "schema version 99 is newer than this Sluice supports ({supported})"
        )),
        "{err}"
    );
    let pre = sluice::store::postgres::preflight(&b.settings()).expect_err("refused at start");
    assert!(pre.contains("newer"), "{pre}");
}

/// Start-up refuses what retrying cannot fix (an unknown database or role), and lets through
/// a server that is only unreachable (the writer keeps trying).
#[test]
fn postgres_preflight_tells_fatal_from_transient() {
    let b = Postgres::new();
    sluice::store::postgres::preflight(&b.settings()).expect("a fresh, empty database is fine");
    let mut s = b.settings();
    s.postgres.url = sluice::config::DbUrl::new(format!("{}_missing", b.db.url()));
    let e = sluice::store::postgres::preflight(&s).expect_err("no such database");
    assert!(
        e.contains("does not exist") && e.contains("retrying cannot fix"),
        "{e}"
    );
    s.postgres.url = sluice::config::DbUrl::new(format!(
        "postgres://no_such_role:pw@127.0.0.1:5432/{}",
        b.db.name
    ));
    let e = sluice::store::postgres::preflight(&s).expect_err("no such role");
    assert!(e.contains("no_such_role") && !e.contains(":pw@"), "{e}");
    // Nothing listens on port 1: transient, start anyway.
    s.postgres.url =
        sluice::config::DbUrl::new(format!("postgres://postgres@127.0.0.1:1/{}", b.db.name));
    sluice::store::postgres::preflight(&s).expect("unreachable is not fatal");
}

/// Replicas opening one empty database at the same moment migrate it once, and then commit
/// concurrently, with overlapping readings in opposite orders: every key is stored once, and
/// each reading is reported new by exactly one of them.
#[test]
fn postgres_replicas_share_one_database() {
    let b = Arc::new(Postgres::new());
    let replicas: Vec<_> = (0..4)
        .map(|_| {
            let b = b.clone();
            std::thread::spawn(move || b.open().store)
        })
        .collect();
    let mut stores: Vec<Box<dyn Store>> = replicas.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        b.db.sql("SELECT count(*) FROM refinery_schema_history"),
        sluice::store::postgres::schema_version().to_string()
    );
    let devices = 50;
    let mut batches: Vec<Vec<Reading>> = Vec::new();
    for r in 0..stores.len() {
        let mut batch: Vec<Reading> = (0..devices)
            .flat_map(|d| (1..=20).map(move |seq| simple(&format!("dev{d}"), seq)))
            .collect();
        if r % 2 == 1 {
            batch.reverse();
        }
        batches.push(batch);
    }
    let handles: Vec<_> = stores
        .drain(..)
        .zip(batches)
        .map(|(mut s, batch)| {
            std::thread::spawn(move || {
                let mut new = 0;
                for part in batch.chunks(100) {
                    new += commit(&mut *s, part).iter().filter(|f| **f).count();
                }
                new
            })
        })
        .collect();
    let new: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(
        new,
        devices * 20,
        "each reading is new for exactly one replica"
    );
    assert_eq!(
        b.db.sql("SELECT count(*), count(DISTINCT (device_id, seq)) FROM readings"),
        format!("{}|{}", devices * 20, devices * 20)
    );
    assert_eq!(
        b.db.sql("SELECT count(*) FROM devices"),
        devices.to_string()
    );
}

/// Killed connections: a commit either fails (nothing acked) and the probe finds the server
/// again on a fresh connection, or it runs on a fresh connection at once; either way the
/// store keeps working and dedupes exactly.
#[test]
fn postgres_recovers_after_its_connections_are_killed() {
    let b = Postgres::new();
    let mut s = b.open().store;
    assert_eq!(commit(&mut *s, &[simple("k", 1)]), [true]);
    let kill = || {
        b.db.sql(&format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = '{}' AND pid <> pg_backend_pid()",
            b.db.name
        ))
    };
    assert_ne!(kill(), "0", "the store held a connection");
    // The pool may or may not have seen its connections close yet: either the commit fails
    // (nothing committed: the server ended the session before it began) and the store recovers
    // on a fresh connection, or it already runs on a fresh one.
    let batch = [simple("k", 2)];
    let refs: Vec<&Reading> = batch.iter().collect();
    let first = s.commit(&refs, 1);
    if first.is_err() {
        s.probe()
            .expect("the server is back for a fresh connection");
    } else {
        assert_eq!(first.as_deref().ok(), Some(&[true][..]));
    }
    assert_eq!(
        commit(&mut *s, &[simple("k", 1), simple("k", 2)]),
        [false, first.is_err()],
        "k/1 stored before the kill; k/2 stored exactly once"
    );
}

/// Retention deletes exactly the readings older than `storage.retention`, from a background
/// sweep started by `maintain`, and counts them; a resend of a deleted reading is new again.
#[test]
fn postgres_retention_deletes_expired_readings() {
    let b = Postgres::new();
    let mut settings = b.settings();
    settings.retention = Duration::from_secs(3600);
    let opened = store::open(&settings, &b.metrics).expect("store opens");
    let mut s = opened.store;
    let now = sluice::reading::now_ms();
    let old = |dev: &str, seq| {
        reading(
            dev,
            Some(seq),
            now - 2 * 3_600_000,
            vec![("v", MetricValue::Int(1))],
        )
    };
    let new = |dev: &str, seq| {
        reading(
            dev,
            Some(seq),
            now - 60_000,
            vec![("v", MetricValue::Int(2))],
        )
    };
    // More devices than one sweep transaction takes, so the sweep pages through them.
    let mut batch: Vec<Reading> = (0..1200).map(|d| old(&format!("r{d}"), 1)).collect();
    batch.extend((0..1200).map(|d| new(&format!("r{d}"), 2)));
    assert!(commit(&mut *s, &batch).iter().all(|f| *f));
    s.maintain().expect("maintain starts the sweep");
    wait_until(|| b.metrics.retention_deleted.get() == 1200);
    assert_eq!(
        b.db.sql("SELECT count(*), min(seq) FROM readings"),
        "1200|2"
    );
    assert_eq!(seqs(&query(&*s, "r7", Order::Asc, 10).expect("known")), [2]);
    assert_eq!(
        commit(&mut *s, &[old("r7", 1), new("r7", 2)]),
        [true, false]
    );
}

/// `replicas` stores on `b`'s database, each on its own thread, committing `batch(replica,
/// round)` for every round; each commit's answer goes to `check(round, flags)`.
fn replicas_commit(
    b: &Arc<Postgres>,
    replicas: u64,
    rounds: u64,
    batch: fn(u64, u64) -> Vec<Reading>,
    check: fn(u64, &[bool]),
) {
    let handles: Vec<_> = (0..replicas)
        .map(|r| {
            let b = b.clone();
            std::thread::spawn(move || {
                let mut s = b.open().store;
                for round in 0..rounds {
                    let readings = batch(r, round);
                    let refs: Vec<&Reading> = readings.iter().collect();
                    let flags = s
                        .commit(&refs, sluice::reading::now_ms())
                        .expect("no deadlock, no failed commit");
                    check(round, &flags);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("replica thread");
    }
}

/// Replicas committing overlapping devices with late (out-of-order) readings at the same time
/// never deadlock: every commit succeeds, and device state ends as the per-metric newest value.
/// (Device rows used to be locked in two phases, update then insert, and deadlocked here.)
#[test]
fn postgres_replicas_with_late_readings_do_not_deadlock() {
    const REPLICAS: u64 = 6;
    const ROUNDS: u64 = 25;
    // 20 shared devices, 3 readings each, ts scattered up to an hour back.
    fn batch(r: u64, round: u64) -> Vec<Reading> {
        (0..60u64)
            .map(|i| {
                let seq = (r * 1000 + round) * 100 + i;
                let ts = T0 - ((seq * 7919) % 3_600_000) as i64;
                let dev = format!("shared{}", (i * 7 + r * 3 + round) % 20);
                reading(&dev, Some(seq), ts, vec![("v", MetricValue::Int(ts))])
            })
            .collect()
    }
    let b = Arc::new(Postgres::new());
    replicas_commit(&b, REPLICAS, ROUNDS, batch, |_, _| {});
    assert_eq!(
        b.db.sql("SELECT count(*) FROM readings"),
        (REPLICAS * ROUNDS * 60).to_string()
    );
    // Each device's latest `v` is its newest reading's (v = ts).
    let mut newest: std::collections::BTreeMap<String, i64> = Default::default();
    for r in 0..REPLICAS {
        for round in 0..ROUNDS {
            for reading in batch(r, round) {
                let slot = newest
                    .entry(reading.device_id.to_string())
                    .or_insert(i64::MIN);
                *slot = (*slot).max(reading.ts_ms);
            }
        }
    }
    let expected: String = newest
        .iter()
        .map(|(dev, ts)| format!("{dev}|{ts}|{ts}\n"))
        .collect();
    assert_eq!(
        b.db.sql(
            "SELECT device_id, (latest::jsonb -> 'v' ->> 1)::bigint, last_ts_ms FROM devices
             ORDER BY device_id"
        ) + "\n",
        expected
    );
}

/// Replicas creating the same new devices at the same time take their row locks in one order:
/// no deadlock, so no commit is retried. (Rows for new devices used to be inserted after the
/// known ones were locked; a row another replica had just inserted and locked was then locked
/// out of order, and PostgreSQL broke the cycle after `deadlock_timeout`, a second.)
#[test]
fn postgres_replicas_creating_the_same_devices_take_locks_in_order() {
    const REPLICAS: u64 = 8;
    const ROUNDS: u64 = 60;
    // Devices of this round and the next (new to all, and created by whichever replica gets
    // there first) and 100 that exist, interleaved, each replica its own mix and its own
    // seqs: 200 readings. Replicas run unaligned.
    fn batch(r: u64, round: u64) -> Vec<Reading> {
        let pick = |i: u64| (i * 7 + r * 31 + round * 13) % 200;
        (0..200u64)
            .map(|i| {
                let dev = match i % 4 {
                    0 => format!("n{round}-{}", pick(i)),
                    1 => format!("n{}-{}", round + 1, pick(i)),
                    _ => format!("known-{}", pick(i)),
                };
                let seq = round * REPLICAS + r;
                reading(&dev, Some(seq), T0, vec![("v", MetricValue::Int(1))])
            })
            .collect()
    }
    let b = Arc::new(Postgres::new());
    replicas_commit(&b, REPLICAS, ROUNDS, batch, |round, flags| {
        assert!(
            flags.iter().all(|f| *f),
            "round {round}: every reading is new"
        );
    });
    assert_eq!(
        b.metrics
            .store_commit_retries
            .with_label_values(&["postgres"])
            .get(),
        0,
        "commits were retried (deadlocks)"
    );
    assert_eq!(
        b.db.sql("SELECT count(*) FROM readings"),
        (REPLICAS * ROUNDS * 200).to_string()
    );
}

/// A table locked by someone else fails the commit after `storage.postgres.statement_timeout`
/// (nothing acked) instead of holding ingest; once the lock is gone, commits work again.
#[test]
fn postgres_commit_gives_up_on_a_held_lock() {
    let b = Postgres::new();
    let mut settings = b.settings();
    settings.postgres.statement_timeout = Duration::from_millis(300);
    let mut s = store::open(&settings, &b.metrics)
        .expect("store opens")
        .store;
    assert_eq!(commit(&mut *s, &[simple("lk", 1)]), [true]);
    let mut holder = std::process::Command::new("psql")
        .args(["-X", "-q", "-d", &b.db.url(), "-c"])
        .arg("BEGIN; LOCK TABLE chunks IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(30); COMMIT;")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("psql starts");
    wait_until(|| {
        b.db.sql(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
             WHERE c.relname = 'chunks' AND l.mode = 'AccessExclusiveLock' AND l.granted",
        ) == "1"
    });
    let started = Instant::now();
    let batch = [simple("lk", 2)];
    let refs: Vec<&Reading> = batch.iter().collect();
    let err = s
        .commit(&refs, 1)
        .expect_err("the lock outlasts the statement timeout");
    assert!(err.to_string().contains("statement timeout"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let _ = holder.kill();
    let _ = holder.wait();
    b.db.sql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' AND pid <> pg_backend_pid()");
    s.probe().expect("the store answers again");
    assert_eq!(commit(&mut *s, &[simple("lk", 2)]), [true]);
}
