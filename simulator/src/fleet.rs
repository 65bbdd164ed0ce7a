//! The simulated fleet: **devices** → transports → Sluice.
//!
//! Each [`Device`] has a stable id (`<prefix>-<n>`), its own `seq` counter and its own random
//! generator, seeded from the run seed and the device number only. The same `--seed` therefore
//! gives every device the same noise, door events and faults, whichever task or connection
//! happens to drive it.
//!
//! Two profiles make the signals look like a real fleet:
//! - **sensor**: `temperature` (a daily sine peaking mid-afternoon, plus noise), `humidity`
//!   (falls as the temperature rises), `battery` (drains, then is swapped at 5 %) and
//!   `door_open` (a two-state Markov chain: rarely opens, closes soon after);
//! - **tracker**: `lat`/`lon` moving along a wandering heading at a wandering speed, `speed`,
//!   `heading` and `battery`.
//!
//! `--metrics N` cuts the profile's list to N, or pads it with `aux_<k>` random walks.
//!
//! A device makes a [`Reading`] (or an injected [`Fault`]) with [`Device::next`]; the encoders
//! of [`crate::encode`] turn it into the bytes of the chosen `--format`.

use std::sync::OnceLock;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::faults::Fault;

/// Milliseconds in a day, for the daily temperature cycle.
const DAY_MS: i64 = 86_400_000;
/// Metres per degree of latitude.
const M_PER_DEG: f64 = 111_320.0;
/// Longest gap between two readings that the signals integrate over (a device asleep for a day
/// does not drain its battery to zero in one step).
const MAX_STEP_S: f64 = 3600.0;

/// Which kinds of devices make up the fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FleetProfile {
    /// Four sensors for every tracker.
    Mixed,
    /// Environmental sensors only.
    Sensor,
    /// GPS trackers only.
    Tracker,
}

/// Everything needed to build the same fleet twice.
#[derive(Clone, Debug)]
pub struct FleetSpec {
    /// Device ids are `<prefix>-<n>`.
    pub prefix: String,
    /// Number of devices.
    pub devices: u32,
    /// Sensors, trackers or both.
    pub profile: FleetProfile,
    /// Metrics per reading (1 to 256).
    pub metrics: usize,
    /// The run seed.
    pub seed: u64,
    /// First `seq` of every device.
    pub seq_start: u64,
    /// Share of readings replaced by a malformed one (`--bad-ratio`).
    pub bad_ratio: f64,
    /// Keep each device's readings at least 1 ms apart (SenML groups the records of one device
    /// and time into one reading).
    pub distinct_ts: bool,
}

impl FleetSpec {
    /// Builds every device.
    pub fn build(&self) -> Vec<Device> {
        (0..self.devices).map(|n| Device::new(self, n)).collect()
    }
}

/// The id of device `n`.
pub fn device_id(prefix: &str, n: u32) -> String {
    format!("{prefix}-{n}")
}

/// Whether device `n` of a `profile` fleet is a tracker.
fn is_tracker(profile: FleetProfile, n: u32) -> bool {
    match profile {
        FleetProfile::Sensor => false,
        FleetProfile::Tracker => true,
        FleetProfile::Mixed => n % 5 == 4,
    }
}

/// The metric names of device `n`'s readings, in the order they are written.
pub fn metric_names(profile: FleetProfile, n: u32, metrics: usize) -> Vec<&'static str> {
    let own = if is_tracker(profile, n) {
        TRACKER_METRICS
    } else {
        SENSOR_METRICS
    };
    let cut = own.len().min(metrics);
    let mut names = own[..cut].to_vec();
    names.extend((0..metrics.saturating_sub(own.len())).map(aux_name));
    names
}

/// `aux_<k + 1>`, for the padding metrics (at most 256 per reading).
fn aux_name(k: usize) -> &'static str {
    static NAMES: OnceLock<Vec<String>> = OnceLock::new();
    NAMES.get_or_init(|| (1..=256).map(|i| format!("aux_{i}")).collect())[k].as_str()
}

/// SplitMix64: turns (seed, device number) into well-spread, independent seeds.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What one reading the simulator wrote is, so that its answer can be checked.
#[derive(Clone, Debug)]
pub struct Item {
    /// Index of the device in the fleet.
    pub device: u32,
    /// The `seq` of a valid reading; `None` for an injected fault.
    pub seq: Option<u64>,
    /// The malformation, when this reading is meant to be rejected.
    pub fault: Option<Fault>,
}

