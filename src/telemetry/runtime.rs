//! Event-loop load (SPEC §7): how busy the tokio runtime is, how late it runs a woken task, and
//! where each family of tasks spends its time.
//!
//! This sits beside the flow, not in it. Three sources, all on **stable** tokio (no
//! `--cfg tokio_unstable`):
//!
//! - [`RuntimeCollector`] reads `Handle::metrics()` at scrape time: workers, alive tasks,
//!   global queue depth, and per-worker busy time and park count. Nothing is counted on the hot
//!   path; the runtime keeps these counters anyway.
//! - The lag probe ([`RuntimeTelemetry::start`]) is one task that sleeps [`LAG_PROBE_PERIOD`]
//!   and records how late it woke into `sluice_event_loop_lag_seconds`. A woken task waits for a
//!   free worker and for a worker to poll the timer/IO driver; the probe feels both.
//! - [`TaskMonitors`] wrap the futures of each task family (ingest handlers, batcher, store
//!   writer, MQTT source, WebSocket connections) in a `tokio-metrics` `TaskMonitor`, which
//!   measures wake → poll (scheduled) time and poll time by wrapping the waker, so it needs no
//!   unstable runtime API. [`TaskCollector`] exports their cumulative totals at scrape time.
//!
//! Why a single lag probe: the multi-thread scheduler cannot pin a task to a worker, so "one
//! probe per worker" would not stay on its worker. A timer wake is run by a worker that is free
//! to poll the driver, so one probe measures how long *any* newly woken task (a new request, an
//! ack) waits for *some* worker: the latency devices feel. One worker stuck in a long poll shows
//! instead in its own `sluice_runtime_worker_busy_seconds_total{worker}` rate and in the
//! scheduled time of the task family it delays.
//!
//! `telemetry.runtime = false` turns all three off (no collector, no probe, futures not
//! wrapped), for measuring their overhead or as an escape hatch.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::future::Either;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{CounterVec, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};
use tokio::runtime::Handle;
use tokio::task::AbortHandle;
use tokio_metrics::{Instrumented, TaskMonitor};

use crate::config::TelemetrySettings;

/// How often the lag probe wakes. Ten samples a second: a stall of 100 ms or more is always
/// caught by at least one sample, and the probe itself costs nothing measurable.
pub const LAG_PROBE_PERIOD: Duration = Duration::from_millis(100);

/// Buckets of `sluice_event_loop_lag_seconds`. The timer has a 1 ms resolution, so lags under
/// 1 ms are noise; the alert threshold (50 ms) sits well inside the range.
const LAG_BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// One family of tasks, the `task` label. Cheap to clone.
#[derive(Clone)]
pub struct TaskFamily {
    /// The label value.
    name: &'static str,
    /// `None` when `telemetry.runtime = false`: futures pass through untouched.
    monitor: Option<TaskMonitor>,
}

impl TaskFamily {
    fn new(name: &'static str, slow_poll: Option<Duration>) -> Self {
        Self {
            name,
            monitor: slow_poll.map(|threshold| {
                let mut builder = TaskMonitor::builder();
                builder.with_slow_poll_threshold(threshold);
                builder.build()
            }),
        }
    }

    /// The `task` label value.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Wraps `fut` so its scheduled and poll time count towards this family. Wrap the future
    /// given to `tokio::spawn` (or a handler's body), once.
    pub fn instrument<F: Future>(&self, fut: F) -> Either<Instrumented<F>, F> {
        match &self.monitor {
            Some(m) => Either::Left(m.instrument(fut)),
            None => Either::Right(fut),
        }
    }
}

/// The task families Sluice measures, one field per `task` label value. Every label is
/// exported from the start, so a family that has not run yet shows zeros, not a gap.
#[derive(Clone)]
pub struct TaskMonitors {
    /// `POST /v1/readings` handler futures (`task="ingest"`).
    pub ingest: TaskFamily,
    /// The batcher task (`task="batcher"`).
    pub batcher: TaskFamily,
    /// The store writer's task (`task="store"`): it starts the writer thread, which does the
    /// commits off the event loop, and ticks its upkeep once a second.
    pub store: TaskFamily,
    /// The MQTT source's tasks (`task="mqtt"`).
    pub mqtt: TaskFamily,
    /// WebSocket connection tasks, device and live (`task="ws"`).
    pub ws: TaskFamily,
}

