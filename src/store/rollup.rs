//! Rollups and aggregation queries (SPEC §12), the part every backend shares: the read side of
//! `GET /v1/devices/{id}/readings?agg=&step=` (api::query → [`StoreRead::aggregate`] → here).
//!
//! - [`Agg`] is one metric's aggregate over one bucket: count, sum, min, max, first and last
//!   (by `(ts, rid)`, the readings order). Two aggregates of disjoint sets of readings merge
//!   into the aggregate of their union ([`Agg::merge`]), whatever the order: that is what lets
//!   the embedded store derive rollups during compaction, merge a late reading into a closed
//!   bucket, and answer a query from rollup rows plus the readings not yet compacted.
//! - [`plan`] resolves a query: its range widened to whole buckets of `step`, the number of
//!   buckets (refused past `limit`), and which part is served from which level.
//! - [`SeriesBuilder`] folds rows and rollup buckets into the answer's buckets.
//!
//! Values: booleans count as 0 and 1 in `sum` (so the sum of a boolean is its count of true,
//! and its average the fraction true); `sum` is a double. `min`, `max`, `first` and `last`
//! are the exact values that were stored.
//!
//! [`StoreRead::aggregate`]: super::StoreRead::aggregate

use std::cmp::Ordering;

use serde::Serialize;

use crate::reading::MetricValue;

/// One metric's aggregate over one bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agg {
    /// Readings that carried the metric.
    pub count: u64,
    /// Their sum, booleans as 0 and 1.
    pub sum: f64,
    /// The smallest value ([`compare`] order).
    pub min: MetricValue,
    /// The largest value.
    pub max: MetricValue,
    /// The value of the first reading in `(ts, rid)` order, with its `ts` (epoch ms) and rid.
    pub first: (i64, u64, MetricValue),
    /// The value of the last reading in `(ts, rid)` order.
    pub last: (i64, u64, MetricValue),
}

/// A value as a number: booleans are 0 and 1.
pub fn numeric(v: MetricValue) -> f64 {
    match v {
        MetricValue::Int(i) => i as f64,
        MetricValue::UInt(u) => u as f64,
        MetricValue::Float(f) => f,
        MetricValue::Bool(b) => f64::from(u8::from(b)),
    }
}

/// The total order of `min` and `max`: by numeric value (integers compared exactly, booleans
/// as 0 and 1), then, for equal numbers of different kinds, bool < int < float; so that
/// merging is independent of order.
pub fn compare(a: MetricValue, b: MetricValue) -> Ordering {
    use MetricValue::*;
    // The common cases first: one kind on both sides (the general rule below agrees).
    match (a, b) {
        (Float(x), Float(y)) => return x.total_cmp(&y),
        (Int(x), Int(y)) => return x.cmp(&y),
        _ => {}
    }
    let exact = |v: MetricValue| match v {
        Int(i) => Some(i128::from(i)),
        UInt(u) => Some(i128::from(u)),
        Bool(b) => Some(i128::from(b)),
        Float(_) => None,
    };
    let rank = |v: MetricValue| match v {
        Bool(_) => 0,
        Int(_) | UInt(_) => 1,
        Float(_) => 2,
    };
    let by_value = match (exact(a), exact(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        _ => numeric(a).total_cmp(&numeric(b)),
    };
    by_value.then(rank(a).cmp(&rank(b)))
}

impl Agg {
    /// The aggregate of one reading's value.
    pub fn of(value: MetricValue, ts_ms: i64, rid: u64) -> Self {
        Self {
            count: 1,
            sum: numeric(value),
            min: value,
            max: value,
            first: (ts_ms, rid, value),
            last: (ts_ms, rid, value),
        }
    }

    /// Adds one reading's value.
    pub fn add(&mut self, value: MetricValue, ts_ms: i64, rid: u64) {
        // `merge` of `Agg::of(value, …)`, without building it: once per value in compaction.
        self.count += 1;
        self.sum += numeric(value);
        if compare(value, self.min) == Ordering::Less {
            self.min = value;
        }
        if compare(value, self.max) == Ordering::Greater {
            self.max = value;
        }
        if (ts_ms, rid) < (self.first.0, self.first.1) {
            self.first = (ts_ms, rid, value);
        }
        if (ts_ms, rid) > (self.last.0, self.last.1) {
            self.last = (ts_ms, rid, value);
        }
    }

    /// Merges the aggregate of a disjoint set of readings.
    pub fn merge(&mut self, o: &Agg) {
        self.count += o.count;
        self.sum += o.sum;
        if compare(o.min, self.min) == Ordering::Less {
            self.min = o.min;
        }
        if compare(o.max, self.max) == Ordering::Greater {
            self.max = o.max;
        }
        if (o.first.0, o.first.1) < (self.first.0, self.first.1) {
            self.first = o.first;
        }
        if (o.last.0, o.last.1) > (self.last.0, self.last.1) {
            self.last = o.last;
        }
    }
}

/// `agg=`: what each bucket answers per metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggFn {
    /// `sum / count` (a boolean's fraction true).
    Avg,
    /// The smallest value.
    Min,
    /// The largest value.
    Max,
    /// The sum (a boolean's count of true).
    Sum,
    /// How many readings carried the metric.
    Count,
    /// The value of the first reading by time.
    First,
    /// The value of the last reading by time.
    Last,
}

