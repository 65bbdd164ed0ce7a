// Sluice status page: polls GET /v1/status every second, keeps a bounded history for the
// charts, and tails committed readings over the /v1/live WebSocket. Served from the binary
// (src/api/status.rs); no build step, no dependency but the vendored uPlot.
"use strict";

(() => {
  /** Poll period of /v1/status. */
  const POLL_MS = 1000;
  /** A poll that takes longer than this counts as a failure. */
  const POLL_TIMEOUT_MS = 2500;
  /** Points kept per chart: 5 minutes at one a second. Older points are dropped. */
  const HISTORY = 300;
  /** Rows kept in the live tail. */
  const TAIL_ROWS = 100;
  /** The tail is drawn at most this often; readings arriving faster are counted, not drawn. */
  const TAIL_RENDER_MS = 250;
  /** Wait before reopening a closed live stream. */
  const TAIL_RETRY_MS = 1000;

  const $ = (id) => document.getElementById(id);
  const TRANSPORTS = ["http", "ws", "mqtt"];
  const COLORS = { http: "#4e79a7", ws: "#f28e2b", mqtt: "#59a14f", total: "#1d2330",
                   shed: "#c53030", rejected: "#b7791f", limited: "#7b61ff",
                   p50: "#4e79a7", p99: "#c53030", busy: "#59a14f", lag: "#f28e2b" };

  // ---- formatting ---------------------------------------------------------------------

  function fmtNum(n) {
    if (n === null || n === undefined || Number.isNaN(n)) return "–";
    const a = Math.abs(n);
    if (a >= 1e6) return (n / 1e6).toFixed(a >= 1e7 ? 1 : 2) + " M";
    if (a >= 1e4) return (n / 1e3).toFixed(1) + " k";
    if (a >= 100 || Number.isInteger(n)) return n.toFixed(0);
    if (a >= 10) return n.toFixed(1);
    return n.toFixed(n === 0 ? 0 : 2);
  }
  function fmtMs(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const ms = seconds * 1000;
    return (ms >= 100 ? ms.toFixed(0) : ms >= 10 ? ms.toFixed(1) : ms.toFixed(2)) + " ms";
  }
  function fmtAgo(fromIso, nowIso) {
    const d = (Date.parse(nowIso) - Date.parse(fromIso)) / 1000;
    if (!Number.isFinite(d)) return fromIso;
    if (d < 1) return "now";
    if (d < 90) return d.toFixed(0) + " s ago";
    if (d < 5400) return (d / 60).toFixed(0) + " min ago";
    if (d < 172800) return (d / 3600).toFixed(0) + " h ago";
    return (d / 86400).toFixed(0) + " days ago";
  }
  function fmtValue(v) {
    if (typeof v === "number") return Number.isInteger(v) ? String(v) : String(+v.toPrecision(6));
    return String(v);
  }
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // ---- charts: fixed-length history, uPlot --------------------------------------------

  /** A chart with `series` names, fed one point per poll, at most HISTORY points. */
  function makeChart(id, series, opts = {}) {
    const root = $(id);
    const data = [[]].concat(series.map(() => []));
    let plot = null;
    function size() { return { width: Math.max(root.clientWidth, 200), height: 160 }; }
    function create() {
      if (plot || typeof uPlot === "undefined") return;
      plot = new uPlot({
        ...size(),
        scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(max, opts.minMax || 1)] } },
        axes: [{}, { size: 56, values: (u, vals) => vals.map((v) => fmtNum(v)) }],
        series: [{}].concat(series.map((s) => ({
          label: s.label, stroke: s.color, width: 1.5, dash: s.dash,
          value: (u, v) => (v === null || v === undefined ? "–" : fmtNum(v)),
        }))),
        legend: { live: true },
      }, data, root);
    }
    new ResizeObserver(() => { if (plot) plot.setSize(size()); }).observe(root);
    return {
      push(t, values) {
        data[0].push(t);
        values.forEach((v, i) => data[i + 1].push(v));
        if (data[0].length > HISTORY) data.forEach((col) => col.shift());
        create();
        if (plot) plot.setData(data);
      },
    };
  }

  const charts = {
    rates: makeChart("chart-rates", [
      { label: "total", color: COLORS.total, dash: [5, 3] },
      { label: "http", color: COLORS.http },
      { label: "ws", color: COLORS.ws },
      { label: "mqtt", color: COLORS.mqtt },
    ]),
    refused: makeChart("chart-refused", [
      { label: "shed", color: COLORS.shed },
      { label: "rejected", color: COLORS.rejected },
      { label: "rate-limited", color: COLORS.limited },
    ]),
    commit: makeChart("chart-commit", [
      { label: "p50", color: COLORS.p50 },
      { label: "p99", color: COLORS.p99 },
    ]),
    loop: makeChart("chart-loop", [
      { label: "busy %", color: COLORS.busy },
      { label: "lag p99 ms", color: COLORS.lag },
    ], { minMax: 10 }),
  };

  // ---- connection state ---------------------------------------------------------------

  let connected = null;
  function setConnected(ok, why) {
    const conn = $("conn");
    if (ok) {
      conn.dataset.state = "connected";
      conn.textContent = "connected";
      $("banner").hidden = true;
      if (connected === false) openTail(); // back after a restart: resume the tail at once
    } else {
      conn.dataset.state = "disconnected";
      conn.textContent = "disconnected";
      $("banner-why").textContent = why;
      $("banner").hidden = false;
      const ready = $("ready");
      ready.dataset.state = "unknown";
      ready.textContent = "readiness unknown";
    }
    connected = ok;
  }

  // ---- rendering of one /v1/status answer ---------------------------------------------

  function sumRates(s, key) {
    let sum = 0;
    let any = false;
    for (const t of TRANSPORTS) {
      const ps = s.transports[t] && s.transports[t].per_second;
      if (ps && ps[key] !== null && ps[key] !== undefined) { sum += ps[key]; any = true; }
    }
    return any ? sum : null;
  }

  function setValue(id, v, text) {
    const e = $(id);
    e.dataset.value = v === null ? "" : String(v);
    e.textContent = text !== undefined ? text : fmtNum(v);
  }

  function pairs(dl, rows) {
    dl.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", "", k), el("dd", "", v)]));
  }

  function render(s) {
    const ready = $("ready");
    ready.dataset.state = s.ready ? "ready" : "not-ready";
    ready.textContent = s.ready ? "ready" : "not ready: " + s.not_ready_reason;
    $("updated").textContent = "updated " + s.time.slice(11, 19) + " UTC";

    const windowed = s.window_seconds !== null;
    const total = sumRates(s, "accepted");
    setValue("rate-total", total);
    $("rate-received").textContent = windowed
      ? fmtNum(sumRates(s, "received")) + " received/s, " + fmtNum(sumRates(s, "duplicate")) + " duplicates/s"
      : "measuring…";
    for (const t of TRANSPORTS) {
      const ps = s.transports[t].per_second;
      setValue("rate-" + t, ps ? ps.accepted : null);
    }
    setValue("rate-shed", sumRates(s, "shed"));
    setValue("rate-rejected", sumRates(s, "rejected"));
    const limited = sumRates(s, "rate_limited");
    setValue("rate-limited", limited, limited === null ? "n/a" : fmtNum(limited));
    setValue("device-count", s.devices.count);

    if (windowed) {
      const t = Date.parse(s.time) / 1000;
      const ps = (tr) => s.transports[tr].per_second.accepted;
      charts.rates.push(t, [total, ps("http"), ps("ws"), ps("mqtt")]);
      charts.refused.push(t, [sumRates(s, "shed"), sumRates(s, "rejected"), limited]);
      const ms = (v) => (v === null ? null : v * 1000);
      charts.commit.push(t, [ms(s.commits.p50_seconds), ms(s.commits.p99_seconds)]);
      const ev = s.event_loop;
      charts.loop.push(t, ev
        ? [ev.busy_ratio === null ? null : ev.busy_ratio * 100, ms(ev.lag_p99_seconds)]
        : [null, null]);
    }

    const queues = $("queues");
    queues.replaceChildren(...Object.entries(s.queues).map(([stage, q]) => {
      const bar = el("div", "bar");
      const pct = Math.min(100, q.fill * 100);
      bar.append(el("div", "", `${stage}: ${fmtNum(q.depth)} of ${fmtNum(q.capacity)} (${pct.toFixed(1)} %)`));
      const track = el("div", "track");
      const fill = el("div", "fill" + (pct >= 80 ? " bad" : pct >= 50 ? " warn" : ""));
      fill.style.width = pct + "%";
      track.append(fill);
      bar.append(track);
      bar.dataset.stage = stage;
      return bar;
    }));
    if (s.store.journal_readings !== null && s.store.journal_capacity_readings) {
      const j = s.store.journal_readings / s.store.journal_capacity_readings * 100;
      const bar = el("div", "bar");
      bar.append(el("div", "", `journal (not yet compacted): ${fmtNum(s.store.journal_readings)} of ${fmtNum(s.store.journal_capacity_readings)} (${j.toFixed(1)} %)`));
      const track = el("div", "track");
      const fill = el("div", "fill" + (j >= 80 ? " bad" : j >= 50 ? " warn" : ""));
      fill.style.width = Math.min(100, j) + "%";
      track.append(fill);
      bar.append(track);
      queues.append(bar);
    }

    const c = s.connections;
    pairs($("connections"), [
      ["device WebSockets", fmtNum(c.ws_device)],
      ["live streams", fmtNum(c.ws_live)],
      ["HTTP", c.http === null ? "n/a" : fmtNum(c.http)],
      ["MQTT", c.mqtt_enabled ? (c.mqtt_connected ? "connected" : "disconnected") : "off"],
    ]);
    const ev = s.event_loop;
    pairs($("store"), [
      ["store", s.store.up ? "up" : "down"],
      ["store errors", fmtNum(s.store.errors_total)],
      ["commits/s", windowed && s.commits.in_window !== null ? fmtNum(s.commits.in_window / s.window_seconds) : "–"],
      ["commit p50 / p99", fmtMs(s.commits.p50_seconds) + " / " + fmtMs(s.commits.p99_seconds)],
      ["workers busy", ev && ev.busy_ratio !== null ? (ev.busy_ratio * 100).toFixed(1) + " % of " + ev.workers : "–"],
      ["lag mean / p99", ev ? fmtMs(ev.lag_mean_seconds) + " / " + fmtMs(ev.lag_p99_seconds) : "off"],
    ]);

    const alerts = s.alerts;
    $("alerts-card").hidden = alerts === null;
    if (alerts) {
      const items = alerts.firing.map((r) => el("li", "", "firing: " + r))
        .concat(alerts.pending.map((r) => el("li", "muted", "pending: " + r)));
      $("alerts").replaceChildren(...(items.length ? items : [el("li", "muted", "none firing")]));
    }

    const tbody = $("recent-devices").tBodies[0];
    tbody.replaceChildren(...s.devices.recent.map((d) => {
      const tr = el("tr");
      tr.dataset.device = d.device_id;
      tr.append(el("td", "dev", d.device_id), el("td", "", fmtAgo(d.last_seen, s.time)));
      const td = el("td");
      for (const [k, v] of Object.entries(d.metrics).slice(0, 12)) {
        td.append(el("span", "chip", k + "=" + fmtValue(v)));
      }
      tr.append(td);
      return tr;
    }));
    $("recent-empty").hidden = s.devices.recent.length > 0;
  }

  // ---- token (auth.mode = "token": the page asks for a read token) -----------------------

  /** A read token, kept for this tab only (sessionStorage), or "" with auth off. */
  function token() {
    return sessionStorage.getItem("sluice-token") || "";
  }

  /** Whether the operator already declined to give a token: asked once per page load. */
  let tokenDeclined = false;

  /** Asks for a read token after a 401; false when the operator gave none. */
  function askToken() {
    if (tokenDeclined) return false;
    const t = window.prompt("This Sluice needs a read token (auth.mode = \"token\"):", "");
    if (!t) {
      tokenDeclined = true;
      return false;
    }
    sessionStorage.setItem("sluice-token", t.trim());
    return true;
  }

  // ---- polling ------------------------------------------------------------------------

  async function poll() {
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), POLL_TIMEOUT_MS);
    try {
      const headers = token() ? { Authorization: "Bearer " + token() } : {};
      const res = await fetch("/v1/status", { cache: "no-store", signal: ctrl.signal, headers });
      if (res.status === 401 || res.status === 403) {
        sessionStorage.removeItem("sluice-token");
        if (askToken()) openTail();
      }
      if (!res.ok) throw new Error("GET /v1/status answered " + res.status);
      const s = await res.json();
      setConnected(true);
      render(s);
    } catch (e) {
      setConnected(false, e.name === "AbortError" ? "no answer within " + POLL_TIMEOUT_MS / 1000 + " s" : "cannot reach the server");
    } finally {
      clearTimeout(timer);
      setTimeout(poll, POLL_MS);
    }
  }

  // ---- live tail ----------------------------------------------------------------------

  let tailWs = null;
  let tailRetry = null;
  let tailFilter = "";
  let tailPaused = false;
  /** Raw messages waiting to be drawn, newest last, at most TAIL_ROWS. */
  let pending = [];
  let notDrawn = 0;
  let missed = 0;

  function tailState(state, text) {
    const e = $("tail-state");
    e.dataset.state = state;
    e.dataset.filter = tailFilter;
    e.textContent = text || state;
  }

  function closeTail() {
    clearTimeout(tailRetry);
    if (tailWs) {
      tailWs.onclose = null;
      tailWs.close();
      tailWs = null;
    }
  }

  function openTail() {
    closeTail();
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const params = [];
    if (tailFilter) params.push("device=" + encodeURIComponent(tailFilter));
    if (token()) params.push("token=" + encodeURIComponent(token()));
    const query = params.length ? "?" + params.join("&") : "";
    const ws = new WebSocket(proto + "//" + location.host + "/v1/live" + query);
    tailWs = ws;
    tailState("connecting", "connecting…");
    ws.onopen = () => tailState("open", "streaming");
    ws.onmessage = (ev) => {
      pending.push(ev.data);
      if (pending.length > TAIL_ROWS) {
        notDrawn += pending.length - TAIL_ROWS;
        pending = pending.slice(-TAIL_ROWS);
      }
    };
    ws.onclose = () => {
      if (tailWs !== ws) return;
      tailWs = null;
      tailState("closed", "closed, reconnecting…");
      tailRetry = setTimeout(openTail, TAIL_RETRY_MS);
    };
  }

  function drawTail() {
    if (pending.length) {
      const list = $("tail");
      const rows = [];
      for (const raw of pending) {
        let m;
        try { m = JSON.parse(raw); } catch { continue; }
        if (m.type === "lagged") {
          missed += m.missed;
          rows.push(el("li", "lagged", `… ${m.missed} readings missed: the stream ran ahead of this page`));
          continue;
        }
        if (m.type !== "reading") continue;
        const li = el("li");
        li.dataset.device = m.device_id;
        li.append(el("span", "", m.ts.slice(11, 23) + " "), el("span", "dev", m.device_id), " ");
        for (const [k, v] of Object.entries(m.metrics)) li.append(el("span", "chip", k + "=" + fmtValue(v)));
        rows.push(li);
      }
      pending = [];
      list.prepend(...rows.reverse());
      while (list.childElementCount > TAIL_ROWS) list.lastElementChild.remove();
    }
    const note = [];
    if (notDrawn) note.push(`${fmtNum(notDrawn)} readings arrived faster than drawn and were skipped`);
    if (missed) note.push(`${fmtNum(missed)} missed by the server's live buffer`);
    $("tail-note").textContent = note.join("; ");
  }

  let filterTimer = null;
  $("tail-filter").addEventListener("input", (ev) => {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(() => {
      const glob = ev.target.value.trim();
      if (glob === tailFilter) return;
      tailFilter = glob;
      pending = [];
      notDrawn = 0;
      missed = 0;
      $("tail").replaceChildren();
      if (!tailPaused) openTail();
    }, 300);
  });
  // Pausing closes the stream, so a paused tab costs Sluice nothing; resuming reopens it.
  $("tail-pause").addEventListener("click", () => {
    tailPaused = !tailPaused;
    $("tail-pause").textContent = tailPaused ? "Resume" : "Pause";
    if (tailPaused) {
      closeTail();
      tailState("paused", "paused");
    } else {
      openTail();
    }
  });

  poll();
  openTail();
  setInterval(drawTail, TAIL_RENDER_MS);
})();
