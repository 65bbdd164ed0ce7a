//! Alert rules (SPEC §12): store → committed-readings feed → **rule evaluation** → alert
//! events → outputs (live stream, webhook, MQTT).
//!
//! This module only evaluates: no I/O, no clock, no task. [`Evaluator`] is a state machine
//! per (rule, device), fed by the task in `outputs::alerts` with what was committed and with
//! the time, and it answers with [`Step`]s for each transition to `firing` or back to
//! `inactive`: the state change to persist and the event to announce. Transitions without an
//! event (to `pending`, and back) are only marked, and [`Evaluator::take_quiet`] turns the
//! marks into changes when the task saves them, once per timer tick. [`RulesFeed`] is the
//! service in the commit chain that hands committed readings to that task without waiting.
//!
//! - **Threshold rules** (`metric`, `condition`, `for`): each committed reading of a matching
//!   device that carries the metric is compared. `inactive` → `pending` when the condition
//!   holds (or straight to `firing` with `for = 0s`); `pending` → `firing` once it has held
//!   for `for`, checked on every reading and on the timer, so a device that stops sending
//!   while the condition holds still fires; back to `inactive` when a reading no longer
//!   satisfies it (a `firing` one is then *resolved*). A value of the other type (a boolean
//!   against a number, or the reverse) is ignored. A reading older (by its `ts`) than the
//!   one that last changed the state is ignored, so a late upload cannot flip a live state.
//! - **Absence rules** (`absent_for`): a known device (one in device state: restored at
//!   start or committed since) that has committed nothing for `absent_for` fires; its next
//!   committed reading resolves it. Checked on the timer.
//! - Times are server time: `for` is measured from the commit of the first reading that
//!   satisfied the condition, `absent_for` from the commit of the device's last reading.
//!
//! An event's `ts` is when the transition happened; its `since` is when the condition began
//! to hold (firing) or when the alert began firing (resolved); its `value` is the metric
//! value that decided it (`null` for absence).

use std::sync::Arc;

use foldhash::HashMap;
use serde::Serialize;
use wildmatch::WildMatch;

use super::Service;
use crate::config::rules::{Condition, Op, Operand, Rule, RuleKind};
use crate::pipeline::FeedSender;
use crate::reading::{format_ts, MetricValue, Reading};
pub use crate::store::AlertState;
use crate::store::{AlertChange, AlertRow, DeviceLatest};

/// What an alert event announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transition {
    /// `pending` (or `inactive`) → `firing`.
    Firing,
    /// `firing` → `inactive`.
    Resolved,
}

/// One alert event (SPEC §12): `{"type":"alert","rule","device_id","state","value","ts","since"}`.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertEvent {
    /// The rule's name.
    pub rule: Arc<str>,
    /// The device.
    pub device_id: String,
    /// The rule's metric (none for absence rules): for the live stream's `metric` filter.
    pub metric: Option<Arc<str>>,
    /// Fired or resolved.
    pub state: Transition,
    /// The value that decided it; `None` for absence rules.
    pub value: Option<MetricValue>,
    /// When the transition happened (server time, epoch ms).
    pub ts_ms: i64,
    /// Firing: when the condition began to hold. Resolved: when the alert began firing.
    pub since_ms: i64,
}

#[derive(Serialize)]
struct EventJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    rule: &'a str,
    device_id: &'a str,
    state: Transition,
    value: Option<MetricValue>,
    ts: String,
    since: String,
}

impl AlertEvent {
    /// The event's JSON, as every action sends it.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&EventJson {
            kind: "alert",
            rule: &self.rule,
            device_id: &self.device_id,
            state: self.state,
            value: self.value,
            ts: format_ts(self.ts_ms),
            since: format_ts(self.since_ms),
        })
        .unwrap_or_default()
    }
}

/// A change of persisted state that a step asks for (see [`crate::store::AlertChange`]).
pub type Change = AlertChange;

/// One result of evaluation: a change to persist, and the event to announce once the change
/// has applied (with a store shared by replicas, a change another replica made first does not
/// apply, and its event is not announced twice).
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// What to persist.
    pub change: Change,
    /// What to announce, if the change applies (every step the evaluator makes has one; the
    /// changes without an event come from [`Evaluator::take_quiet`]).
    pub event: Option<AlertEvent>,
}

/// A pending or firing alert, as `GET /v1/alerts` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AlertView {
    /// Rule name.
    pub rule: String,
    /// Device id.
    pub device_id: String,
    /// `pending` or `firing`.
    pub state: AlertState,
    /// The latest value that kept it (none for absence rules).
    pub value: Option<MetricValue>,
    /// When the condition began to hold (RFC 3339).
    pub since: String,
    /// When it fired (RFC 3339); absent while pending.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fired: Option<String>,
}

/// A rule ready to evaluate.
struct Compiled {
    /// As configured and parsed.
    rule: Rule,
    /// The name, shared by events.
    name: Arc<str>,
    /// The device glob.
    glob: WildMatch,
    /// The compared metric's name (threshold rules).
    metric: Option<Arc<str>>,
    /// Threshold: index into [`Evaluator::metrics`], the condition and `for` in ms.
    threshold: Option<(u16, Condition, i64)>,
    /// Absence: `absent_for` in ms.
    absent_ms: Option<i64>,
}

/// `Device::state` values.
const INACTIVE: u8 = 0;
/// See [`INACTIVE`].
const PENDING: u8 = 1;
/// See [`INACTIVE`].
const FIRING: u8 = 2;

/// A (rule, device) that is not inactive: what events and `GET /v1/alerts` need.
#[derive(Debug, Clone)]
struct Slot {
    /// Index of the rule.
    rule: u16,
    /// Pending or firing.
    state: AlertState,
    /// When the condition began to hold (server ms).
    since_ms: i64,
    /// When it fired (server ms); 0 while pending.
    fired_ms: i64,
    /// The value that last changed or kept the state (not refreshed while firing).
    value: Option<MetricValue>,
    /// The `ts` of that value, to ignore older readings.
    ts_ms: i64,
}

/// One threshold rule as the inner loop of [`Evaluator::observe`] reads it: everything it
/// needs in 24 contiguous bytes, so that a value that changes nothing costs a comparison.
#[derive(Debug, Clone, Copy)]
struct Check {
    /// The rule's index.
    rule: u16,
    /// Its position in the device's state.
    pos: u16,
    /// The condition.
    cond: Condition,
    /// `for`, in ms.
    hold_ms: i64,
}