impl AggFn {
    /// Every function, in the order the API lists them.
    pub const ALL: [AggFn; 7] = [
        AggFn::Avg,
        AggFn::Min,
        AggFn::Max,
        AggFn::Sum,
        AggFn::Count,
        AggFn::First,
        AggFn::Last,
    ];

    /// Its name in `agg=`.
    pub fn as_str(self) -> &'static str {
        match self {
            AggFn::Avg => "avg",
            AggFn::Min => "min",
            AggFn::Max => "max",
            AggFn::Sum => "sum",
            AggFn::Count => "count",
            AggFn::First => "first",
            AggFn::Last => "last",
        }
    }

    /// Parses [`AggFn::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == s)
    }

    /// The answer for one bucket's aggregate.
    pub fn value(self, a: &Agg) -> AggValue {
        match self {
            AggFn::Avg => AggValue::Number(a.sum / a.count.max(1) as f64),
            AggFn::Sum => AggValue::Number(a.sum),
            AggFn::Count => AggValue::Count(a.count),
            AggFn::Min => AggValue::Value(a.min),
            AggFn::Max => AggValue::Value(a.max),
            AggFn::First => AggValue::Value(a.first.2),
            AggFn::Last => AggValue::Value(a.last.2),
        }
    }
}

/// One answer value: a double (avg, sum), a count, or a stored value as it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(untagged)]
pub enum AggValue {
    /// `avg`, `sum`.
    Number(f64),
    /// `count`.
    Count(u64),
    /// `min`, `max`, `first`, `last`.
    Value(MetricValue),
}

/// The start of the bucket of width `step_ms` holding `ts_ms`: a whole multiple of the step
/// since the Unix epoch.
pub fn bucket_start(ts_ms: i64, step_ms: i64) -> i64 {
    ts_ms.div_euclid(step_ms).saturating_mul(step_ms)
}

/// `agg=&step=` on `GET /v1/devices/{id}/readings`, already validated.
#[derive(Debug, Clone)]
pub struct AggQuery {
    /// Which device.
    pub device_id: String,
    /// Inclusive lower bound (epoch ms); `None`: the device's oldest stored data.
    pub from_ms: Option<i64>,
    /// Exclusive upper bound (epoch ms); `None`: just past its newest.
    pub to_ms: Option<i64>,
    /// Only this metric.
    pub metric: Option<String>,
    /// Bucket width in ms (at least 1).
    pub step_ms: i64,
    /// The most buckets the range may span (the query's `limit`).
    pub max_buckets: u64,
}