/// One simulated device.
#[derive(Debug)]
pub struct Device {
    /// Position in the fleet (`n` in the id).
    pub index: u32,
    /// `<prefix>-<n>`.
    pub id: String,
    /// The `seq` the next valid reading gets.
    next_seq: u64,
    /// This device's own generator: noise, events and faults.
    rng: SmallRng,
    /// Its signal state.
    signals: Signals,
    /// Extra random walks when `--metrics` asks for more than the profile has.
    aux: Vec<f64>,
    /// Metrics per reading.
    metrics: usize,
    /// `ts` of the previous reading, to integrate drains and movement.
    last_ts: Option<i64>,
    /// Share of readings replaced by a fault.
    bad_ratio: f64,
    /// Keep readings at least 1 ms apart.
    distinct_ts: bool,
}

#[derive(Debug)]
enum Signals {
    Sensor(Sensor),
    Tracker(Tracker),
}

#[derive(Debug)]
struct Sensor {
    /// Daily mean temperature, °C.
    base_temp: f64,
    /// Half the day/night swing, °C.
    amplitude: f64,
    /// Relative humidity at the daily mean temperature, %.
    base_humidity: f64,
    /// %.
    battery: f64,
    /// Battery drain, % per second.
    drain: f64,
    /// The door's current state.
    door_open: bool,
}

#[derive(Debug)]
struct Tracker {
    lat: f64,
    lon: f64,
    /// m/s.
    speed: f64,
    /// Radians, clockwise from north.
    heading: f64,
    /// %.
    battery: f64,
    /// % per second.
    drain: f64,
}

/// One reading's worth of signal values, before they are cut to `--metrics`.
struct Values {
    names: &'static [&'static str],
    values: [Value; 6],
}

/// A metric value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    /// A finite number.
    Num(f64),
    /// A boolean.
    Bool(bool),
}

/// One valid reading, as the device generated it; [`crate::encode`] writes it in a format.
#[derive(Debug)]
pub struct Reading<'a> {
    /// The device's id.
    pub device_id: &'a str,
    /// Its `seq`.
    pub seq: u64,
    /// Its time, Unix epoch milliseconds.
    pub ts_ms: i64,
    names: &'static [&'static str],
    values: [Value; 6],
    /// How many of `names` are used.
    own: usize,
    aux: &'a [f64],
}

impl Reading<'_> {
    /// `(name, value)` of every metric, in order.
    pub fn metrics(&self) -> impl Iterator<Item = (&'static str, Value)> + '_ {
        let own = self.names[..self.own].iter().copied().zip(self.values);
        let aux = self
            .aux
            .iter()
            .enumerate()
            .map(|(k, a)| (aux_name(k), Value::Num(round(*a, 3))));
        own.chain(aux)
    }

    /// Number of metrics.
    pub fn metric_count(&self) -> usize {
        self.own + self.aux.len()
    }
}

/// What a device sends next: a valid reading or an injected fault.
#[derive(Debug)]
pub enum Next<'a> {
    /// A valid reading.
    Reading(Reading<'a>),
    /// A malformed reading for `device_id` at `ts_ms` (`--bad-ratio`).
    Fault {
        /// The kind.
        fault: Fault,
        /// The device's id.
        device_id: &'a str,
        /// The time, epoch ms.
        ts_ms: i64,
    },
}

const SENSOR_METRICS: &[&str] = &["temperature", "humidity", "battery", "door_open"];
const TRACKER_METRICS: &[&str] = &["lat", "lon", "speed", "heading", "battery"];

fn round(x: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (x * f).round() / f
}