/// The rules whose glob matches a device, grouped for evaluation. Shared by every device
/// with the same set (usually all of them).
struct RuleSet {
    /// Per compared metric (index into [`Evaluator::metrics`]), its threshold rules.
    by_metric: Vec<Vec<Check>>,
    /// Per compared metric, the numeric operands of its rules, sorted and without repeats:
    /// two values in the same region between them ([`region`]) satisfy the same rules.
    breaks: Vec<Vec<f64>>,
    /// Absence rules: `(rule, position)`.
    absence: Vec<(u16, u16)>,
    /// Number of positions.
    len: usize,
}

/// What the evaluator knows about one device.
struct Device {
    /// Server time of its last committed reading (absence rules).
    last_seen_ms: i64,
    /// Its rules.
    set: Arc<RuleSet>,
    /// Per position of `set`: [`INACTIVE`], [`PENDING`] or [`FIRING`]. One byte per (device,
    /// matching rule).
    state: Box<[u8]>,
    /// Per compared metric, the [`region`] of the value last evaluated ([`NO_REGION`] when
    /// none): a new value in the same region cannot change any of its rules' states, so on a
    /// device with nothing pending it costs a binary search and no rule at all.
    regions: Box<[u32]>,
    /// Details of the positions that are not inactive, sorted by rule; usually empty.
    slots: Vec<Slot>,
    /// Rules whose state changed without an event (to pending, or from pending back to
    /// inactive) since the last [`Evaluator::take_quiet`]: saved then, from the state then.
    quiet: Vec<u16>,
    /// Whether the device is in [`Evaluator::quiet_devices`].
    listed: bool,
}

impl Device {
    /// Notes a quiet change of `rule`, to be saved at the next [`Evaluator::take_quiet`].
    fn mark_quiet(&mut self, rule: u16) {
        if !self.quiet.contains(&rule) {
            self.quiet.push(rule);
        }
    }

    /// A change of `rule` with an event is saved at once: it supersedes the quiet ones before.
    fn unmark_quiet(&mut self, rule: u16) {
        self.quiet.retain(|r| *r != rule);
    }

    fn slot(&mut self, rule: u16) -> Option<&mut Slot> {
        let i = self.slots.binary_search_by_key(&rule, |s| s.rule).ok()?;
        Some(&mut self.slots[i])
    }

    fn insert(&mut self, slot: Slot) {
        match self.slots.binary_search_by_key(&slot.rule, |s| s.rule) {
            Ok(i) => self.slots[i] = slot,
            Err(i) => self.slots.insert(i, slot),
        }
    }

    fn remove(&mut self, rule: u16) -> Option<Slot> {
        let i = self.slots.binary_search_by_key(&rule, |s| s.rule).ok()?;
        Some(self.slots.remove(i))
    }
}

/// One committed batch for the rule engine: each device of the batch once, with the latest
/// value (by `ts`; of equal ones, the last committed) of each metric some threshold rule
/// compares. Three allocations per batch whatever its devices (the ids back to back, their
/// ends, and a table of values), since batches cross from the commit thread to the rule task
/// thousands of times a second.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    /// Server time of the commit (epoch ms).
    pub commit_ms: i64,
    /// Readings the batch held (for the feed's bound).
    pub readings: usize,
    /// The batch's device ids back to back, in order of first appearance.
    ids: String,
    /// Per device, the end of its id in `ids`.
    ends: Vec<u32>,
    /// Per device, per compared metric (`stride` of them, indexes into
    /// [`Evaluator::metrics`]): the latest value and its reading's `ts`, if the batch has one.
    values: Vec<Option<(MetricValue, i64)>>,
    /// The number of compared metrics.
    stride: usize,
}

impl Committed {
    /// Projects newly stored readings onto what the engine needs: each device once, with the
    /// latest value of each metric in `metrics` (the names threshold rules compare).
    pub fn project(metrics: &[String], stored: &[&Reading], commit_ms: i64) -> Self {
        let mut index: HashMap<&str, usize> =
            HashMap::with_capacity_and_hasher(stored.len().min(1 << 16), Default::default());
        let stride = metrics.len();
        let mut ids = String::new();
        let mut ends: Vec<u32> = Vec::new();
        let mut values: Vec<Option<(MetricValue, i64)>> = Vec::new();
        // Readings mostly carry the same metrics in the same order: the previous reading's
        // names, by position, with their index in `metrics`, spare the search.
        let mut previous: Vec<(&str, Option<usize>)> = Vec::new();
        for r in stored {
            let id = r.device_id.as_str();
            let at = *index.entry(id).or_insert_with(|| {
                ids.push_str(id);
                ends.push(ids.len() as u32);
                values.resize(values.len() + stride, None);
                ends.len() - 1
            });
            if stride == 0 {
                continue;
            }
            let row = &mut values[at * stride..(at + 1) * stride];
            for (k, (name, v)) in r.metrics.iter().enumerate() {
                let m = match previous.get(k) {
                    Some(&(n, m)) if n == name.as_str() => m,
                    _ => {
                        let m = metrics.iter().position(|n| n == name);
                        previous.truncate(k);
                        previous.push((name.as_str(), m));
                        m
                    }
                };
                let Some(m) = m else {
                    continue;
                };
                match &mut row[m] {
                    Some((_, ts)) if *ts > r.ts_ms => {}
                    slot => *slot = Some((*v, r.ts_ms)),
                }
            }
        }
        Self {
            commit_ms,
            readings: stored.len(),
            ids,
            ends,
            values,
            stride,
        }
    }

    /// The batch's devices, in order of first appearance: each id with its values by metric
    /// index (see [`Committed::values`]).
    pub fn devices(&self) -> impl Iterator<Item = (&str, &[Option<(MetricValue, i64)>])> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(&self.ends)
            .enumerate()
            .map(|(i, (start, &end))| {
                (
                    &self.ids[start as usize..end as usize],
                    &self.values[i * self.stride..(i + 1) * self.stride],
                )
            })
    }
}