/// Where an answer came from (the `source` label of `sluice_rollup_queries_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggSource {
    /// From a rollup level (its width in ms), plus the readings not yet rolled up.
    Level(i64),
    /// Computed from raw readings.
    Raw,
}

/// A store's answer to an [`AggQuery`].
#[derive(Debug, Clone, PartialEq)]
pub enum AggAnswer {
    /// The non-empty buckets, oldest first (metrics in first-seen order).
    Series(AggSeries),
    /// The range spans more buckets than the query's limit: nothing was read.
    TooManyBuckets {
        /// Buckets of `step` in the range.
        buckets: u64,
        /// The range, widened to whole buckets (epoch ms).
        from_ms: i64,
        /// Its end.
        to_ms: i64,
    },
}

/// Non-empty buckets of an aggregation, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct AggSeries {
    /// Where the (newest part of the) answer came from.
    pub source: AggSource,
    /// Metric names, indexed by the buckets' entries.
    pub names: Vec<String>,
    /// `(bucket start ms, [(index into names, aggregate)])`, metrics in first-seen order.
    pub buckets: Vec<(i64, Vec<(u32, Agg)>)>,
}

/// How a store answers a query ([`plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The range, widened to whole buckets of the step: `[from, to)`.
    pub from_ms: i64,
    /// Its end.
    pub to_ms: i64,
    /// The level that serves buckets at or after `level_from_ms`, if any.
    pub level_ms: Option<i64>,
    /// Buckets starting before this are computed from raw readings (the level has dropped
    /// them: `rollups.retention`); `to_ms` or beyond when no level serves.
    pub level_from_ms: i64,
}

/// Resolves `q` against the device's stored extent `(oldest ts, newest ts)` (`None`: nothing
/// stored) and the store's complete `levels` (ms, finest first). `Err(answer)` when there is
/// nothing to read: an empty series, or too many buckets.
///
/// A step served from a level is a multiple of it: the coarsest level that divides the step.
/// Buckets are whole: a `from` inside a bucket takes the whole bucket, and so does a `to`.
pub fn plan(
    q: &AggQuery,
    extent: Option<(i64, i64)>,
    levels: &[i64],
    rollup_retention_ms: i64,
    now_ms: i64,
) -> Result<Plan, AggAnswer> {
    let step = q.step_ms.max(1);
    let empty = |level: Option<i64>| {
        AggAnswer::Series(AggSeries {
            source: level.map_or(AggSource::Raw, AggSource::Level),
            names: Vec::new(),
            buckets: Vec::new(),
        })
    };
    let level = levels
        .iter()
        .rev()
        .copied()
        .find(|l| *l > 0 && step % l == 0);
    let (from, to) = match (q.from_ms, q.to_ms, extent) {
        (Some(f), Some(t), _) => (f, t),
        (f, t, Some((lo, hi))) => (f.unwrap_or(lo), t.unwrap_or(hi.saturating_add(1))),
        (_, _, None) => return Err(empty(level)),
    };
    if from >= to {
        return Err(empty(level));
    }
    let from_ms = bucket_start(from, step);
    let last = bucket_start(to.saturating_sub(1), step);
    let buckets = ((i128::from(last) - i128::from(from_ms)) / i128::from(step) + 1) as u64;
    let to_ms = last.saturating_add(step);
    if buckets > q.max_buckets {
        return Err(AggAnswer::TooManyBuckets {
            buckets,
            from_ms,
            to_ms,
        });
    }
    let level_from_ms = match level {
        None => to_ms,
        Some(_) => {
            // Rollup retention deletes a level bucket once it ended before `now − retention`;
            // a step bucket starting at or after that moment is whole in the level.
            let cutoff = now_ms.saturating_sub(rollup_retention_ms);
            bucket_start(cutoff, step)
                .saturating_add(if cutoff.rem_euclid(step) == 0 {
                    0
                } else {
                    step
                })
                .max(from_ms)
        }
    };
    Ok(Plan {
        from_ms,
        to_ms,
        level_ms: level,
        level_from_ms,
    })
}