impl TaskMonitors {
    /// Monitors as configured: enabled with `telemetry.slow_poll_threshold`, or pass-through
    /// when `telemetry.runtime = false`.
    pub fn from_settings(settings: &TelemetrySettings) -> Self {
        let slow = settings.runtime.then_some(settings.slow_poll_threshold);
        Self {
            ingest: TaskFamily::new("ingest", slow),
            batcher: TaskFamily::new("batcher", slow),
            store: TaskFamily::new("store", slow),
            mqtt: TaskFamily::new("mqtt", slow),
            ws: TaskFamily::new("ws", slow),
        }
    }

    /// Whether futures are measured at all.
    pub fn enabled(&self) -> bool {
        self.ingest.monitor.is_some()
    }

    fn all(&self) -> [&TaskFamily; 5] {
        [
            &self.ingest,
            &self.batcher,
            &self.store,
            &self.mqtt,
            &self.ws,
        ]
    }
}

impl Default for TaskMonitors {
    fn default() -> Self {
        Self::from_settings(&TelemetrySettings::default())
    }
}

/// Exports the cumulative totals of [`TaskMonitors`] at scrape time.
pub struct TaskCollector {
    /// `(label, monitor)` for every enabled family.
    families: Vec<(&'static str, TaskMonitor)>,
    /// `sluice_task_scheduled_seconds_total`: woken → polled.
    scheduled: CounterVec,
    /// `sluice_task_schedules_total`: how many times a family was woken and then polled.
    schedules: IntCounterVec,
    /// `sluice_task_poll_seconds_total`: time inside `poll`.
    poll: CounterVec,
    /// `sluice_task_polls_total`.
    polls: IntCounterVec,
    /// `sluice_task_slow_polls_total`: polls over `telemetry.slow_poll_threshold`.
    slow_polls: IntCounterVec,
    /// Serialises scrapes: each counter is rewritten (reset, then set) during `collect`.
    scrape: Mutex<()>,
}

impl TaskCollector {
    /// A collector over `monitors`; empty when they are disabled.
    pub fn new(monitors: &TaskMonitors) -> prometheus::Result<Self> {
        let counter = |name: &str, help: &str| CounterVec::new(Opts::new(name, help), &["task"]);
        let int_counter =
            |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &["task"]);
        let c = Self {
            families: monitors
                .all()
                .into_iter()
                .filter_map(|f| f.monitor.clone().map(|m| (f.name, m)))
                .collect(),
            scheduled: counter(
                "sluice_task_scheduled_seconds_total",
                "Time tasks of a family spent woken but waiting for a worker to poll them.",
            )?,
            schedules: int_counter(
                "sluice_task_schedules_total",
                "Times tasks of a family were woken and then polled.",
            )?,
            poll: counter(
                "sluice_task_poll_seconds_total",
                "Time tasks of a family spent being polled (running on a worker).",
            )?,
            polls: int_counter(
                "sluice_task_polls_total",
                "Polls of tasks of a family.",
            )?,
            slow_polls: int_counter(
                "sluice_task_slow_polls_total",
                "Polls longer than telemetry.slow_poll_threshold: they hold a worker from every other task.",
            )?,
            scrape: Mutex::new(()),
        };
        for (name, _) in &c.families {
            c.scheduled.with_label_values(&[name]);
            c.schedules.with_label_values(&[name]);
            c.poll.with_label_values(&[name]);
            c.polls.with_label_values(&[name]);
            c.slow_polls.with_label_values(&[name]);
        }
        Ok(c)
    }
}

impl Collector for TaskCollector {
    fn desc(&self) -> Vec<&Desc> {
        [
            self.scheduled.desc(),
            self.schedules.desc(),
            self.poll.desc(),
            self.polls.desc(),
            self.slow_polls.desc(),
        ]
        .concat()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _scrape = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        for (name, monitor) in &self.families {
            let m = monitor.cumulative();
            let labels = [*name];
            set_counter(
                &self.scheduled,
                &labels,
                m.total_scheduled_duration.as_secs_f64(),
            );
            set_int_counter(&self.schedules, &labels, m.total_scheduled_count);
            set_counter(&self.poll, &labels, m.total_poll_duration.as_secs_f64());
            set_int_counter(&self.polls, &labels, m.total_poll_count);
            set_int_counter(&self.slow_polls, &labels, m.total_slow_poll_count);
        }
        [
            self.scheduled.collect(),
            self.schedules.collect(),
            self.poll.collect(),
            self.polls.collect(),
            self.slow_polls.collect(),
        ]
        .concat()
    }
}

