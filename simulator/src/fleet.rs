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

use std::fmt::Write as _;

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

#[derive(Clone, Copy, Debug, PartialEq)]
enum Value {
    Num(f64),
    Bool(bool),
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
        let tracker = match spec.profile {
            FleetProfile::Sensor => false,
            FleetProfile::Tracker => true,
            FleetProfile::Mixed => n % 5 == 4,
        };
        let signals = if tracker {
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

    /// Appends the next reading's JSON object to `out` and says what it is.
    ///
    /// With `with_id` false the reading omits `device_id` (the transport binds it). With
    /// probability `bad_ratio` the reading is replaced by an injected fault; a fault uses no
    /// `seq`, so the valid readings of a device keep consecutive numbers.
    pub fn write_reading(&mut self, ts_ms: i64, with_id: bool, out: &mut String) -> Item {
        if self.bad_ratio > 0.0 && self.rng.random::<f64>() < self.bad_ratio {
            let fault = Fault::ALL[self.rng.random_range(0..Fault::ALL.len())];
            fault.write(&self.id, ts_ms, out);
            return Item {
                device: self.index,
                seq: None,
                fault: Some(fault),
            };
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let values = self.step(ts_ms);
        out.push('{');
        if with_id {
            out.push_str("\"device_id\":\"");
            out.push_str(&self.id);
            out.push_str("\",");
        }
        let mut ib = itoa::Buffer::new();
        out.push_str("\"seq\":");
        out.push_str(ib.format(seq));
        out.push_str(",\"ts\":");
        out.push_str(ib.format(ts_ms));
        out.push_str(",\"metrics\":{");
        let own = values.names.len().min(self.metrics);
        let mut fb = ryu::Buffer::new();
        for i in 0..own {
            if i > 0 {
                out.push(',');
            }
            out.push('"');
            out.push_str(values.names[i]);
            out.push_str("\":");
            match values.values[i] {
                Value::Num(x) => out.push_str(fb.format_finite(x)),
                Value::Bool(b) => out.push_str(if b { "true" } else { "false" }),
            }
        }
        for (k, a) in self.aux.iter().enumerate() {
            if own + k > 0 {
                out.push(',');
            }
            let _ = write!(out, "\"aux_{}\":", k + 1);
            out.push_str(fb.format_finite(round(*a, 3)));
        }
        out.push_str("}}");
        Item {
            device: self.index,
            seq: Some(seq),
            fault: None,
        }
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
