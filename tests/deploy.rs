//! The deployment in `deploy/` agrees with the binary it deploys.
//!
//! Where it sits: outside the data flow. It guards the container image and the Kubernetes
//! overlays, which name ports, paths, configuration keys and timeouts that only the code
//! defines. Every check runs the real `sluice` binary; no network, docker or cluster is needed.
//!
//! Each overlay is read the way kustomize builds it, for the subset the overlays use:
//! `resources` (files and directories) and `configMapGenerator`. There are no patches, so each
//! listed file is a whole object as applied. A kustomization key this reader does not model
//! fails the test instead of being skipped. `scripts/check-deploy` validates the same objects
//! against the Kubernetes schemas.
//!
//! Per overlay:
//! - the ConfigMap's TOML passes `sluice --check-config` with the `SLUICE__*` variables every
//!   pod has (plain values, `fieldRef`s, required Secret keys), and with each optional one added
//!   (an unknown key exits 2); the effective configuration (TOML + the pod's environment) is
//!   what the checks below compare with;
//! - container port, probe ports, Service target ports, NetworkPolicy ingress and the
//!   `prometheus.io/port` annotation are the `server.listen` port;
//! - the probe paths and the scrape path answer 200 on a Sluice started with that TOML, which
//!   then drains and exits 0 on SIGTERM within `server.shutdown_timeout`;
//! - `terminationGracePeriodSeconds` > `server.shutdown_timeout` + the preStop sleep;
//! - `/tmp` is a writable mount, since the root file system is read-only, and so is
//!   `storage.data_dir` with the SQLite backend;
//! - with the PostgreSQL backend: the URL (it holds the password) is not in the ConfigMap but
//!   comes from a required Secret key, a NetworkPolicy lets the pods reach port 5432, and the
//!   Sluice started below runs on a fresh database (`common/pg.rs`) given through that variable,
//!   creates its tables there and writes nothing to `storage.data_dir`;
//! - with MQTT on, each pod takes its client id from its own name;
//! - `auth.mode = "token"` (SPEC §11), with the admin token from a required Secret key into
//!   `SLUICE__AUTH__ADMIN_TOKEN`: no literal admin token in the ConfigMap, the env or any file
//!   of the overlay, no Secret object in it (the user creates the Secret), `--check-config`
//!   does not print it; on the Sluice started below ingest without a token is 401, the admin API
//!   takes the Secret's value, and the probes and the scrape need no token;
//! - the pod runs hardened, as the uid the image declares.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use sluice::config::Backend;
use sluice::Settings;

#[path = "common/pg.rs"]
mod pg;
use pg::TestDb;

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

/// Kustomization keys this reader models. `images` only retags the container image, which no
/// check here looks at.
const KUSTOMIZATION_KEYS: &[&str] = &[
    "apiVersion",
    "kind",
    "resources",
    "configMapGenerator",
    "images",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every YAML document in a file, as JSON values (Kubernetes objects have string keys only).
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The objects `kubectl kustomize dir` would produce, minus name hashes and image tags.
fn build(dir: &Path) -> Vec<Value> {
    let path = dir.join("kustomization.yaml");
    let kustomization = yaml_documents(&path).pop().expect("an empty kustomization");
    let fields = kustomization
        .as_object()
        .expect("a kustomization is a mapping");
    for key in fields.keys() {
        assert!(
            KUSTOMIZATION_KEYS.contains(&key.as_str()),
            "{}: `{key}` is not modelled by tests/deploy.rs, so what it checks would not be what \
             kustomize renders; extend build() there",
            path.display()
        );
    }
    let mut objects = Vec::new();
    for resource in list(&kustomization, "/resources") {
        let target = dir.join(text(resource, "", "a resource path"));
        if target.is_dir() {
            objects.extend(build(&target));
        } else {
            objects.extend(yaml_documents(&target));
        }
    }
    for generator in list(&kustomization, "/configMapGenerator") {
        for key in generator
            .as_object()
            .expect("a generator is a mapping")
            .keys()
        {
            assert!(
                key == "name" || key == "files",
                "{}: configMapGenerator `{key}` is not modelled by tests/deploy.rs",
                path.display()
            );
        }
        let mut data = serde_json::Map::new();
        for entry in list(generator, "/files") {
            let entry = text(entry, "", "a generator file");
            let (key, file) = match entry.split_once('=') {
                Some((key, file)) => (key.to_owned(), file),
                None => (file_name(entry), entry),
            };
            data.insert(key, Value::String(read(&dir.join(file))));
        }
        objects.push(serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": text(generator, "/name", "generator name")},
            "data": data,
        }));
    }
    objects
}

fn file_name(path: &str) -> String {
    Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_else(|| panic!("`{path}` has no file name"))
        .to_owned()
}

/// The array at `pointer`, or nothing when absent.
fn list<'a>(value: &'a Value, pointer: &str) -> &'a [Value] {
    match value.pointer(pointer) {
        None | Some(Value::Null) => &[],
        Some(Value::Array(items)) => items,
        Some(other) => panic!("{pointer}: expected a list, found {other}"),
    }
}

/// The string at `pointer`, or a panic saying what was expected there.
fn text<'a>(value: &'a Value, pointer: &str, what: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{what}: no string at `{pointer}` in {value}"))
}