/// Exports `Handle::metrics()` (the stable subset) at scrape time.
pub struct RuntimeCollector {
    /// The runtime Sluice runs on.
    handle: Handle,
    /// Worker label values, `"0"`…, fixed for the life of the runtime.
    worker_labels: Vec<String>,
    /// `sluice_runtime_workers`.
    workers: IntGauge,
    /// `sluice_runtime_alive_tasks`.
    alive_tasks: IntGauge,
    /// `sluice_runtime_global_queue_depth`.
    global_queue_depth: IntGauge,
    /// `sluice_runtime_worker_busy_seconds_total{worker}`.
    busy: CounterVec,
    /// `sluice_runtime_worker_park_total{worker}`.
    parks: IntCounterVec,
    /// Serialises scrapes: each counter is rewritten (reset, then set) during `collect`.
    scrape: Mutex<()>,
}

impl RuntimeCollector {
    /// A collector for the runtime behind `handle`.
    pub fn new(handle: Handle) -> prometheus::Result<Self> {
        let gauge = |name: &str, help: &str| IntGauge::new(name, help);
        let workers = handle.metrics().num_workers();
        let c = Self {
            worker_labels: (0..workers).map(|w| w.to_string()).collect(),
            handle,
            workers: gauge(
                "sluice_runtime_workers",
                "Worker threads of the tokio runtime (the event loop).",
            )?,
            alive_tasks: gauge(
                "sluice_runtime_alive_tasks",
                "Tasks currently alive on the runtime (spawned, not yet finished).",
            )?,
            global_queue_depth: gauge(
                "sluice_runtime_global_queue_depth",
                "Tasks waiting in the runtime's global (injection) queue for a worker.",
            )?,
            busy: CounterVec::new(
                Opts::new(
                    "sluice_runtime_worker_busy_seconds_total",
                    "Time a worker spent running tasks rather than parked. rate() / 1 s is its busy ratio.",
                ),
                &["worker"],
            )?,
            parks: IntCounterVec::new(
                Opts::new(
                    "sluice_runtime_worker_park_total",
                    "Times a worker ran out of work and parked.",
                ),
                &["worker"],
            )?,
            scrape: Mutex::new(()),
        };
        for w in &c.worker_labels {
            c.busy.with_label_values(&[w]);
            c.parks.with_label_values(&[w]);
        }
        Ok(c)
    }
}

impl Collector for RuntimeCollector {
    fn desc(&self) -> Vec<&Desc> {
        [
            self.workers.desc(),
            self.alive_tasks.desc(),
            self.global_queue_depth.desc(),
            self.busy.desc(),
            self.parks.desc(),
        ]
        .concat()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _scrape = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        let m = self.handle.metrics();
        self.workers.set(m.num_workers() as i64);
        self.alive_tasks.set(m.num_alive_tasks() as i64);
        self.global_queue_depth.set(m.global_queue_depth() as i64);
        for (w, label) in self.worker_labels.iter().enumerate() {
            let labels = [label.as_str()];
            set_counter(
                &self.busy,
                &labels,
                m.worker_total_busy_duration(w).as_secs_f64(),
            );
            set_int_counter(&self.parks, &labels, m.worker_park_count(w));
        }
        [
            self.workers.collect(),
            self.alive_tasks.collect(),
            self.global_queue_depth.collect(),
            self.busy.collect(),
            self.parks.collect(),
        ]
        .concat()
    }
}

/// A counter mirroring a cumulative total kept elsewhere. Only called under a scrape lock.
fn set_counter(vec: &CounterVec, labels: &[&str], total: f64) {
    let c = vec.with_label_values(labels);
    c.reset();
    c.inc_by(total);
}

/// As [`set_counter`], for integer totals.
fn set_int_counter(vec: &IntCounterVec, labels: &[&str], total: u64) {
    let c = vec.with_label_values(labels);
    c.reset();
    c.inc_by(total);
}

