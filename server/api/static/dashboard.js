/* headwise operations dashboard.
 *
 * Polls GET /v1/telemetry?window=... every few seconds (docs/telemetry-api.md) and renders:
 * stat tiles, a latency percentile table, two uPlot time series (throughput, load), a
 * layer x head heatmap of one attention statistic, and the recent requests; a request row opens
 * its own heatmap from GET /v1/telemetry/requests/{id}. When the server has an API key, the page
 * asks for it once and keeps it in sessionStorage (this tab only).
 *
 * Every heatmap cell carries data-layer, data-head, data-kv-head and data-value (empty when the
 * head has no rows in the window), so tests and scripts can read the numbers from the DOM.
 *
 * The same page runs on vLLM with the headwise plugin (its JSON has "server": "vllm"): fields vLLM
 * has no metric for are null and shown as "–", and there are no recent requests to list.
 */
(function () {
  "use strict";

  const STATS = [
    { key: "normalized_entropy", label: "Normalized entropy", domain: [0, 1],
      desc: "entropy / ln(keys): 1 = attention spread evenly over the context, 0 = on a single token" },
    { key: "sink_mass", label: "Sink mass", domain: [0, 1],
      desc: "attention weight on the first 4 tokens (attention sinks)" },
    { key: "lookback_distance", label: "Look-back distance", domain: [0, 1],
      desc: "0 = attends to the current token, 1 = to the start of the context" },
    { key: "max_weight", label: "Max weight", domain: [0, 1],
      desc: "the largest single attention weight of a row" },
    { key: "entropy", label: "Entropy (nats)", domain: null,
      desc: "attention entropy in nats (grows with context length; colour scale: min to max)" },
  ];
  const STAT = Object.fromEntries(STATS.map((s) => [s.key, s]));
  const WINDOW_TEXT = { "1m": "last minute", "5m": "last 5 minutes", all: "since start" };
  // viridis, 11 stops: perceptually uniform and readable for colour-blind viewers
  const VIRIDIS = ["#440154", "#482475", "#414487", "#355f8d", "#2a788e", "#21918c",
    "#22a884", "#44bf70", "#7ad151", "#bddf26", "#fde725"].map((h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)));
  const KEY_STORE = "headwise.apiKey";
  const params = new URLSearchParams(location.search);
  const REFRESH_MS = Math.max(500, Number(params.get("refresh")) || 2000);

  const $ = (id) => document.getElementById(id);
  const state = {
    window: ["1m", "5m", "all"].includes(params.get("window")) ? params.get("window") : "1m",
    stat: STAT[params.get("stat")] ? params.get("stat") : "normalized_entropy",
    modalStat: null,
    modal: null,           // the open request's JSON
    key: sessionStorage.getItem(KEY_STORE) || "",
    data: null,
    updates: 0,
    timer: null,
    charts: {},
  };

  // ------------------------------------------------------------------ formatting
  function esc(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  }
  function fmtSec(s) {
    if (s === null || s === undefined || !isFinite(s)) return "–";
    if (s < 1) {
      const ms = s * 1000;
      return `${ms < 10 ? ms.toFixed(2) : ms < 100 ? ms.toFixed(1) : ms.toFixed(0)}<span class="u">ms</span>`;
    }
    return `${s < 10 ? s.toFixed(2) : s.toFixed(1)}<span class="u">s</span>`;
  }
  const plainSec = (s) => fmtSec(s).replace(/<[^>]+>/g, " ").replace(/\s+/g, " ").trim();
  function fmtNum(x, digits) {
    if (x === null || x === undefined || !isFinite(x)) return "–";
    if (Math.abs(x) >= 1000) return Math.round(x).toLocaleString("en-US");
    return x.toFixed(digits === undefined ? (Math.abs(x) >= 100 ? 0 : 1) : digits);
  }
  const fmtCount = (x) => (x === null || x === undefined ? "–" : Number(x).toLocaleString("en-US"));
  function fmtDuration(s) {
    if (s < 60) return `${Math.round(s)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
    return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  }
  function color(t) {
    const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
    const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
    const f = x - i;
    const [a, b] = [VIRIDIS[i], VIRIDIS[i + 1]];
    return `rgb(${a.map((v, k) => Math.round(v + (b[k] - v) * f)).join(",")})`;
  }
  const gradientCss = () => `linear-gradient(90deg, ${VIRIDIS.map((c, i) => `rgb(${c.join(",")}) ${(i * 10)}%`).join(", ")})`;

  // ------------------------------------------------------------------ data
  async function getJSON(path) {
    const headers = { accept: "application/json" };
    if (state.key) headers.authorization = `Bearer ${state.key}`;
    const res = await fetch(path, { headers, cache: "no-store" });
    if (res.status === 401) {
      $("keybar").hidden = false;
      throw new Error("API key required");
    }
    const body = await res.json().catch(() => null);
    if (!res.ok) throw new Error((body && body.error && body.error.message) || `HTTP ${res.status}`);
    return body;
  }

  async function refresh() {
    clearTimeout(state.timer);
    try {
      const data = await getJSON(`v1/telemetry?window=${encodeURIComponent(state.window)}&recent=12`);
      state.data = data;
      render(data);
      state.updates += 1;
      document.body.dataset.updates = String(state.updates);
      document.body.dataset.state = "ready";
      $("status-text").textContent = `live · ${new Date().toLocaleTimeString("en-GB")}`;
    } catch (err) {
      document.body.dataset.state = "error";
      $("status-text").textContent = err.message;
    }
    state.timer = setTimeout(refresh, REFRESH_MS);
  }

  // ------------------------------------------------------------------ rendering
  function render(d) {
    const m = d.model;
    const badge = d.server === "vllm" ? '<span class="badge server" id="server-badge">vLLM</span> ' : "";
    $("model").innerHTML = `${badge}<b>${esc(m.id)}</b> · ${m.layers} layers × ${m.heads} heads (${m.kv_heads} KV) · ` +
      `context ${fmtCount(m.max_model_len)} · up ${fmtDuration(d.uptime_seconds)}`;
    renderTiles(d);
    renderLatency(d);
    renderCharts(d);
    const heads = { layers: m.layers, heads: m.heads, kv_heads: m.kv_heads, grids: d.heads, counts: d.heads.counts };
    renderHeatmap($("heatmap"), $("legend"), heads, state.stat);
    const span = d.window === "all" || d.span_seconds + 1 < d.window_seconds ? ` (${fmtDuration(d.span_seconds)} of data)` : "";
    const down = d.plugin && !d.plugin.up ? ` · telemetry down: ${d.plugin.problem}` : "";
    $("heat-sub").textContent = `mean ${STAT[state.stat].label.toLowerCase()} per (layer, head), ${WINDOW_TEXT[d.window]}${span} · ` +
      `${(d.heads.rows || 0).toLocaleString("en-US")} rows${down}`;
    renderRequests(d.recent_requests || [], d.server === "vllm");
  }

  function setTile(id, text, cls) {
    const el = $(id);
    el.textContent = text;
    el.className = "value" + (cls ? " " + cls : "");
  }

  function renderTiles(d) {
    const t = d.throughput, l = d.load, c = d.counters;
    setTile("tile-tps", fmtNum(t.generation_tokens_per_s));
    setTile("tile-rps", fmtNum(t.requests_per_s, 2));
    setTile("tile-running", fmtCount(l.num_running));
    setTile("tile-waiting", fmtCount(l.num_waiting), l.num_waiting > 0 ? "warn" : "");
    const kv = (l.kv_cache_usage || 0) * 100;
    setTile("tile-kv", l.kv_cache_usage === null ? "–" : `${kv.toFixed(1)} %`, kv >= 95 ? "bad" : kv >= 80 ? "warn" : "");
    $("tile-kv-unit").textContent = l.kv_cache_blocks === null ? "used" : `of ${fmtCount(l.kv_cache_blocks)} blocks`;
    $("tile-kv-bar").style.width = `${kv}%`;
    $("tile-kv-bar").style.background = kv >= 95 ? "var(--red)" : kv >= 80 ? "var(--amber)" : "var(--accent)";
    setTile("tile-preempt", String(c.preemptions), c.preemptions_in_window > 0 ? "warn" : "");
    $("tile-preempt-unit").textContent = `total · ${c.preemptions_in_window} in window`;
    setTile("tile-rejected", String(c.rejected_total), c.rejected_total > 0 ? "warn" : "");
    const reasons = Object.entries(c.rejected).filter(([, n]) => n > 0).map(([r, n]) => `${r.replace(/_/g, " ")} ${n}`);
    $("tile-rejected-unit").textContent = reasons.length ? reasons.join(" · ") : "total";
    setTile("tile-errors", String(c.errors), c.errors > 0 ? "bad" : "");
  }

  function renderLatency(d) {
    for (const row of document.querySelectorAll("#latency tbody tr")) {
      const s = d.latency[row.dataset.metric];
      const cells = ["p50", "p90", "p95", "p99", "max"].map((q) =>
        `<td data-q="${q}" data-value="${s[q] === null ? "" : s[q]}"${q === "p95" ? ' class="hot"' : ""}>${fmtSec(s[q])}</td>`);
      row.innerHTML = `<th>${row.querySelector("th").textContent}</th>${cells.join("")}<td data-q="count">${s.count.toLocaleString("en-US")}</td>`;
    }
    $("lat-sub").textContent = WINDOW_TEXT[d.window];
  }

  // --------------------------------------------------------------- charts (uPlot)
  const AXIS = { stroke: "#8a94a6", grid: { stroke: "#232b38", width: 1 }, ticks: { stroke: "#232b38", width: 1 },
    font: "11px DejaVu Sans, sans-serif" };

  const clock = (t) => new Date(t * 1000).toLocaleTimeString("en-GB");
  /* the x axis spans the selected window (or the data, since start), ending now */
  function xRange(min, max) {
    const d = state.data;
    if (!d) return [min, max];
    const span = d.window_seconds || Math.max(60, d.time - (min || d.time));
    return [d.time - span, d.time];
  }

  function chart(name, el, series, scales, axes) {
    if (state.charts[name]) return state.charts[name];
    const opts = {
      width: el.clientWidth || 400, height: el.clientHeight || 190,
      cursor: { drag: { x: false, y: false } },
      legend: { show: true, live: false },
      scales: { x: { time: true, range: (u, min, max) => xRange(min, max) }, ...scales },
      series: [{ label: "time" }, ...series],
      axes: [{ ...AXIS, space: 70, values: (u, splits) => splits.map((v) => clock(v)) }, ...axes],
    };
    const u = new uPlot(opts, [[], ...series.map(() => [])], el);
    state.charts[name] = u;
    return u;
  }

  function renderCharts(d) {
    if (typeof uPlot === "undefined") return;
    const s = d.series;
    const xs = s.t.map((t) => d.time + t);
    const tput = chart("throughput", $("chart-throughput"),
      [{ label: "tokens/s", stroke: "#5b9cff", width: 2, fill: "rgba(91,156,255,0.15)",
         value: (u, v) => (v == null ? "–" : v.toFixed(1)) }],
      { y: { range: (u, min, max) => [0, Math.max(1, max * 1.15)] } },
      [{ ...AXIS, size: 46 }]);
    tput.setData([xs, s.generation_tokens_per_s]);
    const load = chart("load", $("chart-load"),
      [{ label: "running", stroke: "#3ecf8e", width: 2, scale: "n" },
       { label: "waiting", stroke: "#f0b429", width: 2, scale: "n" },
       { label: "KV %", stroke: "#b18cff", width: 1.5, dash: [5, 4], scale: "%",
         value: (u, v) => (v == null ? "–" : v.toFixed(1) + " %") }],
      { n: { range: (u, min, max) => [0, Math.max(2, Math.ceil(max * 1.2))] }, "%": { range: [0, 100] } },
      [{ ...AXIS, scale: "n", size: 36 }, { ...AXIS, scale: "%", side: 1, size: 50, grid: { show: false },
         values: (u, vals) => vals.map((v) => v + "%") }]);
    load.setData([xs, s.num_running, s.num_waiting, s.kv_cache_usage.map((v) => (v == null ? null : v * 100))]);
  }

  function resizeCharts() {
    for (const [name, u] of Object.entries(state.charts)) {
      const el = $(`chart-${name}`);
      u.setSize({ width: el.clientWidth, height: el.clientHeight || 190 });
    }
  }

  // --------------------------------------------------------------- heatmap
  function statPicker(el, current, onPick) {
    el.innerHTML = STATS.map((s) => `<button type="button" data-stat="${s.key}" class="${s.key === current ? "active" : ""}">${s.label}</button>`).join("");
    el.onclick = (ev) => {
      const b = ev.target.closest("button[data-stat]");
      if (!b) return;
      for (const x of el.querySelectorAll("button")) x.classList.toggle("active", x === b);
      onPick(b.dataset.stat);
    };
  }

  /* src: {layers, heads, kv_heads, grids: {stat: L x H}, counts: L x H or null}. Layers run along x
     (one column each), query heads down y, grouped by the KV head they share. */
  function renderHeatmap(el, legend, src, statKey) {
    const L = src.layers, H = src.heads, group = H / src.kv_heads;
    const grid = src.grids[statKey];
    const stat = STAT[statKey];
    let [lo, hi] = stat.domain || [Infinity, -Infinity];
    if (!stat.domain) {
      for (const row of grid) for (const v of row) if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
      if (!isFinite(lo)) [lo, hi] = [0, 1];
      if (hi - lo < 1e-9) hi = lo + 1e-9;
    }
    if (el.dataset.layers !== String(L) || el.dataset.heads !== String(H)) {
      el.dataset.layers = String(L);
      el.dataset.heads = String(H);
      el.style.gridTemplateColumns = `64px repeat(${L}, minmax(8px, 1fr))`;
      const parts = [];
      for (let h = 0; h < H; h++) {
        const kv = Math.floor(h / group);
        const top = h > 0 && h % group === 0 ? ' style="margin-top:5px"' : "";
        parts.push(`<div class="axis y"${top}>head ${h}</div>`);
        for (let l = 0; l < L; l++) {
          parts.push(`<div class="cell" data-layer="${l}" data-head="${h}" data-kv-head="${kv}"${top}></div>`);
        }
      }
      parts.push('<div class="axis y">layer</div>');
      const every = L <= 40 ? 1 : 5;
      for (let l = 0; l < L; l++) parts.push(`<div class="axis">${l % every === 0 ? l : ""}</div>`);
      el.innerHTML = parts.join("");
      el.onmousemove = (ev) => tooltip(ev, el);
      el.onmouseleave = () => { $("tooltip").hidden = true; };
    }
    el.dataset.stat = statKey;
    for (const cell of el.querySelectorAll(".cell")) {
      const l = +cell.dataset.layer, h = +cell.dataset.head;
      const v = grid[l][h];
      cell.dataset.value = v === null ? "" : String(v);
      cell.dataset.rows = src.counts ? String(src.counts[l][h]) : "";
      cell.classList.toggle("empty", v === null);
      cell.style.background = v === null ? "" : color((v - lo) / (hi - lo));
    }
    legend.innerHTML = `<span>${fmtNum(lo, 2)}</span><div class="bar" style="background:${gradientCss()}"></div>` +
      `<span>${fmtNum(hi, 2)}</span><span class="desc">${esc(stat.label)}: ${esc(stat.desc)}</span>`;
  }

  function tooltip(ev, el) {
    const tip = $("tooltip");
    const cell = ev.target.closest(".cell");
    if (!cell) { tip.hidden = true; return; }
    const stat = STAT[el.dataset.stat];
    const v = cell.dataset.value;
    const rows = cell.dataset.rows ? ` · ${Number(cell.dataset.rows).toLocaleString("en-US")} rows` : "";
    tip.innerHTML = `<div class="t">Layer ${cell.dataset.layer} · head ${cell.dataset.head}</div>` +
      `<div class="m">KV head ${cell.dataset.kvHead}${rows}</div>` +
      `<div class="m">${esc(stat.label)}</div><div class="v">${v === "" ? "no data" : Number(v).toFixed(4)}</div>`;
    tip.hidden = false;
    const x = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
    const y = Math.min(ev.clientY + 14, window.innerHeight - tip.offsetHeight - 8);
    tip.style.left = `${x}px`;
    tip.style.top = `${y}px`;
  }

  // --------------------------------------------------------------- recent requests
  function renderRequests(reqs, vllm) {
    const body = document.querySelector("#requests tbody");
    if (!reqs.length) {
      const text = vllm ? "vLLM keeps no per-request telemetry: the heads above are the window's means."
        : "No finished requests yet.";
      body.innerHTML = `<tr class="empty"><td colspan="9">${text}</td></tr>`;
      return;
    }
    body.innerHTML = reqs.map((r) => {
      const ne = r.mean_normalized_entropy;
      const spark = ne === null ? "–" :
        `<span class="spark"><div style="width:${(ne * 100).toFixed(1)}%;background:${color(ne)}"></div></span>${ne.toFixed(3)}`;
      const when = new Date(r.finished_at * 1000).toLocaleTimeString("en-GB");
      return `<tr data-id="${esc(r.id)}"><td>${when}</td><td><code>${esc(r.id)}</code></td>` +
        `<td><span class="badge ${esc(r.finish_reason)}">${esc(r.finish_reason)}</span></td>` +
        `<td class="num">${r.prompt_tokens}</td><td class="num">${r.output_tokens}</td>` +
        `<td class="num">${fmtSec(r.time_to_first_token)}</td><td class="num">${fmtSec(r.e2e_request_latency)}</td>` +
        `<td class="num">${r.decode_tokens_per_s === null ? "–" : fmtNum(r.decode_tokens_per_s) + '<span class="u"> tok/s</span>'}</td>` +
        `<td>${spark}</td></tr>`;
    }).join("");
  }

  async function openRequest(id) {
    let r;
    try {
      r = await getJSON(`v1/telemetry/requests/${encodeURIComponent(id)}`);
    } catch (err) {
      $("status-text").textContent = err.message;
      return;
    }
    state.modal = r;
    state.modalStat = state.modalStat || state.stat;
    $("modal-title").innerHTML = `Request <code>${esc(r.id)}</code> <span class="badge ${esc(r.finish_reason)}">${esc(r.finish_reason)}</span>`;
    const facts = [["prompt", `${r.prompt_tokens} tokens`], ["output", `${r.output_tokens} tokens`],
      ["queue", plainSec(r.queue_time)], ["TTFT", plainSec(r.time_to_first_token)],
      ["end-to-end", plainSec(r.e2e_request_latency)],
      ["decode", r.decode_tokens_per_s === null ? "–" : `${fmtNum(r.decode_tokens_per_s)} tok/s`],
      ["telemetry rows", String(r.telemetry_rows)]];
    $("modal-facts").innerHTML = facts.map(([k, v]) => `<span>${k}<b>${esc(v)}</b></span>`).join("");
    $("modal").hidden = false;
    statPicker($("modal-stat-picker"), state.modalStat, (s) => { state.modalStat = s; renderModalHeatmap(); });
    renderModalHeatmap();
  }

  function renderModalHeatmap() {
    const r = state.modal, el = $("modal-heatmap");
    if (!r.head_telemetry) {
      el.innerHTML = '<div class="axis">No head telemetry for this request.</div>';
      el.dataset.layers = "0";
      $("modal-legend").innerHTML = "";
      return;
    }
    const t = r.head_telemetry;
    renderHeatmap(el, $("modal-legend"), { layers: t.layers, heads: t.heads, kv_heads: t.kv_heads, grids: t, counts: null },
      state.modalStat);
  }

  function closeModal() {
    $("modal").hidden = true;
    $("tooltip").hidden = true;
    state.modal = null;
  }

  // --------------------------------------------------------------- wiring
  function init() {
    for (const b of document.querySelectorAll("#window button")) b.classList.toggle("active", b.dataset.window === state.window);
    $("window").onclick = (ev) => {
      const b = ev.target.closest("button[data-window]");
      if (!b) return;
      for (const x of $("window").querySelectorAll("button")) x.classList.toggle("active", x === b);
      state.window = b.dataset.window;
      refresh();
    };
    statPicker($("stat-picker"), state.stat, (s) => { state.stat = s; if (state.data) render(state.data); });
    $("keybar").onsubmit = (ev) => {
      ev.preventDefault();
      state.key = $("apikey").value.trim();
      sessionStorage.setItem(KEY_STORE, state.key);
      $("keybar").hidden = true;
      refresh();
    };
    document.querySelector("#requests tbody").onclick = (ev) => {
      const tr = ev.target.closest("tr[data-id]");
      if (tr) openRequest(tr.dataset.id);
    };
    $("modal-close").onclick = closeModal;
    $("modal").onclick = (ev) => { if (ev.target === $("modal")) closeModal(); };
    document.addEventListener("keydown", (ev) => { if (ev.key === "Escape") closeModal(); });
    window.addEventListener("resize", resizeCharts);
    refresh();
    if (params.get("request")) openRequest(params.get("request"));
  }

  init();
})();