fn number(value: &Value, pointer: &str, what: &str) -> u64 {
    value
        .pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{what}: no number at `{pointer}` in {value}"))
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    of_kind(objects, kind)
        .into_iter()
        .find(|o| o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} named {name}"))
}

/// Whether `matchLabels`-style `selector` selects an object with `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_object().expect("a selector is a mapping");
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A port given by number or by name, resolved against the container's declared ports.
fn resolve_port(container: &Value, port: &Value, what: &str) -> u16 {
    let ports = list(container, "/ports");
    let found = match port {
        Value::Number(_) => ports.iter().find(|p| p["containerPort"] == *port),
        Value::String(name) => ports.iter().find(|p| p["name"] == *name),
        other => panic!("{what}: port {other} is neither a number nor a name"),
    };
    let found = found.unwrap_or_else(|| {
        panic!("{what}: port {port} is not a port of container `sluice` ({ports:?})")
    });
    number(found, "/containerPort", what) as u16
}

/// The variable of `auth.admin_token`.
const ADMIN_TOKEN_VAR: &str = "SLUICE__AUTH__ADMIN_TOKEN";

/// The admin token a pod gets from its Secret, in these tests (64 hex digits, as
/// `openssl rand -hex 32` makes).
const ADMIN_TOKEN_PLACEHOLDER: &str =
    "5d1e0c9a7b3f48e2a6c4d8f0b2e4a6c85d1e0c9a7b3f48e2a6c4d8f0b2e4a6c8";

/// The PostgreSQL port: the port of a CloudNativePG `uri` and of most managed services.
const POSTGRES_PORT: u16 = 5432;

/// The value of a `SLUICE__*` variable that Kubernetes fills in at run time. The database URL
/// gets a fresh database (created on first use), since Sluice connects to it at start; other
/// values need only pass --check-config. A key that needs a number or a duration gets a clear
/// failure from --check-config; choose a better one then.
fn placeholder(var_name: &str, value_from: &Value, db: &mut Option<TestDb>) -> String {
    if var_name == "SLUICE__STORAGE__POSTGRES__URL" {
        db.get_or_insert_with(TestDb::new).url()
    } else if var_name == ADMIN_TOKEN_VAR {
        // What `openssl rand -hex 32` gives (deploy/README.md).
        ADMIN_TOKEN_PLACEHOLDER.to_owned()
    } else if var_name == "SLUICE__NATS__URL" {
        // Not connected to at start: a URL of the shape the Secret holds.
        "nats://sluice:secret@nats:4222".to_owned()
    } else if value_from.pointer("/fieldRef/fieldPath") == Some(&Value::from("metadata.name")) {
        "sluice-5d8f7c9b4-x2x7q".to_owned()
    } else {
        "placeholder".to_owned()
    }
}

/// Whether a pod may start without this variable: only an `optional` Secret or ConfigMap key.
fn optional_var(var: &Value) -> bool {
    ["secretKeyRef", "configMapKeyRef"]
        .iter()
        .any(|r| var.pointer(&format!("/valueFrom/{r}/optional")) == Some(&Value::Bool(true)))
}

/// `sluice --check-config --config toml` with exactly `env` (nothing inherited).
fn check_config(toml: &Path, env: &[(String, String)]) -> Output {
    Command::new(SLUICE)
        .arg("--check-config")
        .arg("--config")
        .arg(toml)
        .env_clear()
        .envs(env.iter().cloned())
        .output()
        .expect("run sluice --check-config")
}

/// The effective configuration, as the binary prints it.
fn effective(toml: &Path, env: &[(String, String)]) -> Settings {
    let out = check_config(toml, env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} with {env:?} fails `sluice --check-config` ({}): {stderr}",
        toml.display(),
        out.status
    );
    let printed = String::from_utf8(out.stdout).expect("utf-8 --check-config output");
    toml::from_str(&printed).unwrap_or_else(|e| panic!("--check-config printed bad TOML: {e}"))
}

/// The one workload of an overlay, its kind, and its pod template.
fn workload(objects: &[Value]) -> (&Value, &'static str) {
    let mut found = Vec::new();
    for kind in ["Deployment", "StatefulSet"] {
        found.extend(of_kind(objects, kind).into_iter().map(|o| (o, kind)));
    }
    assert_eq!(
        found.len(),
        1,
        "an overlay runs exactly one Sluice workload"
    );
    found[0]
}

