//! Load generator for `scripts/bench-mqtt` (not a test): publishes N QoS 1 messages of one
//! reading (4 metrics) each, pipelined, and waits until the broker has PUBACKed them all.
//!
//! ```text
//! cargo run --release --example mqtt_publish -- <port> <count> [devices] [inflight] [rate]
//! ```
//!
//! `rate` paces publishing to that many messages per second (0, the default: as fast as the
//! broker takes them). Prints one line: `published=<n> secs=<s> rate=<msg/s> broker_puback_p50_ms=.. p99_ms=..`.
//! The broker's PUBACK only says the broker has the message; Sluice's own acks are measured by
//! the script from Sluice's metrics.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: u64| -> u64 {
        args.get(i)
            .map(|a| a.parse().expect("numeric argument"))
            .unwrap_or(default)
    };
    if args.len() < 2 {
        eprintln!("usage: mqtt_publish <port> <count> [devices=100] [inflight=1000] [rate=0]");
        std::process::exit(2);
    }
    let port = arg(0, 1883) as u16;
    let count = arg(1, 100_000);
    let devices = arg(2, 100).max(1);
    let inflight = arg(3, 1000).clamp(1, u16::MAX as u64) as u16;
    let rate = arg(4, 0);

    let mut options = MqttOptions::new(
        format!("bench-pub-{}", std::process::id()),
        "127.0.0.1",
        port,
    );
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(inflight);
    let (client, mut eventloop) = AsyncClient::new(options, inflight as usize);

    let started = Instant::now();
    let publisher = tokio::spawn(async move {
        // Paced: every millisecond, publish what the rate allows so far.
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        let start = tokio::time::Instant::now();
        for seq in 0..count {
            if rate > 0 {
                while seq * 1000 >= rate * start.elapsed().as_millis() as u64 + rate {
                    tick.tick().await;
                }
            }
            let device = seq % devices;
            let payload = format!(
                r#"{{"seq":{seq},"metrics":{{"temperature":{t:.1},"humidity":{h},"door_open":{d},"battery":3.3}}}}"#,
                t = 20.0 + (seq % 50) as f64 / 10.0,
                h = 30 + seq % 40,
                d = seq % 2 == 0,
            );
            client
                .publish(
                    format!("devices/bench-{device}/readings"),
                    QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await
                .expect("queue publish");
        }
        client
    });

    let mut sent: HashMap<u16, Instant> = HashMap::new();
    let mut latencies = Vec::with_capacity(count as usize);
    while (latencies.len() as u64) < count {
        match eventloop.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                sent.insert(pkid, Instant::now());
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(t) = sent.remove(&ack.pkid) {
                    latencies.push(t.elapsed());
                }
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("mqtt_publish: connection failed: {e}");
                std::process::exit(1);
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let _client = publisher.await.expect("publisher task");
    latencies.sort();
    let pct = |p: f64| {
        latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_secs_f64()
            * 1000.0
    };
    println!(
        "published={count} secs={secs:.3} rate={:.0} broker_puback_p50_ms={:.2} broker_puback_p99_ms={:.2}",
        count as f64 / secs,
        pct(0.50),
        pct(0.99)
    );
}