/// The rules and every (rule, device) state. Owned by the rule task through the
/// [`AlertBoard`]; `GET /v1/alerts` reads [`Evaluator::active`].
///
/// Cost: per device, one byte per matching rule plus the pending and firing details; per
/// batch, one hash lookup per device and one comparison per (value, rule on that metric).
pub struct Evaluator {
    /// In configuration order; a rule's index is its id (at most 65 536 rules).
    rules: Vec<Compiled>,
    /// The distinct metrics of threshold rules.
    metrics: Vec<String>,
    /// Whether any rule is an absence rule (the timer's scan is skipped otherwise).
    has_absence: bool,
    /// Every known device.
    devices: HashMap<String, Device>,
    /// Rule sets already built, by the rules they hold.
    sets: HashMap<Vec<u16>, Arc<RuleSet>>,
    /// Devices with at least one pending or firing rule (the timer looks at pending ones).
    active: HashMap<String, ()>,
    /// Devices with quiet changes not yet taken ([`Device::quiet`]).
    quiet_devices: Vec<String>,
    /// Per rule, how many devices are pending and firing (`sluice_alerts`), kept as states
    /// change.
    tally: Vec<[i64; 2]>,
}

/// Moves one (rule, device) from state `from` to state `to` in the tally.
fn shift(tally: &mut [[i64; 2]], rule: u16, from: u8, to: u8) {
    let t = &mut tally[rule as usize];
    match from {
        PENDING => t[0] -= 1,
        FIRING => t[1] -= 1,
        _ => {}
    }
    match to {
        PENDING => t[0] += 1,
        FIRING => t[1] += 1,
        _ => {}
    }
}

impl Evaluator {
    /// An evaluator of `rules` (already validated), with no state.
    pub fn new(rules: &[Rule]) -> Self {
        let mut metrics: Vec<String> = Vec::new();
        let compiled = rules
            .iter()
            .map(|rule| {
                let (threshold, absent_ms) = match &rule.kind {
                    RuleKind::Threshold {
                        metric,
                        condition,
                        hold_for,
                    } => {
                        let idx = match metrics.iter().position(|m| m == metric) {
                            Some(i) => i,
                            None => {
                                metrics.push(metric.clone());
                                metrics.len() - 1
                            }
                        };
                        (
                            Some((idx as u16, *condition, hold_for.as_millis() as i64)),
                            None,
                        )
                    }
                    RuleKind::Absence { absent_for } => (None, Some(absent_for.as_millis() as i64)),
                };
                Compiled {
                    metric: match &rule.kind {
                        RuleKind::Threshold { metric, .. } => Some(metric.as_str().into()),
                        RuleKind::Absence { .. } => None,
                    },
                    name: rule.name.as_str().into(),
                    glob: WildMatch::new(&rule.devices),
                    rule: rule.clone(),
                    threshold,
                    absent_ms,
                }
            })
            .collect::<Vec<_>>();
        Self {
            has_absence: compiled.iter().any(|c| c.absent_ms.is_some()),
            tally: vec![[0, 0]; compiled.len()],
            rules: compiled,
            metrics,
            devices: HashMap::default(),
            sets: HashMap::default(),
            active: HashMap::default(),
            quiet_devices: Vec::new(),
        }
    }

    /// The rules, as `GET /v1/rules` lists them.
    pub fn rules(&self) -> Vec<Rule> {
        self.rules.iter().map(|c| c.rule.clone()).collect()
    }

    /// The metric names threshold rules compare; [`Committed::devices`]' values index into this.
    pub fn metrics(&self) -> &[String] {
        &self.metrics
    }

    /// The device's entry, created (with its rule set) if it is new.
    fn device(&mut self, id: &str) -> &mut Device {
        if !self.devices.contains_key(id) {
            let dev = new_device(&self.rules, &mut self.sets, self.metrics.len(), id);
            self.devices.insert(id.to_owned(), dev);
        }
        self.devices.get_mut(id).expect("inserted above")
    }

    /// Adds the devices the store knows at start (their `last_seen`), and the persisted
    /// states of (rule, device)s. A row of a rule no longer configured, or of a device its
    /// glob no longer matches, is returned to be cleared.
    pub fn restore(&mut self, devices: &[DeviceLatest], rows: Vec<AlertRow>) -> Vec<Change> {
        for d in devices {
            let dev = self.device(&d.device_id);
            dev.last_seen_ms = dev.last_seen_ms.max(d.last_seen_ms);
        }
        let mut stale = Vec::new();
        for row in rows {
            let rule = self.rules.iter().position(|c| *c.name == *row.rule);
            let Some(rule) = rule.filter(|i| self.rules[*i].glob.matches(&row.device_id)) else {
                stale.push(Change::Clear {
                    rule: row.rule,
                    device_id: row.device_id,
                    was: row.state,
                });
                continue;
            };
            let rule = rule as u16;
            self.device(&row.device_id);
            let Some(dev) = self.devices.get_mut(&row.device_id) else {
                continue;
            };
            if dev.last_seen_ms == i64::MIN {
                dev.last_seen_ms = row.since_ms;
            }
            let Some(pos) = position(&dev.set, rule) else {
                continue;
            };
            let to = match row.state {
                AlertState::Pending => PENDING,
                AlertState::Firing => FIRING,
            };
            shift(&mut self.tally, rule, dev.state[pos], to);
            dev.state[pos] = to;
            dev.insert(Slot {
                rule,
                state: row.state,
                since_ms: row.since_ms,
                fired_ms: row.fired_ms,
                value: row.value,
                ts_ms: row.ts_ms,
            });
            self.active.insert(row.device_id, ());
        }
        stale
    }

    /// Evaluates one committed batch, appending what changed to `out`.
    pub fn observe(&mut self, batch: &Committed, out: &mut Vec<Step>) {
        for (id, values) in batch.devices() {
            // One lookup for a known device; a new one is built, evaluated, then inserted.
            let (changed, listed) = match self.devices.get_mut(id) {
                Some(dev) => observe_device(
                    dev,
                    &self.rules,
                    &mut self.tally,
                    id,
                    values,
                    batch.commit_ms,
                    out,
                ),
                None => {
                    let mut dev = new_device(&self.rules, &mut self.sets, self.metrics.len(), id);
                    let changed = observe_device(
                        &mut dev,
                        &self.rules,
                        &mut self.tally,
                        id,
                        values,
                        batch.commit_ms,
                        out,
                    );
                    self.devices.insert(id.to_owned(), dev);
                    changed
                }
            };
            if listed {
                self.quiet_devices.push(id.to_owned());
            }
            match changed {
                Activity::Began => {
                    self.active.insert(id.to_owned(), ());
                }
                Activity::Ended => {
                    self.active.remove(id);
                }
                Activity::Same => {}
            }
        }
    }