/// A Sluice process started from the ConfigMap's TOML, killed if the test fails.
struct Running {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Running {
    /// Starts `sluice --config toml` with the pod's environment `env`, on port 0 with
    /// `data_dir`, and waits for its address.
    fn start(toml: &Path, env: &[(String, String)], data_dir: &Path) -> Running {
        let mut child = Command::new(SLUICE)
            .arg("--config")
            .arg(toml)
            .env_clear()
            .envs(env.iter().cloned())
            .env("SLUICE__SERVER__LISTEN", "127.0.0.1:0")
            .env("SLUICE__STORAGE__DATA_DIR", data_dir)
            // The broker is not part of this test; the MQTT tests cover the source.
            .env("SLUICE__MQTT__ENABLED", "false")
            .env("SLUICE__LOG__FORMAT", "json")
            .env("SLUICE__LOG__LEVEL", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sluice");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            // Reads to the end, so the child never blocks on a full pipe.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let event: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if event["message"] == "sluice listening" {
                    if let Some(addr) = event["addr"].as_str().and_then(|a| a.parse().ok()) {
                        let _ = tx.send(addr);
                    }
                }
                lines.lock().unwrap().push(line);
            }
        });
        // Built before the address is known, so that a failed start still kills the child.
        let mut running = Running {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
        };
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => running.addr = addr,
            Err(e) => panic!(
                "sluice did not log its address ({e}); log: {:?}",
                running.log.lock().unwrap()
            ),
        }
        running
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends SIGTERM and waits, up to `limit`, for the exit status.
    fn terminate(mut self, limit: Duration) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for sluice") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "sluice did not exit within {limit:?} of SIGTERM; log: {:?}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GETs `path` until it answers 200, or panics at the deadline with the last answer.