/// A standard normal sample (Box–Muller), from two uniforms.
fn normal(rng: &mut SmallRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

impl Device {
    /// Device `n` of the fleet described by `spec`.
    pub fn new(spec: &FleetSpec, n: u32) -> Self {
        let mut rng = SmallRng::seed_from_u64(mix(spec.seed ^ mix(u64::from(n))));
        let signals = if is_tracker(spec.profile, n) {
            Signals::Tracker(Tracker {
                lat: rng.random_range(40.0..60.0),
                lon: rng.random_range(-10.0..30.0),
                speed: rng.random_range(0.0..20.0),
                heading: rng.random_range(0.0..std::f64::consts::TAU),
                battery: rng.random_range(60.0..100.0),
                drain: rng.random_range(0.0005..0.005),
            })
        } else {
            Signals::Sensor(Sensor {
                base_temp: rng.random_range(16.0..26.0),
                amplitude: rng.random_range(2.0..6.0),
                base_humidity: rng.random_range(35.0..60.0),
                battery: rng.random_range(60.0..100.0),
                drain: rng.random_range(0.0001..0.001),
                door_open: false,
            })
        };
        let own = match &signals {
            Signals::Sensor(_) => SENSOR_METRICS.len(),
            Signals::Tracker(_) => TRACKER_METRICS.len(),
        };
        let aux = (0..spec.metrics.saturating_sub(own))
            .map(|_| rng.random_range(0.0..100.0))
            .collect();
        Self {
            index: n,
            id: device_id(&spec.prefix, n),
            next_seq: spec.seq_start,
            rng,
            signals,
            aux,
            metrics: spec.metrics,
            last_ts: None,
            bad_ratio: spec.bad_ratio,
            distinct_ts: spec.distinct_ts,
        }
    }

    /// Advances the signals to `ts_ms`.
    fn step(&mut self, ts_ms: i64) -> Values {
        let dt = match self.last_ts {
            Some(prev) => ((ts_ms - prev) as f64 / 1000.0).clamp(0.0, MAX_STEP_S),
            None => 0.0,
        };
        self.last_ts = Some(ts_ms);
        for a in &mut self.aux {
            *a = (*a + normal(&mut self.rng)).clamp(-1e6, 1e6);
        }
        let rng = &mut self.rng;
        match &mut self.signals {
            Signals::Sensor(s) => {
                let day = ts_ms.rem_euclid(DAY_MS) as f64 / DAY_MS as f64;
                // Peaks at 15:00 UTC, lowest at 03:00.
                let cycle = (std::f64::consts::TAU * (day - 0.375)).sin();
                let temp =
                    (s.base_temp + s.amplitude * cycle + 0.15 * normal(rng)).clamp(-40.0, 85.0);
                let humidity = (s.base_humidity - 1.8 * (temp - s.base_temp) + 0.5 * normal(rng))
                    .clamp(0.0, 100.0);
                s.battery -= s.drain * dt;
                if s.battery < 5.0 {
                    s.battery = 100.0; // swapped
                }
                s.door_open = if s.door_open {
                    rng.random::<f64>() >= 0.4
                } else {
                    rng.random::<f64>() < 0.02
                };
                Values {
                    names: SENSOR_METRICS,
                    values: [
                        Value::Num(round(temp, 2)),
                        Value::Num(round(humidity, 1)),
                        Value::Num(round(s.battery, 2)),
                        Value::Bool(s.door_open),
                        Value::Num(0.0),
                        Value::Num(0.0),
                    ],
                }
            }
            Signals::Tracker(t) => {
                t.heading = (t.heading + 0.2 * normal(rng)).rem_euclid(std::f64::consts::TAU);
                t.speed = (t.speed + 0.5 * normal(rng)).clamp(0.0, 35.0);
                let dist = t.speed * dt;
                t.lat = (t.lat + dist * t.heading.cos() / M_PER_DEG).clamp(-85.0, 85.0);
                let m_per_deg_lon = M_PER_DEG * t.lat.to_radians().cos().max(0.01);
                t.lon = (t.lon + dist * t.heading.sin() / m_per_deg_lon + 180.0).rem_euclid(360.0)
                    - 180.0;
                t.battery -= t.drain * dt;
                if t.battery < 5.0 {
                    t.battery = 100.0; // recharged
                }
                Values {
                    names: TRACKER_METRICS,
                    values: [
                        Value::Num(round(t.lat, 6)),
                        Value::Num(round(t.lon, 6)),
                        Value::Num(round(t.speed, 2)),
                        Value::Num(round(t.heading.to_degrees(), 1)),
                        Value::Num(round(t.battery, 2)),
                        Value::Num(0.0),
                    ],
                }
            }
        }
    }

    /// The next reading at `ts_ms` (later with `distinct_ts`, if the device already sent one
    /// at or after it), and what it is.
    ///
    /// With probability `bad_ratio` the reading is replaced by an injected fault; a fault uses
    /// no `seq`, so the valid readings of a device keep consecutive numbers.
    pub fn next(&mut self, ts_ms: i64) -> (Item, Next<'_>) {
        if self.bad_ratio > 0.0 && self.rng.random::<f64>() < self.bad_ratio {
            let fault = Fault::ALL[self.rng.random_range(0..Fault::ALL.len())];
            let item = Item {
                device: self.index,
                seq: None,
                fault: Some(fault),
            };
            let next = Next::Fault {
                fault,
                device_id: &self.id,
                ts_ms,
            };
            return (item, next);
        }
        let ts_ms = match self.last_ts {
            Some(prev) if self.distinct_ts && ts_ms <= prev => prev + 1,
            _ => ts_ms,
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let values = self.step(ts_ms);
        let item = Item {
            device: self.index,
            seq: Some(seq),
            fault: None,
        };
        let reading = Reading {
            device_id: &self.id,
            seq,
            ts_ms,
            names: values.names,
            values: values.values,
            own: values.names.len().min(self.metrics),
            aux: &self.aux,
        };
        (item, Next::Reading(reading))
    }

    /// Appends the next reading as a JSON object to `out` (without `device_id` when `with_id`
    /// is false: the transport binds it) and says what it is.
    pub fn write_reading(&mut self, ts_ms: i64, with_id: bool, out: &mut String) -> Item {
        let mut buf = Vec::with_capacity(192);
        let (item, next) = self.next(ts_ms);
        crate::encode::json::write(&next, with_id, &mut buf);
        out.push_str(std::str::from_utf8(&buf).expect("JSON is UTF-8"));
        item
    }

    /// The `seq` the next valid reading will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// A uniform number in `[0, 1)` from this device's generator (e.g. to spread start times).
    pub fn unit_random(&mut self) -> f64 {
        self.rng.random::<f64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value as J;

    fn spec(profile: FleetProfile, metrics: usize, seed: u64) -> FleetSpec {
        FleetSpec {
            prefix: "sim-test".into(),
            devices: 10,
            profile,
            metrics,
            seed,
            seq_start: 1,
            bad_ratio: 0.0,
            distinct_ts: false,
        }
    }

    /// Two weeks of readings, every 10 minutes, from `device`.
    fn run(device: &mut Device) -> Vec<J> {
        let t0 = 1_795_000_000_000i64;
        (0..2016)
            .map(|i| {
                let mut s = String::new();
                device.write_reading(t0 + i * 600_000, true, &mut s);
                serde_json::from_str(&s).expect("valid JSON")
            })
            .collect()
    }

    #[test]
    fn same_seed_same_readings_other_seed_other_readings() {
        for profile in [FleetProfile::Sensor, FleetProfile::Tracker] {
            let a = run(&mut spec(profile, 8, 42).build().remove(3));
            let b = run(&mut spec(profile, 8, 42).build().remove(3));
            let c = run(&mut spec(profile, 8, 43).build().remove(3));
            assert_eq!(a, b, "{profile:?}: same seed must give the same readings");
            assert_ne!(a, c, "{profile:?}: another seed must give other readings");
            // Devices of one fleet differ from each other too.
            let d = run(&mut spec(profile, 8, 42).build().remove(4));
            assert_ne!(a, d);
        }
    }

    #[test]
    fn sensor_signals_stay_in_range_and_move() {
        let mut dev = spec(FleetProfile::Sensor, 4, 7).build().remove(0);
        let readings = run(&mut dev);
        let (mut tmin, mut tmax) = (f64::MAX, f64::MIN);
        let mut opened = 0;
        for (i, r) in readings.iter().enumerate() {
            assert_eq!(r["seq"], i as u64 + 1, "seq counts up from seq_start");
            assert_eq!(r["device_id"], "sim-test-0");
            let m = r["metrics"].as_object().unwrap();
            assert_eq!(m.len(), 4);
            let t = m["temperature"].as_f64().unwrap();
            assert!((-40.0..=85.0).contains(&t));
            tmin = tmin.min(t);
            tmax = tmax.max(t);
            let h = m["humidity"].as_f64().unwrap();
            assert!((0.0..=100.0).contains(&h), "humidity {h}");
            let b = m["battery"].as_f64().unwrap();
            assert!((5.0..=100.0).contains(&b), "battery {b}");
            opened += m["door_open"].as_bool().unwrap() as u32;
        }
        assert!(tmax - tmin > 3.0, "a daily cycle: {tmin}..{tmax}");
        assert!(
            opened > 0 && opened < 400,
            "door opens now and then: {opened}"
        );
        // The battery drains between two readings (unless it was just swapped).
        let b = |i: usize| readings[i]["metrics"]["battery"].as_f64().unwrap();
        assert!(b(1) < b(0));
    }

    #[test]
    fn trackers_move_within_bounds() {
        let mut dev = spec(FleetProfile::Tracker, 5, 9).build().remove(0);
        let readings = run(&mut dev);
        let first = &readings[0]["metrics"];
        let last = &readings[readings.len() - 1]["metrics"];
        assert_ne!(first["lat"], last["lat"]);
        for r in &readings {
            let m = &r["metrics"];
            let lat = m["lat"].as_f64().unwrap();
            let lon = m["lon"].as_f64().unwrap();
            assert!((-85.0..=85.0).contains(&lat) && (-180.0..=180.0).contains(&lon));
            assert!((0.0..=35.0).contains(&m["speed"].as_f64().unwrap()));
            assert!((0.0..=360.0).contains(&m["heading"].as_f64().unwrap()));
        }
    }

    #[test]
    fn metrics_count_cuts_or_pads_and_can_omit_the_id() {
        for (n, profile) in [
            (1, FleetProfile::Sensor),
            (2, FleetProfile::Tracker),
            (40, FleetProfile::Mixed),
        ] {
            for mut dev in spec(profile, n, 1).build() {
                let mut s = String::new();
                dev.write_reading(1_795_000_000_000, false, &mut s);
                let r: J = serde_json::from_str(&s).unwrap();
                assert_eq!(r["metrics"].as_object().unwrap().len(), n, "{s}");
                assert!(r.get("device_id").is_none());
            }
        }
    }

    /// `metric_names` (what --verify expects) is what the devices write.
    #[test]
    fn metric_names_are_the_names_written() {
        for metrics in [1, 4, 5, 9] {
            for mut dev in spec(FleetProfile::Mixed, metrics, 1).build() {
                let (_, next) = dev.next(1_795_000_000_000);
                let Next::Reading(r) = next else { panic!() };
                let names: Vec<&str> = r.metrics().map(|(n, _)| n).collect();
                assert_eq!(
                    names,
                    metric_names(FleetProfile::Mixed, dev_index(&r), metrics)
                );
            }
        }
    }

    fn dev_index(r: &Reading<'_>) -> u32 {
        r.device_id.rsplit_once('-').unwrap().1.parse().unwrap()
    }

    #[test]
    fn distinct_ts_keeps_a_device_s_readings_apart() {
        let mut s = spec(FleetProfile::Sensor, 2, 1);
        s.distinct_ts = true;
        let mut dev = s.build().remove(0);
        let t0 = 1_795_000_000_000;
        let ts: Vec<i64> = [t0, t0, t0, t0 + 10, t0 + 5]
            .iter()
            .map(|t| match dev.next(*t).1 {
                Next::Reading(r) => r.ts_ms,
                Next::Fault { .. } => unreachable!(),
            })
            .collect();
        assert_eq!(ts, [t0, t0 + 1, t0 + 2, t0 + 10, t0 + 11]);
        // Without it, the clock's time as given.
        let mut dev = spec(FleetProfile::Sensor, 2, 1).build().remove(0);
        let (_, a) = dev.next(t0);
        let a = match a {
            Next::Reading(r) => r.ts_ms,
            _ => unreachable!(),
        };
        let (_, b) = dev.next(t0);
        let b = match b {
            Next::Reading(r) => r.ts_ms,
            _ => unreachable!(),
        };
        assert_eq!((a, b), (t0, t0));
    }

    #[test]
    fn mixed_fleet_has_both_profiles() {
        let devices = spec(FleetProfile::Mixed, 4, 1).build();
        let kinds: Vec<bool> = devices
            .iter()
            .map(|d| matches!(d.signals, Signals::Tracker(_)))
            .collect();
        assert_eq!(kinds.iter().filter(|t| **t).count(), 2);
    }
}