    /// The changes without an event since the last call (to pending, or from pending back to
    /// inactive), one per (rule, device), from the state now: `Set` of the pending row, or
    /// `Clear` of a pending one. A (rule, device) that fired or resolved since had its change
    /// saved with the event and is not repeated. Called at each `alerts.evaluation_interval`
    /// and at shutdown: a value flapping around a threshold costs a mark, not a write.
    pub fn take_quiet(&mut self) -> Vec<Change> {
        let mut out = Vec::new();
        for id in std::mem::take(&mut self.quiet_devices) {
            let Some(dev) = self.devices.get_mut(&id) else {
                continue;
            };
            dev.listed = false;
            for rule in std::mem::take(&mut dev.quiet) {
                let c = &self.rules[rule as usize];
                match dev.slot(rule) {
                    Some(slot) if slot.state == AlertState::Pending => {
                        out.push(Change::Set(row(c, &id, slot)));
                    }
                    Some(_) => {}
                    None => out.push(Change::Clear {
                        rule: c.name.to_string(),
                        device_id: id.clone(),
                        was: AlertState::Pending,
                    }),
                }
            }
        }
        out
    }

    /// Devices whose absence rule would fire at `now_ms`: with a store whose device table
    /// other replicas also update, the caller refreshes their `last_seen` ([`Evaluator::seen`])
    /// before [`Evaluator::tick`], so a device that sends to another replica is not silent.
    pub fn absence_candidates(&self, now_ms: i64) -> Vec<String> {
        if !self.has_absence {
            return Vec::new();
        }
        self.devices
            .iter()
            .filter(|(_, d)| {
                d.set.absence.iter().any(|&(ri, pos)| {
                    d.state[pos as usize] == INACTIVE
                        && self.rules[ri as usize].absent_ms.is_some_and(|after| {
                            d.last_seen_ms != i64::MIN
                                && now_ms.saturating_sub(d.last_seen_ms) >= after
                        })
                })
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Records that `device` was last seen at `last_seen_ms` (another replica's commit).
    pub fn seen(&mut self, device: &str, last_seen_ms: i64) {
        if let Some(d) = self.devices.get_mut(device) {
            d.last_seen_ms = d.last_seen_ms.max(last_seen_ms);
        }
    }

    /// The timer: fires pending threshold rules whose `for` has passed by `now_ms`, and
    /// absence rules of devices silent for their `absent_for`.
    pub fn tick(&mut self, now_ms: i64, out: &mut Vec<Step>) {
        let ids: Vec<String> = self.active.keys().cloned().collect();
        for id in ids {
            let Some(dev) = self.devices.get_mut(&id) else {
                continue;
            };
            let set = dev.set.clone();
            let mut fired = Vec::new();
            for slot in dev.slots.iter_mut() {
                let c = &self.rules[slot.rule as usize];
                if let Some((_, _, hold_ms)) = c.threshold {
                    if slot.state == AlertState::Pending && now_ms - slot.since_ms >= hold_ms {
                        out.push(fire(c, &id, slot, now_ms));
                        fired.push(slot.rule);
                        if let Some(pos) = position(&set, slot.rule) {
                            shift(&mut self.tally, slot.rule, dev.state[pos], FIRING);
                            dev.state[pos] = FIRING;
                        }
                    }
                }
            }
            for rule in fired {
                dev.unmark_quiet(rule);
            }
        }
        if !self.has_absence {
            return;
        }
        for (id, dev) in self.devices.iter_mut() {
            let set = dev.set.clone();
            for &(ri, pos) in &set.absence {
                let c = &self.rules[ri as usize];
                let Some(after) = c.absent_ms else { continue };
                if dev.state[pos as usize] != INACTIVE
                    || dev.last_seen_ms == i64::MIN
                    || now_ms.saturating_sub(dev.last_seen_ms) < after
                {
                    continue;
                }
                let mut slot = Slot {
                    rule: ri,
                    state: AlertState::Pending,
                    since_ms: dev.last_seen_ms,
                    fired_ms: 0,
                    value: None,
                    ts_ms: i64::MIN,
                };
                out.push(fire(c, id, &mut slot, now_ms));
                shift(&mut self.tally, ri, INACTIVE, FIRING);
                dev.state[pos as usize] = FIRING;
                dev.insert(slot);
                self.active.insert(id.clone(), ());
            }
        }
    }

    /// Every pending and firing (rule, device), sorted by rule and device.
    pub fn active(&self) -> Vec<AlertView> {
        let mut out: Vec<AlertView> = self
            .active
            .keys()
            .filter_map(|id| Some((id, self.devices.get(id)?)))
            .flat_map(|(id, d)| {
                d.slots.iter().map(move |s| AlertView {
                    rule: self.rules[s.rule as usize].name.to_string(),
                    device_id: id.clone(),
                    state: s.state,
                    value: s.value,
                    since: format_ts(s.since_ms),
                    fired: (s.state == AlertState::Firing).then(|| format_ts(s.fired_ms)),
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.rule, &a.device_id).cmp(&(&b.rule, &b.device_id)));
        out
    }

    /// `(rule, pending, firing)` counts, for `sluice_alerts`.
    pub fn counts(&self) -> Vec<(Arc<str>, i64, i64)> {
        self.rules
            .iter()
            .zip(&self.tally)
            .map(|(c, t)| (c.name.clone(), t[0], t[1]))
            .collect()
    }
}

/// A new device's entry: the rules whose glob matches `id`, as a [`RuleSet`] shared with every
/// device that has the same ones (built once, kept in `sets`), and nothing pending or firing.
fn new_device(
    rules: &[Compiled],
    sets: &mut HashMap<Vec<u16>, Arc<RuleSet>>,
    n_metrics: usize,
    id: &str,
) -> Device {
    let matching: Vec<u16> = rules
        .iter()
        .enumerate()
        .filter(|(_, c)| c.glob.matches(id))
        .map(|(i, _)| i as u16)
        .collect();
    let set = sets
        .entry(matching.clone())
        .or_insert_with(|| {
            let mut by_metric = vec![Vec::new(); n_metrics];
            let mut absence = Vec::new();
            for (pos, &ri) in matching.iter().enumerate() {
                let c = &rules[ri as usize];
                if let Some((m, cond, hold_ms)) = c.threshold {
                    by_metric[m as usize].push(Check {
                        rule: ri,
                        pos: pos as u16,
                        cond,
                        hold_ms,
                    });
                } else {
                    absence.push((ri, pos as u16));
                }
            }
            let breaks = by_metric
                .iter()
                .map(|checks: &Vec<Check>| {
                    let mut b: Vec<f64> = checks
                        .iter()
                        .filter_map(|c| match c.cond.operand {
                            Operand::Number(n) => Some(n),
                            Operand::Bool(_) => None,
                        })
                        .collect();
                    b.sort_by(f64::total_cmp);
                    b.dedup();
                    b
                })
                .collect();
            Arc::new(RuleSet {
                breaks,
                by_metric,
                absence,
                len: matching.len(),
            })
        })
        .clone();
    Device {
        last_seen_ms: i64::MIN,
        state: vec![INACTIVE; set.len].into_boxed_slice(),
        regions: vec![NO_REGION; n_metrics].into_boxed_slice(),
        set,
        slots: Vec::new(),
        quiet: Vec::new(),
        listed: false,
    }
}

/// Whether a device's evaluation made it active (something pending or firing) or inactive.
enum Activity {
    Began,
    Ended,
    Same,
}

/// Evaluates one device's part of a batch committed at `now` (see [`Evaluator::observe`]).
fn observe_device(
    dev: &mut Device,
    rules: &[Compiled],
    tally: &mut [[i64; 2]],
    device_id: &str,
    values: &[Option<(MetricValue, i64)>],
    now: i64,
    out: &mut Vec<Step>,
) -> (Activity, bool) {
    dev.last_seen_ms = dev.last_seen_ms.max(now);
    let before = dev.slots.len();
    let set = dev.set.clone();
    // Any reading ends a silence.
    for &(ri, pos) in &set.absence {
        if dev.state[pos as usize] != INACTIVE {
            shift(tally, ri, dev.state[pos as usize], INACTIVE);
            dev.state[pos as usize] = INACTIVE;
            if let Some(slot) = dev.remove(ri) {
                out.push(resolve(&rules[ri as usize], device_id, &slot, None, now));
            }
        }
    }
    // A pending rule takes every value: it shows the latest, and fires on a reading.
    let pending = dev.slots.iter().any(|s| s.state == AlertState::Pending);
    for (m, slot) in values.iter().enumerate() {
        let Some((value, ts)) = *slot else {
            continue;
        };
        let region = region(&set.breaks[m], value);
        // In the region of the last evaluated value, every rule holds or not as it did then,
        // so no inactive or firing rule can change: only pending ones (which take the value,
        // and may fire) have anything to do.
        let same = dev.regions[m] == region;
        if same && !pending {
            continue;
        }
        dev.regions[m] = region;
        let number = as_number(value);
        for check in &set.by_metric[m] {
            if same && dev.state[check.pos as usize] != PENDING {
                continue;
            }
            let holds = match (check.cond.operand, number) {
                (Operand::Number(n), Some(x)) => compare(check.cond.op, x, n),
                _ => match test(&check.cond, value) {
                    Some(holds) => holds,
                    None => continue,
                },
            };
            let pos = check.pos as usize;
            let state = dev.state[pos];
            if (state == INACTIVE && !holds) || (state == FIRING && holds) {
                continue;
            }
            let (ri, hold_ms) = (check.rule, check.hold_ms);
            let c = &rules[ri as usize];
            match (state, holds) {
                (INACTIVE, true) => {
                    let mut slot = Slot {
                        rule: ri,
                        state: AlertState::Pending,
                        since_ms: now,
                        fired_ms: 0,
                        value: Some(value),
                        ts_ms: ts,
                    };
                    if hold_ms <= 0 {
                        out.push(fire(c, device_id, &mut slot, now));
                        dev.unmark_quiet(ri);
                        shift(tally, ri, INACTIVE, FIRING);
                        dev.state[pos] = FIRING;
                    } else {
                        dev.mark_quiet(ri);
                        shift(tally, ri, INACTIVE, PENDING);
                        dev.state[pos] = PENDING;
                    }
                    dev.insert(slot);
                }
                (_, true) => {
                    // Pending, and it still holds.
                    let Some(slot) = dev.slot(ri) else { continue };
                    if ts < slot.ts_ms {
                        // An older value: the next one is evaluated in full.
                        dev.regions[m] = NO_REGION;
                        continue;
                    }
                    slot.value = Some(value);
                    slot.ts_ms = ts;
                    if now - slot.since_ms >= hold_ms {
                        out.push(fire(c, device_id, slot, now));
                        dev.unmark_quiet(ri);
                        shift(tally, ri, PENDING, FIRING);
                        dev.state[pos] = FIRING;
                    }
                }
                (_, false) => {
                    if dev.slot(ri).is_some_and(|s| ts < s.ts_ms) {
                        dev.regions[m] = NO_REGION;
                        continue;
                    }
                    shift(tally, ri, state, INACTIVE);
                    dev.state[pos] = INACTIVE;
                    let Some(slot) = dev.remove(ri) else { continue };
                    match slot.state {
                        AlertState::Firing => {
                            out.push(resolve(c, device_id, &slot, Some(value), now));
                            dev.unmark_quiet(ri);
                        }
                        AlertState::Pending => dev.mark_quiet(ri),
                    }
                }
            }
        }
    }
    let after = dev.slots.len();
    let activity = if after == 0 && before > 0 {
        Activity::Ended
    } else if after > 0 && before == 0 {
        Activity::Began
    } else {
        Activity::Same
    };
    // Newly with quiet changes: the caller lists the device for the next take.
    let listed = !dev.quiet.is_empty() && !dev.listed;
    dev.listed |= listed;
    (activity, listed)
}

/// The position of `rule` in a device's state, if the device's set holds it.
fn position(set: &RuleSet, rule: u16) -> Option<usize> {
    set.by_metric
        .iter()
        .flatten()
        .map(|c| (c.rule, c.pos))
        .chain(set.absence.iter().copied())
        .find(|(r, _)| *r == rule)
        .map(|(_, pos)| pos as usize)
}

/// The rule engine's state, shared by its task (which evaluates) and `GET /v1/alerts` and
/// `GET /v1/rules` (which read). The lock is held for one batch's evaluation at most.
pub struct AlertBoard {
    /// The loaded rules, in configuration order.
    rules: Vec<Rule>,
    /// Every (rule, device) state.
    evaluator: std::sync::Mutex<Evaluator>,
}

impl AlertBoard {
    /// A board over `rules` (already validated), with nothing pending or firing.
    pub fn new(rules: &[Rule]) -> Self {
        Self {
            rules: rules.to_vec(),
            evaluator: std::sync::Mutex::new(Evaluator::new(rules)),
        }
    }

    /// The loaded rules.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Every pending and firing alert, sorted by rule and device.
    pub fn active(&self) -> Vec<AlertView> {
        self.with(|e| e.active())
    }

    /// Runs `f` on the evaluator, under its lock.
    pub fn with<R>(&self, f: impl FnOnce(&mut Evaluator) -> R) -> R {
        let mut ev = self.evaluator.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut ev)
    }
}

/// [`Device::regions`] before any value.
const NO_REGION: u32 = u32::MAX;

/// Where `value` lies among the sorted operands `breaks`: `2 × (operands below it)`, plus 1
/// when it equals the next one. Two values with the same region compare alike with every
/// operand under every operator. Booleans have regions of their own.
#[inline]
fn region(breaks: &[f64], value: MetricValue) -> u32 {
    match as_number(value) {
        Some(x) => {
            let below = breaks.partition_point(|b| *b < x);
            let equal = breaks.get(below).is_some_and(|b| *b == x);
            (2 * below + usize::from(equal)) as u32
        }
        None => NO_REGION - 1 - u32::from(value == MetricValue::Bool(true)),
    }
}

/// A numeric value as f64; `None` for a boolean.
#[inline]
fn as_number(v: MetricValue) -> Option<f64> {
    match v {
        MetricValue::Int(i) => Some(i as f64),
        MetricValue::UInt(u) => Some(u as f64),
        MetricValue::Float(f) => Some(f),
        MetricValue::Bool(_) => None,
    }
}

/// `x <op> n`.
#[inline]
fn compare(op: Op, x: f64, n: f64) -> bool {
    match op {
        Op::Gt => x > n,
        Op::Ge => x >= n,
        Op::Lt => x < n,
        Op::Le => x <= n,
        Op::Eq => x == n,
        Op::Ne => x != n,
    }
}

/// Whether `value` satisfies `cond`; `None` when they are of different kinds.
fn test(cond: &Condition, value: MetricValue) -> Option<bool> {
    match (cond.operand, value) {
        (Operand::Bool(b), MetricValue::Bool(v)) => Some(match cond.op {
            Op::Eq => v == b,
            Op::Ne => v != b,
            _ => return None,
        }),
        (Operand::Bool(_), _) | (Operand::Number(_), MetricValue::Bool(_)) => None,
        (Operand::Number(n), v) => Some(compare(cond.op, as_number(v)?, n)),
    }
}

/// The stored form of a slot.
fn row(c: &Compiled, device: &str, s: &Slot) -> AlertRow {
    AlertRow {
        rule: c.name.to_string(),
        device_id: device.to_owned(),
        state: s.state,
        since_ms: s.since_ms,
        fired_ms: s.fired_ms,
        value: s.value,
        ts_ms: s.ts_ms,
    }
}

/// Moves `slot` to firing at `now`.
fn fire(c: &Compiled, device: &str, slot: &mut Slot, now: i64) -> Step {
    slot.state = AlertState::Firing;
    slot.fired_ms = now;
    Step {
        change: Change::Set(row(c, device, slot)),
        event: Some(AlertEvent {
            rule: c.name.clone(),
            device_id: device.to_owned(),
            metric: c.metric.clone(),
            state: Transition::Firing,
            value: slot.value,
            ts_ms: now,
            since_ms: slot.since_ms,
        }),
    }
}

/// A firing `slot`, removed, resolved by `value` at `now`.
fn resolve(c: &Compiled, device: &str, slot: &Slot, value: Option<MetricValue>, now: i64) -> Step {
    Step {
        change: Change::Clear {
            rule: c.name.to_string(),
            device_id: device.to_owned(),
            was: slot.state,
        },
        event: (slot.state == AlertState::Firing).then(|| AlertEvent {
            rule: c.name.clone(),
            device_id: device.to_owned(),
            metric: c.metric.clone(),
            state: Transition::Resolved,
            value,
            ts_ms: now,
            since_ms: slot.fired_ms,
        }),
    }
}

/// The processing service that hands each commit's new readings to the rule engine: it
/// projects them ([`Evaluator::observe_reading`]) and offers them to the bounded feed, whose
/// full-policy is `drop_newest` (see `pipeline`): it never waits. It also seeds the engine
/// with the devices the store restores at open.
pub struct RulesFeed {
    /// The compared metric names.
    metrics: Vec<String>,
    /// Into the feed; counts what it cannot take.
    tx: FeedSender<Committed>,
    /// The devices of each store open, for the engine's absence rules.
    restored: std::sync::Mutex<Option<Vec<DeviceLatest>>>,
}

impl RulesFeed {
    /// A feed of readings carrying `metrics` (every reading is sent, for absence rules).
    pub fn new(metrics: Vec<String>, tx: FeedSender<Committed>) -> Self {
        Self {
            metrics,
            tx,
            restored: std::sync::Mutex::new(None),
        }
    }

    /// The devices of the latest store open, once.
    pub fn take_restored(&self) -> Option<Vec<DeviceLatest>> {
        self.restored
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

impl Service for RulesFeed {
    fn name(&self) -> &'static str {
        "rules"
    }

    fn after_commit(&self, stored: &[&Reading], commit_ms: i64) {
        if stored.is_empty() {
            return;
        }
        if !self.tx.has_room(stored.len()) {
            self.tx.skip(stored.len());
            return;
        }
        let batch = Committed::project(&self.metrics, stored, commit_ms);
        let n = batch.readings;
        self.tx.offer(batch, n);
    }

    fn restore(&self, devices: &[DeviceLatest]) {
        *self.restored.lock().unwrap_or_else(|e| e.into_inner()) = Some(devices.to_vec());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::rules::RuleSettings;
    use std::time::Duration;

    fn threshold(name: &str, glob: &str, cond: &str, hold: u64) -> Rule {
        RuleSettings {
            name: name.into(),
            devices: glob.into(),
            metric: Some("t".into()),
            condition: Some(cond.into()),
            hold_for: Duration::from_millis(hold),
            absent_for: None,
        }
        .parse()
        .unwrap()
    }

    fn absence(name: &str, after: u64) -> Rule {
        RuleSettings {
            name: name.into(),
            devices: "*".into(),
            metric: None,
            condition: None,
            hold_for: Duration::ZERO,
            absent_for: Some(Duration::from_millis(after)),
        }
        .parse()
        .unwrap()
    }

    fn batch(commit_ms: i64, items: &[(&str, i64, MetricValue)]) -> Committed {
        let readings: Vec<Reading> = items
            .iter()
            .map(|(d, ts, v)| Reading {
                device_id: crate::reading::DeviceId::parse(d).unwrap(),
                ts_ms: *ts,
                seq: None,
                metrics: vec![("t".into(), *v)],
                tags: vec![],
            })
            .collect();
        Committed::project(
            &["t".to_string()],
            &readings.iter().collect::<Vec<_>>(),
            commit_ms,
        )
    }

    /// The region shortcut (a value in the region of the last one skips every rule that is
    /// not pending) changes nothing: an evaluator that forgets every region before each batch,
    /// and so evaluates every rule on every value, takes exactly the same steps, over noisy
    /// values around several thresholds with and without `for`, booleans, late readings and
    /// timer ticks.
    #[test]
    fn skipping_rules_whose_region_is_unchanged_takes_the_same_steps() {
        let rules = vec![
            threshold("hot", "*", "> 20", 0),
            threshold("hot-for", "d-*", ">= 21", 300),
            threshold("cold", "*", "< 10", 200),
            threshold("exact", "*", "== 15", 0),
            threshold("flag", "*", "== true", 100),
            absence("quiet", 1_000),
        ];
        let mut fast = Evaluator::new(&rules);
        let mut full = Evaluator::new(&rules);
        let mut rnd = crate::test_rng::xorshift(7);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut total = 0;
        for i in 0..2_000i64 {
            let now = i * 50;
            let items: Vec<(String, i64, MetricValue)> = (0..1 + rnd(6))
                .map(|_| {
                    let device = format!("{}-{}", ["d", "e"][rnd(2) as usize], rnd(5));
                    let ts = now - rnd(3) as i64 * 120; // some late
                    let v = match rnd(10) {
                        0 => MetricValue::Bool(rnd(2) == 0),
                        1 => MetricValue::Int(15),
                        _ => MetricValue::Float(5.0 + rnd(200) as f64 / 10.0),
                    };
                    (device, ts, v)
                })
                .collect();
            let refs: Vec<(&str, i64, MetricValue)> =
                items.iter().map(|(d, t, v)| (d.as_str(), *t, *v)).collect();
            let committed = batch(now, &refs);
            for dev in full.devices.values_mut() {
                dev.regions.fill(NO_REGION);
            }
            fast.observe(&committed, &mut a);
            full.observe(&committed, &mut b);
            if i % 7 == 0 {
                fast.tick(now + 25, &mut a);
                full.tick(now + 25, &mut b);
                let quiet = |ev: &mut Evaluator| {
                    let mut v: Vec<String> =
                        ev.take_quiet().iter().map(|c| format!("{c:?}")).collect();
                    v.sort();
                    v
                };
                let (qa, qb) = (quiet(&mut fast), quiet(&mut full));
                assert_eq!(qa, qb, "quiet changes at batch {i}");
                total += qa.len();
            }
            // The timer visits devices in hash order, which differs between two maps.
            let sorted = |steps: &[Step]| {
                let mut v: Vec<String> = steps.iter().map(|s| format!("{s:?}")).collect();
                v.sort();
                v
            };
            assert_eq!(sorted(&a), sorted(&b), "batch {i}");
            total += a.len();
            a.clear();
            b.clear();
        }
        assert!(
            total > 500,
            "only {total} steps: the input does not exercise the rules"
        );
    }

    fn events(steps: &[Step]) -> Vec<(String, Transition)> {
        steps
            .iter()
            .filter_map(|s| s.event.as_ref())
            .map(|e| (e.device_id.clone(), e.state))
            .collect()
    }

    #[test]
    fn threshold_with_for_goes_pending_then_fires_then_resolves_once() {
        let mut ev = Evaluator::new(&[threshold("hot", "g-*", "> 30", 2000)]);
        let mut out = Vec::new();
        ev.observe(
            &batch(1000, &[("g-1", 1, MetricValue::Float(31.0))]),
            &mut out,
        );
        assert!(events(&out).is_empty());
        assert_eq!(ev.active()[0].state, AlertState::Pending);
        // Pending is a quiet change: no step, saved when the timer takes it.
        assert!(out.is_empty(), "{out:?}");
        let quiet = ev.take_quiet();
        assert!(
            matches!(quiet[..], [Change::Set(ref r)] if r.state == AlertState::Pending),
            "{quiet:?}"
        );
        assert!(ev.take_quiet().is_empty(), "taken once");
        ev.observe(&batch(2000, &[("g-1", 2, MetricValue::Int(35))]), &mut out);
        ev.tick(2999, &mut out);
        assert!(out.is_empty(), "not before `for`: {out:?}");
        ev.tick(3000, &mut out);
        assert_eq!(events(&out), [("g-1".into(), Transition::Firing)]);
        let e = out[0].event.clone().unwrap();
        assert_eq!(
            (e.since_ms, e.ts_ms, e.value),
            (1000, 3000, Some(MetricValue::Int(35)))
        );
        assert!(e.to_json().starts_with("{\"type\":\"alert\",\"rule\":\"hot\",\"device_id\":\"g-1\",\"state\":\"firing\",\"value\":35,"));
        out.clear();
        ev.observe(&batch(4000, &[("g-1", 3, MetricValue::Int(40))]), &mut out);
        ev.tick(5000, &mut out);
        assert!(out.is_empty(), "firing stays firing without a new event");
        // An older reading does not resolve it.
        ev.observe(&batch(5000, &[("g-1", 1, MetricValue::Int(0))]), &mut out);
        assert!(out.is_empty());
        ev.observe(
            &batch(
                6000,
                &[
                    ("g-1", 9, MetricValue::Int(20)),
                    ("g-1", 10, MetricValue::Int(10)),
                ],
            ),
            &mut out,
        );
        assert_eq!(events(&out), [("g-1".into(), Transition::Resolved)]);
        assert_eq!(out[0].event.as_ref().unwrap().since_ms, 3000);
        assert!(ev.active().is_empty());
        // Other devices and other types are ignored.
        out.clear();
        ev.observe(
            &batch(
                7000,
                &[
                    ("x-1", 1, MetricValue::Int(99)),
                    ("g-2", 1, MetricValue::Bool(true)),
                ],
            ),
            &mut out,
        );
        assert!(out.is_empty());
        assert_eq!(ev.counts()[0], ("hot".into(), 0, 0));
    }

    #[test]
    fn regions_split_values_exactly_at_the_operands() {
        let breaks = [10.0, 20.0];
        let r = |v: f64| region(&breaks, MetricValue::Float(v));
        assert_eq!(
            [r(5.0), r(10.0), r(15.0), r(20.0), r(25.0)],
            [0, 1, 2, 3, 4]
        );
        assert_eq!(r(11.0), r(19.5));
        assert_eq!(region(&breaks, MetricValue::Int(10)), 1);
        assert_ne!(
            region(&breaks, MetricValue::Bool(true)),
            region(&breaks, MetricValue::Bool(false))
        );
        assert_ne!(region(&breaks, MetricValue::Bool(false)), NO_REGION);
    }

    #[test]
    fn pending_that_stops_holding_is_cleared_without_an_event() {
        let mut ev = Evaluator::new(&[threshold("hot", "*", ">= 30", 1000)]);
        let mut out = Vec::new();
        ev.observe(&batch(0, &[("d", 1, MetricValue::Int(30))]), &mut out);
        // Saved while pending...
        assert!(matches!(ev.take_quiet()[..], [Change::Set(_)]));
        ev.observe(&batch(500, &[("d", 2, MetricValue::Int(29))]), &mut out);
        ev.tick(5000, &mut out);
        assert!(out.is_empty(), "no event: {out:?}");
        // ...then cleared, once, however often it flapped in between.
        for (i, v) in [31, 29, 30, 28].into_iter().enumerate() {
            ev.observe(
                &batch(600 + i as i64, &[("d", 3 + i as i64, MetricValue::Int(v))]),
                &mut out,
            );
        }
        let quiet = ev.take_quiet();
        assert!(
            matches!(
                quiet[..],
                [Change::Clear {
                    was: AlertState::Pending,
                    ..
                }]
            ),
            "{quiet:?}"
        );
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn zero_for_fires_at_once_and_booleans_compare() {
        let mut ev = Evaluator::new(&[threshold("open", "*", "== true", 0)]);
        let mut out = Vec::new();
        ev.observe(
            &batch(
                5,
                &[
                    ("d", 1, MetricValue::Bool(true)),
                    ("e", 1, MetricValue::Float(1.0)),
                ],
            ),
            &mut out,
        );
        assert_eq!(events(&out), [("d".into(), Transition::Firing)]);
        assert_eq!(ev.counts()[0].2, 1);
    }

    #[test]
    fn absence_fires_on_the_timer_and_resolves_on_a_reading() {
        let mut ev = Evaluator::new(&[absence("silent", 1000), threshold("hot", "*", "> 1", 0)]);
        let mut out = Vec::new();
        ev.restore(
            &[DeviceLatest {
                device_id: "old".into(),
                last_seen_ms: 100,
                last_ts_ms: 0,
                metrics: vec![],
            }],
            vec![],
        );
        ev.observe(&batch(500, &[("new", 1, MetricValue::Int(0))]), &mut out);
        assert_eq!(ev.absence_candidates(1200), ["old".to_string()]);
        ev.seen("old", 300);
        ev.tick(1200, &mut out);
        assert!(out.is_empty());
        ev.tick(1300, &mut out);
        assert_eq!(events(&out), [("old".into(), Transition::Firing)]);
        assert_eq!(out[0].event.as_ref().unwrap().since_ms, 300);
        out.clear();
        ev.tick(1400, &mut out);
        assert!(out.is_empty(), "fires once");
        ev.observe(&batch(1500, &[("old", 1, MetricValue::Int(0))]), &mut out);
        assert_eq!(events(&out), [("old".into(), Transition::Resolved)]);
        out.clear();
        ev.tick(1500, &mut out);
        assert_eq!(events(&out), [("new".into(), Transition::Firing)]);
    }

    #[test]
    fn restored_states_are_kept_and_stale_ones_cleared() {
        let rules = [threshold("hot", "g-*", "> 30", 1000)];
        let mut ev = Evaluator::new(&rules);
        let stored = |rule: &str, device: &str, state| AlertRow {
            rule: rule.into(),
            device_id: device.into(),
            state,
            since_ms: 10,
            fired_ms: if state == AlertState::Firing { 20 } else { 0 },
            value: Some(MetricValue::Int(31)),
            ts_ms: 5,
        };
        let stale = ev.restore(
            &[],
            vec![
                stored("hot", "g-1", AlertState::Firing),
                stored("hot", "g-2", AlertState::Pending),
                stored("gone", "g-1", AlertState::Firing),
                stored("hot", "other", AlertState::Firing),
            ],
        );
        assert_eq!(stale.len(), 2);
        let mut out = Vec::new();
        // A firing alert is not announced again; a pending one fires on time.
        ev.observe(&batch(2000, &[("g-1", 6, MetricValue::Int(35))]), &mut out);
        assert!(out.is_empty());
        ev.tick(2000, &mut out);
        assert_eq!(events(&out), [("g-2".into(), Transition::Firing)]);
        assert_eq!(ev.counts()[0], ("hot".into(), 0, 2));
    }
}