async fn wait_for_200(client: &reqwest::Client, running: &Running, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    while Instant::now() < deadline {
        match client.get(running.url(path)).send().await {
            Ok(res) if res.status() == 200 => return,
            Ok(res) => last = format!("{} {}", res.status(), res.text().await.unwrap_or_default()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "{path} did not answer 200 within 20s (last: {last}); log: {:?}",
        running.log.lock().unwrap()
    );
}

/// What the Dockerfile declares, for the checks that tie image and pods together.
struct Image {
    /// `USER uid:gid`.
    user: u64,
    /// `EXPOSE` ports.
    expose: Vec<u16>,
    /// `VOLUME` paths.
    volumes: Vec<String>,
    /// `ENV` name → value.
    env: BTreeMap<String, String>,
    /// `COPY` sources → destination, for files from the build context.
    copies: BTreeMap<String, String>,
}

fn dockerfile() -> Image {
    let text = read(&repo().join("deploy/Dockerfile"));
    // Join continuation lines; drop comments.
    let joined = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ");
    let mut image = Image {
        user: 0,
        expose: Vec::new(),
        volumes: Vec::new(),
        env: BTreeMap::new(),
        copies: BTreeMap::new(),
    };
    for line in joined.lines() {
        let mut words = line.split_whitespace();
        let (Some(instruction), rest) = (words.next(), words.collect::<Vec<_>>()) else {
            continue;
        };
        match instruction {
            // A later FROM starts a new stage: only the last (runtime) stage counts.
            "FROM" => {
                image.env.clear();
                image.copies.clear();
                image.user = 0;
            }
            "USER" => {
                let uid = rest[0].split(':').next().unwrap_or_default();
                image.user = uid.parse().unwrap_or_else(|_| {
                    panic!("Dockerfile USER {uid}: use a numeric uid, so runAsNonRoot can check it")
                });
            }
            "EXPOSE" => image.expose.extend(rest.iter().map(|p| {
                p.trim_end_matches("/tcp")
                    .parse::<u16>()
                    .expect("EXPOSE port")
            })),
            "VOLUME" => {
                let list: Vec<String> =
                    serde_json::from_str(&rest.join(" ")).expect("VOLUME in JSON form");
                image.volumes.extend(list);
            }
            "ENV" => {
                for pair in rest {
                    let (k, v) = pair.split_once('=').expect("ENV key=value");
                    image.env.insert(k.to_owned(), v.to_owned());
                }
            }
            "COPY" if !rest.iter().any(|w| w.starts_with("--from")) => {
                let words: Vec<_> = rest.iter().filter(|w| !w.starts_with("--")).collect();
                if let [source, destination] = words.as_slice() {
                    image
                        .copies
                        .insert(source.to_string(), destination.to_string());
                }
            }
            _ => {}
        }
    }
    image
}

/// The configuration file of the workload's `sluice` container: `--config PATH`, PATH inside a
/// ConfigMap volume. Returns the volume mount and the file's text.
fn config_file<'a>(name: &str, objects: &'a [Value], workload: &'a Value) -> (&'a Value, &'a str) {
    let pod = &workload["spec"]["template"]["spec"];
    let container = list(pod, "/containers")
        .iter()
        .find(|c| c["name"] == "sluice")
        .expect("a container named sluice");
    let args: Vec<&str> = list(container, "/args")
        .iter()
        .map(|a| a.as_str().expect("string args"))
        .collect();
    let config_path = args
        .iter()
        .position(|a| *a == "--config")
        .and_then(|i| args.get(i + 1))
        .unwrap_or_else(|| panic!("{name}: container args {args:?} give no --config FILE"));
    let config_mount = list(container, "/volumeMounts")
        .iter()
        .find(|m| {
            Path::new(config_path).parent() == Some(Path::new(text(m, "/mountPath", "mount")))
        })
        .unwrap_or_else(|| panic!("{name}: nothing is mounted where --config {config_path} is"));
    let volume = list(pod, "/volumes")
        .iter()
        .find(|v| v["name"] == config_mount["name"])
        .expect("the config mount's volume");
    let configmap_name = text(volume, "/configMap/name", "config volume");
    let key = file_name(config_path);
    let configmap = named(objects, "ConfigMap", configmap_name);
    let toml_text = text(&configmap["data"], &format!("/{key}"), "ConfigMap data");
    (config_mount, toml_text)
}

/// Everything the issue asks of one overlay (see the module docs); returns its store backend.
async fn check_overlay(name: &str) -> Backend {
    let dir = repo().join("deploy/k8s/overlays").join(name);
    let objects = build(&dir);
    let (workload, kind) = workload(&objects);
    let template = &workload["spec"]["template"];
    let pod = &template["spec"];
    let labels = &template["metadata"]["labels"];
    let containers = list(pod, "/containers");
    let container = containers
        .iter()
        .find(|c| c["name"] == "sluice")
        .expect("a container named sluice");
    let tmp = tempfile::tempdir().unwrap();

    let mounts = list(container, "/volumeMounts");
    let (config_mount, toml_text) = config_file(name, &objects, workload);
    let toml_path = tmp.path().join("sluice.toml");
    std::fs::write(&toml_path, toml_text).unwrap();

    // Environment: only real keys; no single-underscore look-alikes, which Sluice ignores.
    // `always`: what every pod has; `optional`: Secret keys a pod may lack.
    let mut db = None;
    let (mut always, mut optional) = (Vec::new(), Vec::new());
    for var in list(container, "/env") {
        let var_name = text(var, "/name", "env name");
        if var_name.starts_with("SLUICE__") {
            let value = match var.get("value") {
                Some(v) => v.as_str().expect("env value is a string").to_owned(),
                None => placeholder(var_name, &var["valueFrom"], &mut db),
            };
            let pair = (var_name.to_owned(), value);
            if optional_var(var) {
                optional.push(pair);
            } else {
                always.push(pair);
            }
        } else {
            assert!(
                !var_name.starts_with("SLUICE") || var_name == "SLUICE_CONFIG",
                "{name}: env {var_name} looks like configuration but is not SLUICE__SECTION__KEY"
            );
        }
    }
    let out = check_config(&toml_path, &always);
    assert!(
        out.status.success(),
        "{name}: the TOML with only the variables every pod has ({always:?}; a Secret key marked \
         optional may be missing) fails sluice --check-config ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for pair in &optional {
        let with_it = [always.clone(), vec![pair.clone()]].concat();
        let out = check_config(&toml_path, &with_it);
        assert!(
            out.status.success(),
            "{name}: env {}={} is rejected by sluice --check-config ({}): {}",
            pair.0,
            pair.1,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let env = [always, optional].concat();
    check_auth(name, &dir, &objects, container, toml_text, &toml_path, &env);
    let settings = effective(&toml_path, &env);
    let port = settings.server.listen.port();

    // Ports.
    let ports = list(container, "/ports");
    assert!(!ports.is_empty(), "{name}: container declares no port");
    for p in ports {
        assert_eq!(
            number(p, "/containerPort", "containerPort"),
            u64::from(port),
            "{name}: containerPort differs from server.listen {}",
            settings.server.listen
        );
    }
    let probe = |which: &str| -> (String, u16) {
        let get = &container[which]["httpGet"];
        let path = text(get, "/path", which).to_owned();
        (path, resolve_port(container, &get["port"], which))
    };
    let (live_path, live_port) = probe("livenessProbe");
    let (ready_path, ready_port) = probe("readinessProbe");
    assert_eq!(live_port, port, "{name}: livenessProbe port");
    assert_eq!(ready_port, port, "{name}: readinessProbe port");
    // /readyz is 503 while the store is down: as a liveness probe it would restart a pod that a
    // restart cannot fix.
    assert_ne!(
        live_path, ready_path,
        "{name}: liveness must not probe readiness"
    );

    let annotations = &template["metadata"]["annotations"];
    assert_eq!(
        annotations["prometheus.io/scrape"], "true",
        "{name}: scrape"
    );
    assert_eq!(
        text(annotations, "/prometheus.io~1port", "prometheus.io/port"),
        port.to_string(),
        "{name}: prometheus.io/port"
    );
    let scrape_path = text(annotations, "/prometheus.io~1path", "prometheus.io/path").to_owned();

    for service in of_kind(&objects, "Service") {
        if !selects(&service["spec"]["selector"], labels) {
            continue;
        }
        for p in list(service, "/spec/ports") {
            let target = p.get("targetPort").unwrap_or(&p["port"]);
            assert_eq!(
                resolve_port(container, target, "Service targetPort"),
                port,
                "{name}: Service {} targetPort",
                service["metadata"]["name"]
            );
        }
    }
    let mut ingress_open = false;
    for policy in of_kind(&objects, "NetworkPolicy") {
        if selects(&policy["spec"]["podSelector"]["matchLabels"], labels) {
            for rule in list(policy, "/spec/ingress") {
                for p in list(rule, "/ports") {
                    ingress_open |= resolve_port(container, &p["port"], "NetworkPolicy") == port;
                }
            }
        }
    }
    assert!(
        ingress_open,
        "{name}: no NetworkPolicy admits the HTTP port {port}"
    );
    for pdb in of_kind(&objects, "PodDisruptionBudget") {
        assert!(
            selects(&pdb["spec"]["selector"]["matchLabels"], labels),
            "{name}: PodDisruptionBudget does not select the pods"
        );
    }
    assert_eq!(
        of_kind(&objects, "PodDisruptionBudget").len(),
        1,
        "{name}: one PDB"
    );

    // Shutdown: the kubelet waits the preStop sleep, sends SIGTERM, then waits out the rest of
    // the grace period before SIGKILL. Sluice's drain must fit in what is left.
    let grace = number(
        pod,
        "/terminationGracePeriodSeconds",
        "terminationGracePeriodSeconds",
    );
    let pre_stop = number(
        container,
        "/lifecycle/preStop/sleep/seconds",
        "lifecycle.preStop.sleep",
    );
    assert!(
        Duration::from_secs(grace) > settings.server.shutdown_timeout + Duration::from_secs(pre_stop),
        "{name}: terminationGracePeriodSeconds {grace} must exceed server.shutdown_timeout {:?} + preStop {pre_stop}s",
        settings.server.shutdown_timeout
    );

    // Writable places under a read-only root: /tmp, and the data directory of SQLite.
    assert!(
        mounts.iter().any(|m| m["mountPath"] == "/tmp"),
        "{name}: no writable /tmp under the read-only root"
    );
    let backend = settings.storage.backend;
    let from_claims = match backend {
        Backend::Sqlite => check_data_mount(name, &settings, workload, container, config_mount),
        Backend::Postgres => {
            check_postgres_url(name, container, toml_text);
            check_postgres_egress(name, &objects, labels);
            false
        }
    };

    match kind {
        "StatefulSet" => {
            // The embedded store belongs to one process, and must outlive the pod.
            assert_eq!(
                number(workload, "/spec/replicas", "replicas"),
                1,
                "{name}: replicas"
            );
            assert!(
                backend != Backend::Sqlite || from_claims,
                "{name}: the SQLite store must be on a PersistentVolumeClaim"
            );
            let governing = text(workload, "/spec/serviceName", "serviceName");
            assert_eq!(
                named(&objects, "Service", governing)["spec"]["clusterIP"],
                "None",
                "{name}: serviceName must be a headless Service"
            );
        }
        _ => {
            let hpas = of_kind(&objects, "HorizontalPodAutoscaler");
            assert_eq!(hpas.len(), 1, "{name}: a Deployment scales with an HPA");
            let target = &hpas[0]["spec"]["scaleTargetRef"];
            assert_eq!(target["kind"], kind, "{name}: HPA target kind");
            assert_eq!(
                target["name"], workload["metadata"]["name"],
                "{name}: HPA target"
            );
            assert!(
                number(hpas[0], "/spec/minReplicas", "minReplicas") > 1,
                "{name}: a fleet runs several replicas"
            );
        }
    }

    // MQTT: replicas of one group, each with its own client id.
    if settings.mqtt.enabled {
        let client_id = list(container, "/env")
            .iter()
            .find(|v| v["name"] == "SLUICE__MQTT__CLIENT_ID")
            .unwrap_or_else(|| panic!("{name}: MQTT on, but no SLUICE__MQTT__CLIENT_ID per pod"));
        assert_eq!(
            client_id.pointer("/valueFrom/fieldRef/fieldPath"),
            Some(&Value::from("metadata.name")),
            "{name}: the MQTT client id must come from the pod name"
        );
        if kind == "Deployment" {
            assert!(
                !settings.mqtt.shared_group.is_empty(),
                "{name}: replicas need mqtt.shared_group to split the load"
            );
        }
    }

    // Hardening, and the image's uid.
    let image = dockerfile();
    let security = &pod["securityContext"];
    assert_eq!(security["runAsNonRoot"], true, "{name}: runAsNonRoot");
    assert_eq!(
        number(security, "/runAsUser", "runAsUser"),
        image.user,
        "{name}: uid"
    );
    assert_eq!(
        security["seccompProfile"]["type"], "RuntimeDefault",
        "{name}: seccomp"
    );
    let security = &container["securityContext"];
    assert_eq!(
        security["readOnlyRootFilesystem"], true,
        "{name}: read-only root"
    );
    assert_eq!(
        security["allowPrivilegeEscalation"], false,
        "{name}: privilege escalation"
    );
    assert_eq!(
        security["capabilities"]["drop"],
        serde_json::json!(["ALL"]),
        "{name}: caps"
    );
    for resource in ["requests", "limits"] {
        for what in ["cpu", "memory"] {
            assert!(
                container["resources"][resource].get(what).is_some(),
                "{name}: resources.{resource}.{what} missing"
            );
        }
    }

    // Probes and scrape against the real thing, then a clean SIGTERM drain.
    let data = tmp.path().join("data");
    let running = Running::start(&toml_path, &env, &data);
    let client = reqwest::Client::new();
    wait_for_200(&client, &running, &ready_path).await;
    for path in [&live_path, &ready_path, &scrape_path] {
        let res = client.get(running.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 200, "{name}: GET {path} (without a token)");
    }
    // Token mode is on: ingest without a token is refused, and the admin API takes the token
    // the pod got from its Secret.
    let res = client
        .post(running.url("/v1/readings"))
        .header("content-type", "application/json")
        .body(r#"{"device_id": "deploy-check", "metrics": {"t": 1}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401, "{name}: ingest without a token");
    let res = client
        .get(running.url("/v1/admin/tokens"))
        .bearer_auth(ADMIN_TOKEN_PLACEHOLDER)
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        200,
        "{name}: GET /v1/admin/tokens with the Secret's admin token: {}",
        res.text().await.unwrap_or_default()
    );
    assert!(
        !running
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(ADMIN_TOKEN_PLACEHOLDER)),
        "{name}: the log shows the admin token"
    );
    let status = running.terminate(settings.server.shutdown_timeout);
    assert!(
        status.success(),
        "{name}: sluice exited with {status} after SIGTERM"
    );
    if backend == Backend::Postgres {
        let db = db.expect("the database URL came from the pod's environment");
        assert_eq!(
            db.sql("SELECT count(*) FROM pg_tables WHERE tablename IN ('chunks', 'devices', 'refinery_schema_history')"),
            "3",
            "{name}: sluice did not create its tables in the database of SLUICE__STORAGE__POSTGRES__URL"
        );
        // The pod has no volume for it: nothing may be written there.
        assert!(
            !data.exists(),
            "{name}: the PostgreSQL backend wrote to storage.data_dir"
        );
    }
    backend
}

/// SQLite: `storage.data_dir` is a writable volume of the pod. Returns whether that volume is a
/// PersistentVolumeClaim of the StatefulSet (else a volume of the pod).
fn check_data_mount(
    name: &str,
    settings: &Settings,
    workload: &Value,
    container: &Value,
    config_mount: &Value,
) -> bool {
    let pod = &workload["spec"]["template"]["spec"];
    let mounts = list(container, "/volumeMounts");
    let data_dir = &settings.storage.data_dir;
    let data_mount = mounts
        .iter()
        .find(|m| {
            data_dir.starts_with(text(m, "/mountPath", "mount"))
                && m["name"] != config_mount["name"]
        })
        .unwrap_or_else(|| {
            panic!(
                "{name}: storage.data_dir {} is on the read-only root file system",
                data_dir.display()
            )
        });
    assert_ne!(
        data_mount["readOnly"], true,
        "{name}: data mount is read-only"
    );
    let data_volume = &data_mount["name"];
    let from_claims = list(workload, "/spec/volumeClaimTemplates")
        .iter()
        .any(|c| c["metadata"]["name"] == *data_volume);
    let from_volumes = list(pod, "/volumes")
        .iter()
        .any(|v| v["name"] == *data_volume);
    assert!(
        from_claims || from_volumes,
        "{name}: no volume {data_volume}"
    );
    from_claims
}

/// PostgreSQL: the URL holds the password, so it is not in the ConfigMap; every pod gets it
/// from a Secret key that must exist (a pod without it does not start, rather than start
/// without its store).
fn check_postgres_url(name: &str, container: &Value, toml_text: &str) {
    let toml: toml::Value = toml::from_str(toml_text).expect("the ConfigMap's TOML parses");
    assert!(
        toml.get("storage")
            .and_then(|s| s.get("postgres"))
            .and_then(|p| p.get("url"))
            .is_none(),
        "{name}: storage.postgres.url is in the ConfigMap; it holds a password, put it in a Secret"
    );
    let var = list(container, "/env")
        .iter()
        .find(|v| v["name"] == "SLUICE__STORAGE__POSTGRES__URL")
        .unwrap_or_else(|| {
            panic!("{name}: backend postgres, but no SLUICE__STORAGE__POSTGRES__URL in the pod")
        });
    let secret = var
        .pointer("/valueFrom/secretKeyRef")
        .unwrap_or_else(|| panic!("{name}: SLUICE__STORAGE__POSTGRES__URL is not from a Secret"));
    text(secret, "/name", "the URL's Secret");
    text(secret, "/key", "the URL's Secret key");
    assert!(
        !optional_var(var),
        "{name}: the URL's Secret key is optional; a pod without it cannot store anything"
    );
}

/// Token mode (SPEC §11, issue 12 part 9): `auth.mode = "token"` in the ConfigMap, the admin
/// token from a required Secret key and nowhere in the overlay.
fn check_auth(
    name: &str,
    dir: &Path,
    objects: &[Value],
    container: &Value,
    toml_text: &str,
    toml_path: &Path,
    env: &[(String, String)],
) {
    let toml: toml::Value = toml::from_str(toml_text).expect("the ConfigMap's TOML parses");
    let auth = toml.get("auth");
    assert_eq!(
        auth.and_then(|a| a.get("mode")),
        Some(&toml::Value::from("token")),
        "{name}: sluice.toml must say auth.mode = \"token\" (anyone reaching the Service could \
         otherwise write any device)"
    );
    assert!(
        auth.and_then(|a| a.get("admin_token")).is_none(),
        "{name}: auth.admin_token is in the ConfigMap; it is a secret, put it in the Secret"
    );
    // The effective configuration says so too, and does not show the admin token.
    let out = check_config(toml_path, env);
    let printed = String::from_utf8_lossy(&out.stdout);
    let effective: toml::Value = toml::from_str(&printed)
        .unwrap_or_else(|e| panic!("{name}: --check-config printed bad TOML: {e}"));
    assert_eq!(
        effective.get("auth").and_then(|a| a.get("mode")),
        Some(&toml::Value::from("token")),
        "{name}: effective auth.mode"
    );
    for stream in [&out.stdout, &out.stderr] {
        assert!(
            !String::from_utf8_lossy(stream).contains(ADMIN_TOKEN_PLACEHOLDER),
            "{name}: sluice --check-config shows the admin token"
        );
    }

    // From a Secret key that must exist: a pod without it does not start, rather than start
    // without its admin token (Sluice exits 2) or with a literal one.
    let var = list(container, "/env")
        .iter()
        .find(|v| v["name"] == ADMIN_TOKEN_VAR)
        .unwrap_or_else(|| {
            panic!("{name}: auth.mode = \"token\" but no {ADMIN_TOKEN_VAR} in the pod")
        });
    assert!(
        var.get("value").is_none(),
        "{name}: {ADMIN_TOKEN_VAR} has a literal value; take it from a Secret"
    );
    let secret = var
        .pointer("/valueFrom/secretKeyRef")
        .unwrap_or_else(|| panic!("{name}: {ADMIN_TOKEN_VAR} is not from a Secret"));
    text(secret, "/name", "the admin token's Secret");
    text(secret, "/key", "the admin token's Secret key");
    assert!(
        !optional_var(var),
        "{name}: the admin token's Secret key is optional; token mode cannot start without it"
    );

    // The Secret is the user's (deploy/README.md): no overlay ships one, so none holds a
    // committed admin token, and no file of the overlay names a literal one.
    let secrets = of_kind(objects, "Secret");
    assert!(
        secrets.is_empty(),
        "{name}: the overlay renders a Secret ({:?}); secrets are created by the user, not committed",
        secrets
            .iter()
            .map(|s| &s["metadata"]["name"])
            .collect::<Vec<_>>()
    );
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf(), repo().join("deploy/k8s/base")];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    for path in files {
        let text = read(&path);
        for (i, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with('#') {
                continue;
            }
            let literal = (code.starts_with("admin_token") && code.contains('='))
                || code.contains("admin-token:")
                || code.contains("slc_");
            assert!(
                !literal,
                "{}:{}: looks like a literal admin or device token; secrets go in the Secret \
                 `sluice-admin` that the user creates",
                path.display(),
                i + 1
            );
        }
    }
}

/// PostgreSQL: some NetworkPolicy of the pods allows egress to the database's port (a rule
/// without ports allows every port). A named port would be the database pod's, unknown here.
fn check_postgres_egress(name: &str, objects: &[Value], labels: &Value) {
    let open = of_kind(objects, "NetworkPolicy").into_iter().any(|policy| {
        selects(&policy["spec"]["podSelector"]["matchLabels"], labels)
            && list(policy, "/spec/egress").iter().any(|rule| {
                let ports = list(rule, "/ports");
                ports.is_empty() || ports.iter().any(|p| p["port"] == POSTGRES_PORT)
            })
    });
    assert!(
        open,
        "{name}: no NetworkPolicy allows egress to PostgreSQL ({POSTGRES_PORT})"
    );
}

#[tokio::test]
async fn single_node_overlay_agrees_with_the_binary() {
    assert_eq!(check_overlay("single-node").await, Backend::Sqlite);
}

/// The fleet is durable because every replica commits to one PostgreSQL database.
#[tokio::test]
async fn fleet_overlay_agrees_with_the_binary() {
    assert_eq!(check_overlay("fleet").await, Backend::Postgres);
    // Said by the file itself, not by an environment variable of the pod.
    let objects = build(&repo().join("deploy/k8s/overlays/fleet"));
    let (_, toml_text) = config_file("fleet", &objects, workload(&objects).0);
    let toml: toml::Value = toml::from_str(toml_text).expect("the fleet's sluice.toml parses");
    assert_eq!(
        toml.get("storage").and_then(|s| s.get("backend")),
        Some(&toml::Value::from("postgres")),
        "fleet: sluice.toml must say storage.backend = \"postgres\""
    );
}

/// What the fleet overlay reads from the Secret a CloudNativePG `Cluster` makes: the value of
/// `uri` in `<cluster>-app`, built here the way the operator builds it.
fn cloudnativepg_uri(cluster: &Value, namespace: &str, password: &str) -> String {
    let initdb = &cluster["spec"]["bootstrap"]["initdb"];
    format!(
        "postgresql://{}:{password}@{}-rw.{namespace}:{POSTGRES_PORT}/{}",
        text(initdb, "/owner", "bootstrap.initdb.owner"),
        text(cluster, "/metadata/name", "the Cluster's name"),
        text(initdb, "/database", "bootstrap.initdb.database"),
    )
}

/// The optional CloudNativePG example fits the fleet overlay: its app Secret's `uri` is a URL
/// Sluice takes (and redacts), Sluice's user owns the database it creates tables in, the
/// server accepts as many connections as the fleet opens at most, and a commit is on a standby
/// before Sluice acks it.
#[test]
fn cloudnativepg_cluster_fits_the_fleet_overlay() {
    let cluster = yaml_documents(&repo().join("deploy/k8s/optional/cloudnativepg-cluster.yaml"))
        .pop()
        .expect("a Cluster");
    assert_eq!(cluster["apiVersion"], "postgresql.cnpg.io/v1");
    assert_eq!(cluster["kind"], "Cluster");

    let objects = build(&repo().join("deploy/k8s/overlays/fleet"));
    let (deployment, _) = workload(&objects);
    let toml = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(toml.path(), config_file("fleet", &objects, deployment).1).unwrap();
    let password = "Zq8example0NotAReal0Secret";
    let uri = cloudnativepg_uri(&cluster, "sluice", password);
    let env = [
        ("SLUICE__STORAGE__POSTGRES__URL".to_owned(), uri),
        (
            ADMIN_TOKEN_VAR.to_owned(),
            ADMIN_TOKEN_PLACEHOLDER.to_owned(),
        ),
    ];
    let printed = String::from_utf8(check_config(toml.path(), &env).stdout).unwrap();
    assert!(
        !printed.contains(password),
        "--check-config shows the password"
    );
    let settings = effective(toml.path(), &env);
    assert_eq!(settings.storage.backend, Backend::Postgres);

    // Most pods at once: the HPA's maximum, plus the rollout's surge.
    let hpa = of_kind(&objects, "HorizontalPodAutoscaler")[0];
    let pods = number(hpa, "/spec/maxReplicas", "maxReplicas")
        + number(
            deployment,
            "/spec/strategy/rollingUpdate/maxSurge",
            "maxSurge",
        );
    // pool_size for queries, plus the commits' own two (src/store/postgres).
    let connections = pods * (settings.storage.postgres.pool_size as u64 + 2);
    let max_connections: u64 = text(
        &cluster,
        "/spec/postgresql/parameters/max_connections",
        "max_connections",
    )
    .parse()
    .expect("max_connections is a number");
    // PostgreSQL keeps superuser_reserved_connections (3) of them; leave the operator room.
    assert!(
        connections + 10 <= max_connections,
        "{pods} pods x (pool_size {} + 2) = {connections} connections; max_connections {max_connections} leaves too little room",
        settings.storage.postgres.pool_size
    );

    let sync = &cluster["spec"]["postgresql"]["synchronous"];
    assert!(
        number(sync, "/number", "synchronous.number") >= 1
            && number(&cluster, "/spec/instances", "instances") > 1
            && sync["dataDurability"] == "required",
        "an acknowledged reading must survive a failover: synchronous replication, required"
    );
}

/// The image's own configuration, and the Dockerfile lines that depend on it.
#[test]
fn image_config_agrees_with_the_dockerfile() {
    let image = dockerfile();
    let config = image
        .env
        .get("SLUICE_CONFIG")
        .expect("the image sets SLUICE_CONFIG");
    let source = image
        .copies
        .iter()
        .find(|(_, destination)| *destination == config)
        .map(|(source, _)| repo().join(source))
        .unwrap_or_else(|| panic!("nothing is copied to SLUICE_CONFIG={config}"));
    // SLUICE__* in the image would silently override the ConfigMap a pod mounts.
    for key in image.env.keys() {
        assert!(
            !key.starts_with("SLUICE__"),
            "Dockerfile sets {key}; use the config file"
        );
    }
    let settings = effective(&source, &[]);
    assert_eq!(
        image.expose,
        vec![settings.server.listen.port()],
        "EXPOSE vs server.listen"
    );
    assert!(
        image
            .volumes
            .iter()
            .any(|v| Path::new(v) == settings.storage.data_dir),
        "VOLUME {:?} does not hold storage.data_dir {}",
        image.volumes,
        settings.storage.data_dir.display()
    );
    assert_ne!(image.user, 0, "the image runs as root");
}

/// The optional ServiceMonitor scrapes exactly the main Service's HTTP port, at the path the
/// pods announce.
#[test]
fn service_monitor_selects_one_service_per_overlay() {
    let monitor = yaml_documents(&repo().join("deploy/k8s/optional/servicemonitor.yaml"))
        .pop()
        .expect("a ServiceMonitor");
    let selector = &monitor["spec"]["selector"]["matchLabels"];
    let endpoints = list(&monitor, "/spec/endpoints");
    assert!(!endpoints.is_empty(), "ServiceMonitor has no endpoints");
    for overlay in ["single-node", "fleet"] {
        let objects = build(&repo().join("deploy/k8s/overlays").join(overlay));
        let services: Vec<_> = of_kind(&objects, "Service")
            .into_iter()
            .filter(|s| selects(selector, &s["metadata"]["labels"]))
            .collect();
        assert_eq!(
            services.len(),
            1,
            "{overlay}: the ServiceMonitor must select one Service"
        );
        let (workload, _) = workload(&objects);
        let annotations = &workload["spec"]["template"]["metadata"]["annotations"];
        for endpoint in endpoints {
            assert!(
                list(services[0], "/spec/ports")
                    .iter()
                    .any(|p| p["name"] == endpoint["port"]),
                "{overlay}: ServiceMonitor port {} is not a port name of the Service",
                endpoint["port"]
            );
            assert_eq!(
                endpoint["path"], annotations["prometheus.io/path"],
                "{overlay}: ServiceMonitor path vs prometheus.io/path"
            );
        }
    }
}
