"""Builds CBOR and SenML bodies with the Python `cbor2` library (tests/cbor.rs, tests/senml.rs),
independently of Sluice's own encoder.

    cbor_bodies.py cbor <now ms> <device prefix>
    cbor_bodies.py senml <device prefix>

Prints one JSON object. In it, every body is hex: {"name": {"body": "<hex>", ...}}; for the
CBOR bodies, "expected" lists the readings Sluice should store, as the query API gives them
back (device_id, ts_ms, seq, metrics, tags).
"""

import json
import base64
import math
import sys
from datetime import datetime, timedelta, timezone

import cbor2

mode = sys.argv[1]


def hexed(b):
    return b.hex()


def expect(device, ts_ms, seq, metrics, tags=None):
    return {"device_id": device, "ts_ms": ts_ms, "seq": seq, "metrics": metrics, "tags": tags or {}}


if mode == "cbor":
    now_ms, prefix = int(sys.argv[2]), sys.argv[3]
    out = {}

    # An array of readings: every value kind, the integer extremes, and three forms of ts.
    dev = f"{prefix}-types"
    t1 = now_ms - 60_000
    t2 = now_ms - 50_000
    t3 = now_ms - 40_000
    metrics1 = {
        "u64max": 2**64 - 1,
        "i64min": -(2**63),
        "temp": 21.5,
        "tiny": 5e-324,
        "huge": 1e300,
        "one": 1.0,
        "neg": -3,
        "on": True,
        "off": False,
    }
    readings = [
        {
            "device_id": dev,
            # A timezone-aware datetime: cbor2 sends tag 0 with an RFC 3339 string.
            "ts": datetime.fromtimestamp(t1 / 1000, tz=timezone.utc),
            "seq": 1,
            "metrics": metrics1,
            "tags": {"site": "north", "unit": "°C"},
        },
        # ts as integer epoch milliseconds, as in JSON.
        {"device_id": dev, "ts": t2, "seq": 2, "metrics": {"ratio": 0.1, "zero": 0}},
        # ts as tag 1, epoch seconds (a float).
        {"device_id": dev, "ts": cbor2.CBORTag(1, t3 / 1000), "seq": 18446744073709551615, "metrics": {"x": -1.25}},
    ]
    out["array"] = {
        "body": hexed(cbor2.dumps(readings)),
        "expected": [
            expect(dev, t1, 1, metrics1, {"site": "north", "unit": "°C"}),
            expect(dev, t2, 2, {"ratio": 0.1, "zero": 0}),
            expect(dev, t3, 18446744073709551615, {"x": -1.25}),
        ],
    }

    # One reading, canonical (shortest) encoding: 1.5 goes as a half-precision float.
    dev = f"{prefix}-single"
    out["single"] = {
        "body": hexed(cbor2.dumps({"device_id": dev, "ts": now_ms - 30_000, "seq": 7, "metrics": {"h": 1.5, "s": 100000.5}}, canonical=True)),
        "expected": [expect(dev, now_ms - 30_000, 7, {"h": 1.5, "s": 100000.5})],
    }

    # An envelope, as a WebSocket frame carries it (HTTP takes it too and ignores the id).
    dev = f"{prefix}-env"
    out["envelope"] = {
        "body": hexed(cbor2.dumps({"id": "req-1", "readings": [{"device_id": dev, "ts": now_ms - 20_000, "seq": 1, "metrics": {"v": 1}}]})),
        "expected": [expect(dev, now_ms - 20_000, 1, {"v": 1})],
    }

    # Values JSON cannot carry reject their reading by index; neighbours are stored.
    dev = f"{prefix}-mixed"
    mixed = [
        {"device_id": dev, "ts": now_ms - 10_000, "seq": 1, "metrics": {"ok": 1}},
        {"device_id": dev, "ts": now_ms - 9_000, "seq": 2, "metrics": {"t": math.nan}},
        {"device_id": dev, "ts": now_ms - 8_000, "seq": 3, "metrics": {"t": b"\x01\x02"}},
        {"device_id": dev, "ts": now_ms - 7_000, "seq": 4, "metrics": {"t": math.inf}},
        {"device_id": dev, "ts": now_ms - 6_000, "seq": 5, "metrics": {"t": 2**64}},
        {"device_id": dev, "ts": now_ms - 5_000, "seq": 6, "metrics": {"ok": 6}},
    ]
    out["mixed"] = {
        "body": hexed(cbor2.dumps(mixed)),
        "expected": [
            expect(dev, now_ms - 10_000, 1, {"ok": 1}),
            expect(dev, now_ms - 5_000, 6, {"ok": 6}),
        ],
    }

    # Bodies that are not CBOR: cut short, nested 10 000 deep, an indefinite map never ended.
    whole = cbor2.dumps([{"device_id": f"{prefix}-bad", "metrics": {"v": 1}}])
    out["truncated"] = {"body": hexed(whole[:-3])}
    out["deep"] = {"body": hexed(b"\x81" * 10_000 + b"\x00")}
    out["unterminated_map"] = {"body": hexed(b"\xbf" + cbor2.dumps("device_id") + cbor2.dumps(f"{prefix}-bad"))}

    # WebSocket frames on a connection bound to one device (no device_id in the readings): two
    # good ones, three that are not CBOR (cut short, too deep, an unended map), one whose
    # envelope id is too long.
    dev = f"{prefix}-ws"
    out["ws"] = {
        "device": dev,
        "frames": [
            hexed(cbor2.dumps({"ts": now_ms - 3_000, "seq": 1, "metrics": {"u": 2**64 - 1, "i": -(2**63)}})),
            hexed(cbor2.dumps({"id": "frame-2", "readings": [
                {"ts": now_ms - 2_000, "seq": 2, "metrics": {"f": 0.25, "b": True}, "tags": {"k": "v"}},
                {"ts": now_ms - 1_000, "seq": 3, "metrics": {"f": math.nan}},
            ]})),
            hexed(cbor2.dumps({"id": "frame-3", "readings": [{"seq": 4, "metrics": {"x": 1}}] * 3})[:-2]),
            hexed(b"\x81" * 10_000 + b"\x00"),
            hexed(b"\xbf" + cbor2.dumps("seq") + cbor2.dumps(9)),
            # Well-formed CBOR, but an envelope id over 64 characters.
            hexed(cbor2.dumps({"id": "x" * 65, "readings": [{"seq": 5, "metrics": {"x": 1}}]})),
        ],
        "expected": [
            expect(dev, now_ms - 3_000, 1, {"u": 2**64 - 1, "i": -(2**63)}),
            expect(dev, now_ms - 2_000, 2, {"f": 0.25, "b": True}, {"k": "v"}),
        ],
    }
    print(json.dumps(out))