/// Folds rows and rollup buckets into the answer's step buckets.
#[derive(Debug)]
pub struct SeriesBuilder {
    /// The step (ms).
    step_ms: i64,
    /// Only this metric, if set.
    metric: Option<String>,
    /// Metric names seen, by index.
    names: Vec<String>,
    /// name → index.
    index: foldhash::HashMap<String, u32>,
    /// Buckets sorted by start, each with its metrics' aggregates. Rows and level buckets
    /// mostly arrive in time order, so the last bucket is tried first, then a binary search.
    buckets: Vec<(i64, Vec<(u32, Agg)>)>,
}

impl SeriesBuilder {
    /// An empty series of `step_ms` buckets, narrowed to `metric` if given.
    pub fn new(step_ms: i64, metric: Option<String>) -> Self {
        Self {
            step_ms: step_ms.max(1),
            metric,
            names: Vec::new(),
            index: Default::default(),
            buckets: Vec::new(),
        }
    }

    /// The aggregates of the bucket starting at `start`, added if new.
    fn bucket(&mut self, start: i64) -> &mut Vec<(u32, Agg)> {
        let at = match self.buckets.last() {
            Some((last, _)) if *last == start => self.buckets.len() - 1,
            Some((last, _)) if *last < start => {
                self.buckets.push((start, Vec::new()));
                self.buckets.len() - 1
            }
            None => {
                self.buckets.push((start, Vec::new()));
                0
            }
            Some(_) => match self.buckets.binary_search_by_key(&start, |(s, _)| *s) {
                Ok(i) => i,
                Err(i) => {
                    self.buckets.insert(i, (start, Vec::new()));
                    i
                }
            },
        };
        &mut self.buckets[at].1
    }

    /// Whether the series takes this metric.
    pub fn wants(&self, name: &str) -> bool {
        self.metric.as_deref().is_none_or(|m| m == name)
    }

    /// The index of `name`, added if new.
    pub fn name_index(&mut self, name: &str) -> u32 {
        if let Some(i) = self.index.get(name) {
            return *i;
        }
        let i = self.names.len() as u32;
        self.names.push(name.to_owned());
        self.index.insert(name.to_owned(), i);
        i
    }

    /// Adds a reading's metrics (those the series takes).
    pub fn add_row(&mut self, ts_ms: i64, rid: u64, metrics: &[(String, MetricValue)]) {
        let bucket = bucket_start(ts_ms, self.step_ms);
        for (name, value) in metrics {
            if !self.wants(name) {
                continue;
            }
            let i = self.name_index(name);
            let aggs = self.bucket(bucket);
            match aggs.iter_mut().find(|(n, _)| *n == i) {
                Some((_, a)) => a.add(*value, ts_ms, rid),
                None => aggs.push((i, Agg::of(*value, ts_ms, rid))),
            }
        }
    }

    /// Merges an aggregate of metric `name` (an index from [`SeriesBuilder::name_index`])
    /// over a bucket starting at `start_ms` that lies inside one step bucket (a level bucket).
    pub fn add_agg(&mut self, start_ms: i64, name: u32, agg: &Agg) {
        let bucket = bucket_start(start_ms, self.step_ms);
        let aggs = self.bucket(bucket);
        match aggs.iter_mut().find(|(n, _)| *n == name) {
            Some((_, a)) => a.merge(agg),
            None => aggs.push((name, *agg)),
        }
    }

