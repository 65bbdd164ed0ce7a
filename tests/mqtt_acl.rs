//! The broker ACL of the README ("The broker authenticates devices"), on a private Mosquitto with
//! a password file and an ACL file: each device may publish only to
//! `devices/<its user name>/readings`, and Sluice, with a user of its own, reads them all.
//! Sluice trusts the topic's device id; this is what makes that safe.

mod common;
#[path = "common/mqtt_broker.rs"]
mod mqtt_broker;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{spawn_app_with, wait_until};
use mqtt_broker::{client_id, mosquitto_pub, Mosquitto};
use sluice::config::Secret;

/// The README's ACL file, as is.
const ACL: &str = "\
# Sluice's own user: reads every device's readings (also through $share/<group>/...),
# and writes dead letters and alert events.
user sluice
topic read devices/+/readings
topic write sluice/rejected/#
topic write sluice/alerts/#

# Every other user is a device: it may publish to its own topic only.
pattern write devices/%u/readings
";

/// Creates the password file with `mosquitto_passwd -b` (hashed, as the broker expects).
fn password_file(dir: &Path, users: &[(&str, &str)]) -> std::path::PathBuf {
    let path = dir.join("passwd");
    for (i, (user, password)) in users.iter().enumerate() {
        let mut cmd = Command::new("/usr/bin/mosquitto_passwd");
        if i == 0 {
            cmd.arg("-c");
        }
        let status = cmd
            .arg("-b")
            .arg(&path)
            .args([user, password])
            .status()
            .expect("run mosquitto_passwd (apt-get install mosquitto)");
        assert!(status.success(), "mosquitto_passwd {user}");
    }
    path
}

/// A payload of one reading; the device id comes from the topic.
fn reading(seq: u64) -> Vec<u8> {
    format!(r#"{{"seq":{seq},"metrics":{{"t":{seq}}}}}"#).into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_binds_each_device_to_its_own_topic() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // The broker drops root for its own user, which must read both files.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let passwd = password_file(
        dir.path(),
        &[
            ("sluice", "sluice-pw"),
            ("dev-a", "a-pw"),
            ("dev-b", "b-pw"),
        ],
    );
    let acl = dir.path().join("acl");
    std::fs::write(&acl, ACL).unwrap();
    for f in [&passwd, &acl] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let broker = Mosquitto::start(
        false,
        &format!(
            "allow_anonymous false\npassword_file {}\nacl_file {}\nlog_type all\n",
            passwd.display(),
            acl.display()
        ),
    );

    let url = broker.url();
    let app = spawn_app_with(|s| {
        s.mqtt.enabled = true;
        s.mqtt.url = url;
        s.mqtt.client_id = client_id("sluice");
        s.mqtt.keep_alive = Duration::from_secs(5);
        s.mqtt.username = Some("sluice".into());
        s.mqtt.password = Some(serde_json::from_value::<Secret>("sluice-pw".into()).unwrap());
    })
    .await;
    // Connected *and* subscribed: the broker granted Sluice's shared subscription.
    wait_until(Duration::from_secs(10), "sluice subscribed", || async {
        app.metric("sluice_mqtt_connected", &[]).await == 1.0
    })
    .await;

    let pubs = |user: &'static str, password: &'static str, device: &str, seq: u64| {
        mosquitto_pub(
            broker.port,
            &["-u", user, "-P", password],
            &format!("devices/{device}/readings"),
            &[reading(seq)],
        )
    };
    // Unknown clients are refused outright.
    assert!(!mosquitto_pub(
        broker.port,
        &[],
        "devices/dev-a/readings",
        &[reading(99)]
    ));
    assert!(!pubs("dev-a", "wrong", "dev-a", 99));

    assert!(pubs("dev-a", "a-pw", "dev-a", 1));
    // dev-a claims to be dev-b: MQTT 3.1.1 has no way to refuse a PUBLISH, so the broker
    // acknowledges it and delivers it to no one.
    assert!(pubs("dev-a", "a-pw", "dev-b", 1));
    assert!(pubs("dev-a", "a-pw", "dev-a", 2));
    // Messages reach Sluice in the broker's order: once dev-a's second reading is stored, the
    // forged one would have been too.
    wait_until(Duration::from_secs(10), "dev-a's own readings", || async {
        app.stored_seqs("dev-a").await == BTreeSet::from([1, 2])
    })
    .await;
    assert!(app.stored_seqs("dev-b").await.is_empty());
    // dev-b's own reading is stored, and only it.
    assert!(pubs("dev-b", "b-pw", "dev-b", 7));
    wait_until(Duration::from_secs(10), "dev-b's own reading", || async {
        !app.stored_seqs("dev-b").await.is_empty()
    })
    .await;
    assert_eq!(app.stored_seqs("dev-b").await, BTreeSet::from([7]));
    assert!(
        broker.log().contains("Denied PUBLISH from"),
        "the broker logs the forged publish: {}",
        broker.log()
    );
    app.shutdown().await.expect("graceful shutdown");
}