elif mode == "senml":
    prefix = sys.argv[2]
    # RFC 8428's integer labels (§6, Table 4).
    LABELS = {"bver": -1, "bn": -2, "bt": -3, "bu": -4, "bv": -5, "bs": -6, "n": 0, "u": 1, "v": 2, "vs": 3, "vb": 4, "s": 5, "t": 6, "ut": 7, "vd": 8}

    def senml_cbor(pack):
        records = []
        for r in pack:
            rec = {}
            for k, v in r.items():
                if k == "vd":
                    # SenML-CBOR carries data values as byte strings (RFC 8428 §6).
                    v = base64.urlsafe_b64decode(v + "=" * (-len(v) % 4))
                rec[LABELS.get(k, k)] = v
            records.append(rec)
        return cbor2.dumps(records)

    # RFC 8428 §5.1, verbatim (the JSON texts of the RFC).
    rfc = {
        "5.1.1": '[{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","v":23.1}]',
        "5.1.2": '[{"bn":"urn:dev:ow:10e2073a01080063:","n":"voltage","u":"V","v":120.1},'
                 '{"n":"current","u":"A","v":1.2}]',
        "5.1.2-timed": '[{"bn":"urn:dev:ow:10e2073a0108006:","bt":1.276020076001e+09,'
                       '"bu":"A","bver":5,"n":"voltage","u":"V","v":120.1},'
                       '{"n":"current","t":-5,"v":1.2},{"n":"current","t":-4,"v":1.3},'
                       '{"n":"current","t":-3,"v":1.4},{"n":"current","t":-2,"v":1.5},'
                       '{"n":"current","t":-1,"v":1.6},{"n":"current","v":1.7}]',
        "5.1.3": '[{"bn":"urn:dev:ow:10e2073a01080063","bt":1.320067464e+09,"bu":"%RH","v":20},'
                 '{"u":"lon","v":24.30621},{"u":"lat","v":60.07965},'
                 '{"t":60,"v":20.3},{"u":"lon","t":60,"v":24.30622},{"u":"lat","t":60,"v":60.07965},'
                 '{"t":120,"v":20.7},{"u":"lon","t":120,"v":24.30623},{"u":"lat","t":120,"v":60.07966},'
                 '{"u":"%EL","t":150,"v":98},'
                 '{"t":180,"v":21.2},{"u":"lon","t":180,"v":24.30628},{"u":"lat","t":180,"v":60.07967}]',
        "5.1.5": '[{"bn":"urn:dev:ow:10e2073a01080063:","n":"temp","u":"Cel","v":23.1},'
                 '{"n":"label","vs":"Machine Room"},{"n":"open","vb":false},'
                 '{"n":"nfc-reader","vd":"aGkgCg"}]',
        "5.1.6": '[{"bn":"2001:db8::2/","bt":1.320078429e+09,"n":"temperature","u":"Cel","v":25.2},'
                 '{"n":"humidity","u":"%RH","v":30},'
                 '{"bn":"2001:db8::1/","n":"temperature","u":"Cel","v":12.3},'
                 '{"n":"humidity","u":"%RH","v":67}]',
    }

    def with_device(pack, device):
        """The same pack with `<device>/` in front of every resolved name (names with no `/`
        need a device bound by the transport, and HTTP binds none): in front of each base name,
        or of each name when the pack has no base name."""
        label = "bn" if any("bn" in r for r in pack) else "n"
        return [dict(r, **{label: f"{device}/{r[label]}"}) if label in r else dict(r) for r in pack]

    out = {}
    for name, text in rfc.items():
        pack = json.loads(text)
        device = f"{prefix}-{name.replace('.', '-')}"
        entry = {"json": text, "cbor": hexed(senml_cbor(pack))}
        if name != "5.1.6":
            prefixed = with_device(pack, device)
            entry.update(device=device, json_dev=json.dumps(prefixed), cbor_dev=hexed(senml_cbor(prefixed)))
        out[name] = entry

    # Bad packs, each beside valid records.
    d = f"{prefix}-bad"
    bad = {
        "mixed_bver": [{"bver": 5, "n": f"{d}/a", "v": 1}, {"bver": 10, "n": f"{d}/b", "v": 2}],
        "must_understand": [{"n": f"{d}/a", "v": 1}, {"n": f"{d}/b", "v": 2, "crit_": True}],
        "vs_only": [{"n": f"{d}/a", "t": -2, "v": 1}, {"n": f"{d}/label", "t": -2, "vs": "Machine Room"}, {"n": f"{d}/b", "t": -2, "vb": True}],
        "relative": [{"bn": f"{d}/", "n": "rel", "t": -10, "v": 10}],
    }
    for name, pack in bad.items():
        out[name] = {"json": json.dumps(pack), "cbor": hexed(senml_cbor(pack))}
    print(json.dumps(out))
else:
    sys.exit(f"unknown mode {mode}")