    /// The series, oldest bucket first.
    pub fn finish(self, source: AggSource) -> AggSeries {
        AggSeries {
            source,
            names: self.names,
            buckets: self.buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MetricValue::*;

    #[test]
    fn merge_is_the_aggregate_of_the_union_in_any_order() {
        let values = [
            (Int(3), 10, 1),
            (Float(2.5), 12, 2),
            (Int(3), 12, 3),
            (Bool(true), 5, 4),
            (UInt(u64::MAX), 11, 5),
        ];
        let all = values.iter().skip(1).fold(
            Agg::of(values[0].0, values[0].1, values[0].2),
            |mut a, v| {
                a.add(v.0, v.1, v.2);
                a
            },
        );
        for split in 1..values.len() {
            let part = |vs: &[(MetricValue, i64, u64)]| {
                vs.iter()
                    .skip(1)
                    .fold(Agg::of(vs[0].0, vs[0].1, vs[0].2), |mut a, v| {
                        a.add(v.0, v.1, v.2);
                        a
                    })
            };
            let (a, b) = values.split_at(split);
            let mut ab = part(a);
            ab.merge(&part(b));
            let mut ba = part(b);
            ba.merge(&part(a));
            assert_eq!(ab, all);
            assert_eq!(ba, all);
        }
        assert_eq!(all.count, 5);
        assert_eq!(all.min, Bool(true));
        assert_eq!(all.max, UInt(u64::MAX));
        assert_eq!(all.first, (5, 4, Bool(true)));
        assert_eq!(all.last, (12, 3, Int(3)));
    }

    #[test]
    fn booleans_sum_to_their_count_of_true() {
        let mut a = Agg::of(Bool(true), 1, 1);
        a.add(Bool(false), 2, 2);
        a.add(Bool(true), 3, 3);
        a.add(Bool(false), 4, 4);
        assert_eq!(AggFn::Sum.value(&a), AggValue::Number(2.0));
        assert_eq!(AggFn::Avg.value(&a), AggValue::Number(0.5));
        assert_eq!(AggFn::Max.value(&a), AggValue::Value(Bool(true)));
    }

    fn q(from: Option<i64>, to: Option<i64>, step: i64, max: u64) -> AggQuery {
        AggQuery {
            device_id: "d".into(),
            from_ms: from,
            to_ms: to,
            metric: None,
            step_ms: step,
            max_buckets: max,
        }
    }

    #[test]
    fn plans_whole_buckets_and_the_level() {
        let levels = [60_000, 3_600_000];
        let far = i64::MAX / 4;
        let p = plan(
            &q(Some(61_000), Some(300_001), 300_000, 10),
            None,
            &levels,
            far,
            0,
        )
        .unwrap();
        assert_eq!((p.from_ms, p.to_ms), (0, 600_000));
        assert_eq!(p.level_ms, Some(60_000));
        let p = plan(
            &q(Some(0), Some(7_200_000), 7_200_000, 10),
            None,
            &levels,
            far,
            0,
        )
        .unwrap();
        assert_eq!(p.level_ms, Some(3_600_000));
        let p = plan(&q(Some(0), Some(70_000), 7_000, 10), None, &levels, far, 0).unwrap();
        assert_eq!(p.level_ms, None);
        // Open ends take the stored extent.
        let p = plan(
            &q(None, None, 60_000, 10),
            Some((65_000, 130_000)),
            &levels,
            far,
            0,
        )
        .unwrap();
        assert_eq!((p.from_ms, p.to_ms), (60_000, 180_000));
        assert_eq!(
            plan(
                &q(Some(0), Some(3_600_000), 60_000, 59),
                None,
                &levels,
                far,
                0
            ),
            Err(AggAnswer::TooManyBuckets {
                buckets: 60,
                from_ms: 0,
                to_ms: 3_600_000
            })
        );
        // Past rollup retention, buckets come from raw readings.
        let p = plan(
            &q(Some(0), Some(600_000), 60_000, 100),
            None,
            &levels,
            100_000,
            290_000,
        )
        .unwrap();
        assert_eq!(p.level_from_ms, 240_000);
    }
}
