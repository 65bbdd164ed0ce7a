"""Writes points to Sluice with the official InfluxDB Python clients (tests/influx.rs).

    influx_write.py v2|v1 <base url> <now ms> <device prefix>

Writes tags, every field type and every precision the client offers, then prints one JSON
object: {"expected": [readings as Sluice should store them], "partial": {...}} where
"partial" is what the server answered to a batch with one bad line.
"""

import json
import sys

mode, base, now_ms, prefix = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
expected = []


def expect(device, ts_ms, metrics, tags, seq=None):
    expected.append(
        {"device_id": device, "ts_ms": ts_ms, "seq": seq, "metrics": metrics, "tags": tags}
    )


if mode == "v2":
    from influxdb_client import InfluxDBClient, Point, WritePrecision
    from influxdb_client.client.write_api import SYNCHRONOUS
    from influxdb_client.rest import ApiException

    client = InfluxDBClient(url=base, token="unused", org="sluice")
    write = client.write_api(write_options=SYNCHRONOUS)
    # One point per precision; the client converts the time to the unit it asks for.
    units = [
        (WritePrecision.NS, 1_000_000),
        (WritePrecision.US, 1_000),
        (WritePrecision.MS, 1),
        (WritePrecision.S, 1),
    ]
    for i, (precision, per_ms) in enumerate(units):
        device = f"{prefix}-v2-{precision}"
        ts_ms = now_ms - 60_000 + i * 1000
        if precision == WritePrecision.S:
            ts_ms = ts_ms // 1000 * 1000
            t = ts_ms // 1000
        else:
            t = ts_ms * per_ms + (per_ms - 1)  # sub-millisecond part: floored by Sluice
        p = (
            Point("env")
            .tag("device_id", device)
            .tag("site", "north, east=1")
            .field("temp", 21.5 + i)
            .field("count", -3 - i)
            .field("ok", i % 2 == 0)
            .field("note", "strings are ignored")
            .time(t, precision)
        )
        write.write(bucket="b", record=p, write_precision=precision)
        expect(
            device,
            ts_ms,
            {"env.temp": 21.5 + i, "env.count": -3 - i, "env.ok": i % 2 == 0},
            {"site": "north, east=1"},
        )
    # Raw line protocol through the client: an unsigned field and a seq.
    device = f"{prefix}-v2-raw"
    ts_ms = now_ms - 30_000
    write.write(
        bucket="b",
        record=f"m,device_id={device} u=18446744073709551615u,seq=42u {ts_ms}",
        write_precision=WritePrecision.MS,
    )
    expect(device, ts_ms, {"m.u": 18446744073709551615}, {}, seq=42)
    # A partial write: line 2 of 3 is bad; lines 1 and 3 are stored.
    ok_device = f"{prefix}-v2-partial"
    lines = [
        f"m,device_id={ok_device} v=1 {now_ms - 20_000}",
        f"m,device_id={ok_device} v=1.5i {now_ms - 19_000}",
        f"m,device_id={ok_device} v=3 {now_ms - 18_000}",
    ]
    partial = {}
    try:
        write.write(bucket="b", record="\n".join(lines), write_precision=WritePrecision.MS)
        partial = {"status": 204}
    except ApiException as e:
        partial = {"status": e.status, "body": json.loads(e.body)}
    expect(ok_device, now_ms - 20_000, {"m.v": 1.0}, {})
    expect(ok_device, now_ms - 18_000, {"m.v": 3.0}, {})
    client.close()
else:
    from urllib.parse import urlparse

    from influxdb import InfluxDBClient
    from influxdb.exceptions import InfluxDBClientError

    u = urlparse(base)
    client = InfluxDBClient(host=u.hostname, port=u.port, database="sluice")
    for i, precision in enumerate(["n", "u", "ms", "s", "m", "h"]):
        device = f"{prefix}-v1-{precision}"
        scale = {"n": 1_000_000, "u": 1_000, "ms": 1, "s": 1 / 1000, "m": 1 / 60_000, "h": 1 / 3_600_000}[precision]
        step = {"n": 1, "u": 1, "ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}[precision]
        ts_ms = (now_ms - 2 * 3_600_000) // step * step + i
        ts_ms = ts_ms // step * step
        t = int(ts_ms * scale) if scale >= 1 else ts_ms // step
        ok = client.write_points(
            [
                {
                    "measurement": "cpu",
                    "tags": {"host": device, "region": "eu"},
                    "time": t,
                    "fields": {"usage": 0.25 + i, "cores": 4 + i, "up": True},
                }
            ],
            time_precision=precision,
        )
        assert ok
        # The v1 client sends Python ints with the `i` suffix: integers in Sluice too.
        expect(device, ts_ms, {"cpu.usage": 0.25 + i, "cpu.cores": 4 + i, "cpu.up": True}, {"region": "eu"})
    partial = {}
    try:
        client.write_points(["bad line without fields"], protocol="line")
        partial = {"status": 204}
    except InfluxDBClientError as e:
        partial = {"status": e.code, "body": json.loads(e.content)}

print(json.dumps({"expected": expected, "partial": partial}))