/// The runtime collector and the lag probe of one running app. Dropping it stops the probe.
pub struct RuntimeTelemetry {
    /// The probe task.
    probe: AbortHandle,
}

impl RuntimeTelemetry {
    /// Registers [`RuntimeCollector`] and `sluice_event_loop_lag_seconds` in `registry`, and
    /// spawns the lag probe on `handle`.
    pub fn start(registry: &Registry, handle: &Handle) -> prometheus::Result<Self> {
        registry.register(Box::new(RuntimeCollector::new(handle.clone())?))?;
        let lag = Histogram::with_opts(
            HistogramOpts::new(
                "sluice_event_loop_lag_seconds",
                "How late a probe task woke from a timer: the wait of a newly woken task for a worker.",
            )
            .buckets(LAG_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(lag.clone()))?;
        let probe = handle.spawn(lag_probe(lag, LAG_PROBE_PERIOD));
        Ok(Self {
            probe: probe.abort_handle(),
        })
    }
}

impl Drop for RuntimeTelemetry {
    fn drop(&mut self) {
        self.probe.abort();
    }
}

/// Sleeps `period`, records how late it woke, forever.
async fn lag_probe(lag: Histogram, period: Duration) {
    loop {
        let deadline = tokio::time::Instant::now() + period;
        tokio::time::sleep_until(deadline).await;
        let late = tokio::time::Instant::now().saturating_duration_since(deadline);
        lag.observe(late.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn family<'a>(families: &'a [MetricFamily], name: &str) -> &'a MetricFamily {
        families
            .iter()
            .find(|f| f.name() == name)
            .unwrap_or_else(|| panic!("{name} missing"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runtime_collector_reports_every_worker() {
        let c = RuntimeCollector::new(Handle::current()).unwrap();
        let families = c.collect();
        let workers = family(&families, "sluice_runtime_workers");
        assert_eq!(workers.get_metric()[0].get_gauge().get_value(), 2.0);
        let busy = family(&families, "sluice_runtime_worker_busy_seconds_total");
        let mut labels: Vec<&str> = busy
            .get_metric()
            .iter()
            .map(|m| m.get_label()[0].value())
            .collect();
        labels.sort_unstable();
        assert_eq!(labels, ["0", "1"]);
        assert!(!family(&families, "sluice_runtime_alive_tasks")
            .get_metric()
            .is_empty());
        // Descriptions and collected families agree, as the registry requires.
        assert_eq!(c.desc().len(), families.len());
    }

    #[tokio::test]
    async fn task_collector_counts_polls_of_instrumented_futures() {
        let monitors = TaskMonitors::default();
        let c = TaskCollector::new(&monitors).unwrap();
        for _ in 0..3 {
            monitors.batcher.instrument(tokio::task::yield_now()).await;
        }
        let families = c.collect();
        let polls = family(&families, "sluice_task_polls_total");
        let value = |task: &str| {
            polls
                .get_metric()
                .iter()
                .find(|m| m.get_label()[0].value() == task)
                .map(|m| m.get_counter().get_value())
        };
        // yield_now is polled twice: once to yield, once to finish.
        assert_eq!(value("batcher"), Some(6.0));
        assert_eq!(value("ingest"), Some(0.0));
        assert_eq!(value("mqtt"), Some(0.0));
        // A second scrape reports totals, not increments.
        let again = c.collect();
        let polls = family(&again, "sluice_task_polls_total");
        assert!(polls
            .get_metric()
            .iter()
            .any(|m| m.get_label()[0].value() == "batcher" && m.get_counter().get_value() == 6.0));
    }

    #[tokio::test]
    async fn disabled_monitors_pass_futures_through_and_export_nothing() {
        let settings = TelemetrySettings {
            runtime: false,
            ..TelemetrySettings::default()
        };
        let monitors = TaskMonitors::from_settings(&settings);
        assert!(!monitors.enabled());
        assert!(matches!(
            monitors.ingest.instrument(async { 7 }),
            Either::Right(_)
        ));
        assert_eq!(monitors.ingest.instrument(async { 7 }).await, 7);
        let c = TaskCollector::new(&monitors).unwrap();
        assert!(c.collect().iter().all(|f| f.get_metric().is_empty()));
    }
}
