/* The dashboard page: polls dashboard/data (same origin, session cookie) every half window,
   at least every 0.5 s and at most every 5 s (the server's "poll"), and redraws. Counts are
   shown formatted (1.2k, 3.4M); the exact value is in data-value. Whatever goes wrong (no
   answer, an answer that is not the expected JSON, a drawing error), the page says
   "offline" and polls again. */
"use strict";

(() => {
  const PALETTE = ["#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777", "#4b5563", "#65a30d"];
  const RCODE_COLORS = { noerror: "#16a34a", nxdomain: "#ea580c", servfail: "#dc2626", refused: "#9333ea", formerr: "#ca8a04" };
  const LATENCY = [
    ["response/latency0_1", "< 1 ms"], ["response/latency1_10", "1–10 ms"], ["response/latency10_50", "10–50 ms"],
    ["response/latency50_100", "50–100 ms"], ["response/latency100_1000", "100 ms–1 s"], ["response/latency_slow", "≥ 1 s"],
  ];
  const PROTOCOLS = ["udp", "tcp", "dot", "doh", "doq", "dnscryptudp", "dnscrypttcp"];
  const TOPS = ["domains", "nxdomains", "clients", "tlds", "qtypes"];
  const RETRY_MS = 3000;
  const MAX_POINTS = 720; // the server's history: an hour, or 720 windows when they are shorter than 5 s

  const $ = (id) => document.getElementById(id);
  const state = { stream: "", scope: "window", data: null, timer: null, seq: 0 };

  function fmtCount(n) {
    if (n === null || n === undefined || Number.isNaN(n)) return "–";
    const abs = Math.abs(n);
    const units = [[1e9, "G"], [1e6, "M"], [1e3, "k"]];
    for (const [size, unit] of units) {
      if (abs >= size) {
        const v = n / size;
        return (Math.abs(v) < 10 ? v.toFixed(2) : Math.abs(v) < 100 ? v.toFixed(1) : v.toFixed(0)) + unit;
      }
    }
    return Number.isInteger(n) ? String(n) : n.toFixed(abs < 10 ? 2 : 1);
  }
  const fmtRate = (n) => fmtCount(n) + "/s";
  const fmtAge = (s) => (s < 90 ? Math.round(s) + " s" : s < 5400 ? Math.round(s / 60) + " min" : (s / 3600).toFixed(1) + " h");

  function setValue(id, value, format) {
    const node = $(id);
    node.dataset.value = String(value);
    node.textContent = (format || fmtCount)(value);
  }

  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }

  function legend(node, series) {
    node.replaceChildren();
    for (const s of series) {
      const item = document.createElement("span");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.backgroundColor = s.color;
      item.append(swatch, s.label || s.name);
      node.appendChild(item);
    }
  }

  function bars(node, groups) {
    node.replaceChildren();
    for (const [title, rows] of groups) {
      const h = document.createElement("h3");
      h.textContent = title;
      node.appendChild(h);
      const total = rows.reduce((sum, [, v]) => sum + v, 0);
      for (const [label, value] of rows) {
        const row = document.createElement("div");
        row.className = "row";
        const name = document.createElement("span");
        name.textContent = label;
        const track = document.createElement("span");
        track.className = "track";
        const fill = document.createElement("span");
        fill.className = "fill";
        fill.style.display = "block";
        fill.style.width = (total ? (100 * value) / total : 0).toFixed(1) + "%";
        track.appendChild(fill);
        const num = document.createElement("span");
        num.className = "num";
        num.dataset.value = String(value);
        num.textContent = total ? ((100 * value) / total).toFixed(1) + " %" : "–";
        num.title = fmtCount(value);
        row.append(name, track, num);
        node.appendChild(row);
      }
    }
  }

  function table(node, rows, key) {
    node.replaceChildren();
    if (!rows.length) {
      const tr = document.createElement("tr");
      cell(tr, "none yet", "none");
      node.appendChild(tr);
      return;
    }
    rows.forEach(([name, count], i) => {
      const tr = document.createElement("tr");
      tr.dataset.name = name;
      tr.dataset.value = String(count);
      cell(tr, String(i + 1), "n");
      cell(tr, name, "name");
      cell(tr, fmtCount(count), "n");
      node.appendChild(tr);
    });
    node.dataset.table = key;
  }

  function syncStreams(streams) {
    const select = $("stream");
    const wanted = ["", ...streams];
    const have = Array.from(select.options).map((o) => o.value);
    if (wanted.join("\n") !== have.join("\n")) {
      select.replaceChildren();
      for (const name of wanted) {
        const option = document.createElement("option");
        option.value = name;
        option.textContent = name || "All streams";
        select.appendChild(option);
      }
    }
    select.value = state.stream;
  }

  function renderStatus(data) {
    const status = $("status");
    const labels = { empty: "no traffic yet", live: "live", stale: "stale" };
    status.dataset.state = data.state;
    status.textContent = labels[data.state] || data.state;
    $("banner-empty").hidden = data.state !== "empty";
    $("banner-stale").hidden = data.state !== "stale";
    $("banner-offline").hidden = true;
    $("banner-signed-out").hidden = true;
    if (data.state === "stale" && data.last_window_age !== null) $("stale-age").textContent = fmtAge(data.last_window_age);
    $("updated").textContent = "updated " + new Date(data.now * 1000).toLocaleTimeString();
  }

  function renderCharts(data) {
    const h = data.history;
    if (data.window) {
      const span = Math.min(3600, MAX_POINTS * data.window);
      $("rates-span").textContent = span >= 3600 ? "last hour" : "last " + fmtAge(span);
    }
    const rateSeries = [
      { name: "queries", label: data.stream ? "queries" : "queries, all streams", color: PALETTE[0], values: h.query, width: 2.5 },
      { name: "responses", label: data.stream ? "responses" : "responses, all streams", color: PALETTE[1], values: h.response, width: 2.5 },
    ];
    Object.entries(h.streams).forEach(([name, s], i) => {
      rateSeries.push({ name: "q:" + name, label: name + " queries", color: PALETTE[(i + 2) % PALETTE.length], values: s.query, width: 1 });
    });
    Charts.lines($("chart-rates"), { x: h.start, series: rateSeries, format: fmtCount });
    legend($("legend-rates"), rateSeries);

    const rcodeSeries = Object.entries(h.rcodes)
      .sort((a, b) => b[1].reduce((x, y) => x + y, 0) - a[1].reduce((x, y) => x + y, 0))
      .map(([name, values], i) => ({ name, color: RCODE_COLORS[name] || PALETTE[(i + 3) % PALETTE.length], values }));
    Charts.lines($("chart-rcodes"), { x: h.start, series: rcodeSeries, format: fmtCount });
    legend($("legend-rcodes"), rcodeSeries);
  }

  function renderScoped(data) {
    const scoped = state.scope === "window" && data.current ? data.current : data.cumulative;
    const note = state.scope === "window"
      ? (data.current ? "window " + new Date(data.current.start * 1000).toLocaleTimeString() + "–" + new Date(data.current.end * 1000).toLocaleTimeString() : "no window closed yet: since start")
      : "since start or reset";
    for (const node of document.querySelectorAll(".scope-note")) node.textContent = note;
    const c = scoped.counters;
    bars($("latency"), [["Responses by latency", LATENCY.map(([key, label]) => [label, c[key] || 0])]]);
    const protocols = PROTOCOLS.filter((p) => (c["query/" + p] || 0) > 0 || p === "udp" || p === "tcp");
    bars($("split"), [
      ["Queries by protocol", protocols.map((p) => [p.toUpperCase(), c["query/" + p] || 0])],
      ["Queries by family", [["IPv4", c["query/inet"] || 0], ["IPv6", c["query/inet6"] || 0]]],
    ]);
    for (const key of TOPS) table($("top-" + key), scoped.tables[key] || [], key);
  }

  function renderReceiver(data) {
    const r = data.receiver;
    setValue("rx-malformed", r.malformed);
    setValue("rx-undecodable", r.undecodable);
    setValue("rx-filtered", r.filtered);
    setValue("rx-dropped", r.dropped);
    setValue("rx-unanswered", r.unanswered);
    const body = $("outputs");
    body.replaceChildren();
    for (const o of r.outputs) {
      const tr = document.createElement("tr");
      tr.dataset.output = o.name;
      cell(tr, o.name);
      const up = cell(tr, o.connected === null ? "local" : o.connected ? "connected" : "disconnected", o.connected === false ? "down" : "up");
      up.dataset.connected = String(o.connected);
      cell(tr, o.buffered === null ? "–" : fmtCount(o.buffered), "n").dataset.value = String(o.buffered);
      cell(tr, fmtCount(o.delivered), "n");
      cell(tr, fmtCount(o.dropped), "n").dataset.value = String(o.dropped);
      body.appendChild(tr);
    }
    if (!r.outputs.length) {
      const tr = document.createElement("tr");
      cell(tr, "no output counters yet").colSpan = 5;
      body.appendChild(tr);
    }
  }

  function render(data) {
    state.data = data;
    syncStreams(data.streams);
    renderStatus(data);
    const cum = data.cumulative.counters;
    const cur = data.current ? data.current.counters : {};
    setValue("kpi-qps", cur.qps || 0, fmtRate);
    setValue("kpi-rps", cur.rps || 0, fmtRate);
    setValue("kpi-queries", cum.query || 0);
    setValue("kpi-responses", cum.response || 0);
    setValue("kpi-clients", cum.clients || 0);
    setValue("kpi-domains", cum.domains || 0);
    renderCharts(data);
    renderScoped(data);
    renderReceiver(data);
    document.body.dataset.stream = data.stream || "";
    document.body.dataset.state = data.state;
    document.body.dataset.now = String(data.now); // the server time of what is shown
  }

  function schedule(ms) {
    clearTimeout(state.timer);
    state.timer = setTimeout(poll, ms);
  }

  async function poll() {
    const seq = ++state.seq; // a poll started later (stream switch) supersedes this one
    const stream = state.stream;
    const query = stream ? "?stream=" + encodeURIComponent(stream) : "";
    let next = RETRY_MS;
    try {
      const response = await fetch("dashboard/data" + query, { headers: { Accept: "application/json" }, credentials: "same-origin", cache: "no-store" });
      if (seq !== state.seq) return;
      if (stream !== state.stream) {
        next = 0; // the selection changed meanwhile: ask for the new one
      } else if (response.status === 401) {
        signedOut();
      } else if (response.status === 400 && stream) {
        state.stream = ""; // the stream went away (reset): back to all streams
        next = 0;
      } else if (!response.ok) {
        offline();
      } else {
        const data = await response.json();
        if (seq !== state.seq) return;
        // Drawn only if it is (still) the selected stream's; else ask for that one.
        if ((data.stream || "") === state.stream) {
          render(data);
          next = Math.round((data.poll || 2) * 1000);
        } else {
          next = 0;
        }
      }
    } catch (err) {
      if (seq !== state.seq) return;
      offline();
    }
    schedule(next);
  }

  function showState(name, label, banner) {
    const status = $("status");
    status.dataset.state = name;
    status.textContent = label;
    for (const id of ["banner-empty", "banner-stale", "banner-offline", "banner-signed-out"]) $(id).hidden = id !== banner;
    document.body.dataset.state = name;
  }

  const offline = () => showState("offline", "offline", "banner-offline");
  // The session expired or the receiver restarted: no browser password dialog (the server
  // sends no Basic challenge here), a link to the login form, and polling goes on (a login in
  // another tab brings the page back).
  const signedOut = () => showState("signed-out", "signed out", "banner-signed-out");

  function setScope(scope) {
    state.scope = scope;
    $("scope-window").classList.toggle("on", scope === "window");
    $("scope-cumulative").classList.toggle("on", scope === "cumulative");
    if (state.data) renderScoped(state.data);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("stream").addEventListener("change", (event) => {
      state.stream = event.target.value;
      schedule(0);
    });
    $("scope-window").addEventListener("click", () => setScope("window"));
    $("scope-cumulative").addEventListener("click", () => setScope("cumulative"));
    let resize = null;
    window.addEventListener("resize", () => {
      clearTimeout(resize);
      resize = setTimeout(() => state.data && renderCharts(state.data), 150);
    });
    poll();
  });
})();
