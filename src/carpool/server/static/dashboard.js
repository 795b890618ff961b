// carpool live batching dashboard. Reads /v1/stats/stream with fetch() (so the API key travels
// in the Authorization header, never in the URL) and draws each frame on canvases and lists.
// The stream sends a keyframe first (and after any frame it had to drop), then deltas: the
// page keeps the latest 240 steps, a minute of history and each engine's KV map itself
// (the wire format: carpool/server/dashboard_wire.py).
"use strict";

const $ = (id) => document.getElementById(id);
const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();
const KEY = "carpool.apiKey";
const MAX_STEPS = 240, HISTORY_TENTHS = 600;
let lastFrame = null;

// ---- the stream ------------------------------------------------------------------------------

async function connect() {
  const key = sessionStorage.getItem(KEY);
  const headers = key ? { Authorization: "Bearer " + key } : {};
  let response;
  try {
    response = await fetch("/v1/stats/stream", { headers, cache: "no-store" });
  } catch (e) {
    return retry("offline (" + e.message + ")");
  }
  if (response.status === 401) {
    sessionStorage.removeItem(KEY);
    $("login").hidden = false;
    $("login-error").textContent = key ? "that key was refused" : "";
    status("locked: API key needed", false);
    return;
  }
  if (!response.ok) return retry("server says " + response.status);
  $("login").hidden = true;
  status("live", true);
  lastFrame = null;  // a new stream starts with a keyframe
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (event.startsWith("data: ")) {
          const frame = merge(lastFrame, JSON.parse(event.slice(6)));
          if (frame) render(frame);
        }
      }
    }
  } catch (e) {
    return retry("stream ended (" + e.message + ")");
  }
  retry("stream ended");
}

function retry(why) {
  status(why + "; reconnecting", false);
  setTimeout(connect, 1000);
}

function status(text, live) {
  $("conn").textContent = text;
  $("conn").className = live ? "conn live" : "conn";
}

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY, $("key").value);
  $("key").value = "";
  connect();
});

// Ask for the key before the first stream request when the server has one (a 401 would be
// logged by the browser as an error).
async function start() {
  let needsKey = false;
  try {
    needsKey = (await (await fetch("/dashboard/auth", { cache: "no-store" })).json()).key_required;
  } catch (e) {
    return retry("offline (" + e.message + ")");
  }
  if (needsKey && !sessionStorage.getItem(KEY)) {
    $("login").hidden = false;
    status("locked: API key needed", false);
    $("key").focus();
    return;
  }
  connect();
}

// ---- one frame ----------------------------------------------------------------------------

// The complete frame a keyframe or a delta stands for (null: a delta without its keyframe).
function merge(prev, f) {
  if (f.key) {
    f.kv.forEach((k) => (k.map = expand(k.cells)));
    return f;
  }
  if (!prev) return null;
  f.steps = prev.steps.concat(f.steps).slice(-MAX_STEPS);
  f.history = prev.history.concat(f.history).filter((p) => p[0] >= f.clock - HISTORY_TENTHS);
  if (f.finished === undefined) f.finished = prev.finished;
  const maps = new Map(prev.kv.map((k) => [k.replica, k.map]));
  f.kv.forEach((k) => {
    if (k.cells) {
      k.map = expand(k.cells);
      return;
    }
    k.map = maps.get(k.replica) || new Int32Array(0);  // the previous map, changed in place
    for (let i = 0; i < k.changes.length; i += 2) k.map[k.changes[i]] = k.changes[i + 1];
  });
  return f;
}

// A KV map's cells from its [value, count] runs.
function expand(runs) {
  const n = runs.reduce((a, r) => a + r[1], 0);
  const cells = new Int32Array(n);
  let i = 0;
  for (const [v, count] of runs) {
    cells.fill(v, i, i + count);
    i += count;
  }
  return cells;
}

function fmt(x, digits = 0) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

// One colour per request, kept for its whole life: the golden angle between consecutive
// arrivals keeps neighbours in the KV map apart.
const colours = new Map();
function colour(id) {
  const base = id.split("#")[0];
  let c = colours.get(base);
  if (c === undefined) {
    const i = colours.size;
    c = `hsl(${(i * 137.508) % 360}, ${i % 2 ? 55 : 70}%, ${i % 3 ? 50 : 40}%)`;
    colours.set(base, c);
    if (colours.size > 5000) colours.delete(colours.keys().next().value);
  }
  return c;
}

function render(f) {
  lastFrame = f;
  const v = f.verdict;
  $("verdict").className = "verdict " + v.state;
  $("verdict-state").textContent = v.state;
  $("verdict-why").textContent = v.why;
  const c = f.config;
  const chips = [
    ["batching", c.batching], ["layout", c.layout], ["max_num_seqs", c.max_num_seqs],
    ["max_num_batched_tokens", c.max_num_batched_tokens], ["block_size", c.block_size],
    ["dtype", c.dtype], ["replicas", c.replicas],
  ];
  if (c.batching === "static" || c.batching === "bucketed" || c.batching === "dynamic")
    chips.splice(2, 0, ["batch_size", c.batch_size]);
  if (c.batching === "dynamic") chips.splice(3, 0, ["max_wait_ms", c.max_wait_ms]);
  $("config").innerHTML = chips.map(([k, x]) => `<span>${k} <b>${x ?? "model's"}</b></span>`).join("");

  const r = f.rates, t = f.totals;
  $("gen-tps").textContent = fmt(r.generation_tps, 1);
  $("prefill-tps").textContent = fmt(r.prefill_tps, 1);
  $("ttft").textContent = [r.ttft_ms.p50, r.ttft_ms.p90, r.ttft_ms.p99].map((x) => fmt(x)).join(" · ");
  $("itl").textContent = [r.itl_ms.p50, r.itl_ms.p90, r.itl_ms.p99].map((x) => fmt(x, 1)).join(" · ");
  $("e2e").textContent = [r.e2e_ms.p50, r.e2e_ms.p99].map((x) => fmt(x)).join(" · ");
  $("num-running").textContent = t.running;
  $("num-waiting").textContent = t.waiting;
  $("kv-used").textContent = t.kv_used_blocks;
  $("kv-total").textContent = t.num_blocks;
  $("kv-pct").textContent = fmt(100 * t.kv_usage, 1) + "% of the cache";
  $("steps-total").textContent = t.steps;
  $("preemptions").textContent = t.preemptions;
  $("batch-mean").textContent = "mean batch " + fmt(t.mean_batch_size, 2) + " seqs";
  drawTimeline(f.steps);
  drawHistory(f.history, f.clock);
  drawKV(f.kv, f.requests);
  renderRequests(f.requests, f.finished, f.lanes.length, f.clock);
  renderLanes(f.lanes, f.clock);
}

// ---- canvases ------------------------------------------------------------------------------

function canvas(id) {
  const el = $(id);
  const ratio = window.devicePixelRatio || 1;
  const w = el.clientWidth, h = el.clientHeight;
  if (el.width !== Math.round(w * ratio) || el.height !== Math.round(h * ratio)) {
    el.width = Math.round(w * ratio);
    el.height = Math.round(h * ratio);
  }
  const ctx = el.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px system-ui, sans-serif";
  return { el, ctx, w, h };
}

// An axis top with round ticks (4 intervals); counts get integer ticks.
function niceMax(x, integer = false) {
  if (integer) return Math.max(4, 4 * Math.ceil(x / 4));
  if (x <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(x)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= x) return m * p;
  return 10 * p;
}

// A plot box with a left axis (and optionally a right one), ticks, grid and axis titles.
function axes(ctx, box, yMax, yTitle, xTitle, right) {
  const { x, y, w, h } = box;
  ctx.strokeStyle = css("--line");
  ctx.fillStyle = css("--muted");
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const yy = Math.round(y + h - (h * i) / 4) + 0.5;
    ctx.beginPath(); ctx.moveTo(x, yy); ctx.lineTo(x + w, yy); ctx.stroke();
    ctx.fillText(fmtTick((yMax * i) / 4), x - 4, yy);
    if (right) {
      ctx.textAlign = "left";
      ctx.fillText(fmtTick((right.max * i) / 4), x + w + 4, yy);
      ctx.textAlign = "right";
    }
  }
  ctx.save();
  ctx.translate(11, y + h / 2); ctx.rotate(-Math.PI / 2);
  ctx.textAlign = "center"; ctx.fillText(yTitle, 0, 0);
  ctx.restore();
  if (right) {
    ctx.save();
    ctx.translate(x + w + 40, y + h / 2); ctx.rotate(Math.PI / 2);
    ctx.textAlign = "center"; ctx.fillText(right.title, 0, 0);
    ctx.restore();
  }
  ctx.textAlign = "center"; ctx.textBaseline = "alphabetic";
  ctx.fillText(xTitle, x + w / 2, y + h + 26);
}

function fmtTick(v) {
  return v >= 1000 ? (v / 1000).toFixed(v % 1000 ? 1 : 0) + "k" : String(Math.round(v * 10) / 10);
}

function drawTimeline(steps) {
  const { el, ctx, w, h } = canvas("timeline");
  el.dataset.steps = steps.length;
  el.dataset.lastStep = steps.length ? steps[steps.length - 1][0] : 0;
  const box = { x: 46, y: 8, w: w - 96, h: h - 44 };
  // [seq, replica, decode, prefill, pad, batch, preempted]
  const yMax = niceMax(Math.max(1, ...steps.map((s) => s[2] + s[3] + s[4])));
  const bMax = niceMax(Math.max(1, ...steps.map((s) => s[5])), true);
  axes(ctx, box, yMax, "tokens per step", "step number (latest " + steps.length + " forward passes)",
       { max: bMax, title: "batch size (seqs)" });
  if (!steps.length) return;
  const n = Math.max(60, steps.length);
  const bw = box.w / n;
  const X = (i) => box.x + box.w - (steps.length - i) * bw;
  const Y = (v) => box.y + box.h - (box.h * v) / yMax;
  steps.forEach((s, i) => {
    let base = 0;
    for (const [k, col] of [[2, "--decode"], [3, "--prefill"], [4, "--pad"]]) {
      if (!s[k]) continue;
      ctx.fillStyle = css(col);
      ctx.fillRect(X(i), Y(base + s[k]), Math.max(1, bw - (bw > 3 ? 1 : 0)), Y(base) - Y(base + s[k]));
      base += s[k];
    }
    if (s[6]) {
      ctx.fillStyle = css("--preempt");
      const cx = X(i) + bw / 2;
      ctx.beginPath(); ctx.moveTo(cx - 5, box.y); ctx.lineTo(cx + 5, box.y); ctx.lineTo(cx, box.y + 8);
      ctx.fill();
    }
  });
  ctx.strokeStyle = css("--batch"); ctx.lineWidth = 1.5;
  ctx.beginPath();
  steps.forEach((s, i) => {
    const yy = box.y + box.h - (box.h * s[5]) / bMax;
    i ? ctx.lineTo(X(i) + bw / 2, yy) : ctx.moveTo(X(i) + bw / 2, yy);
  });
  ctx.stroke();
  ctx.fillStyle = css("--muted"); ctx.textAlign = "center";
  const every = Math.max(1, Math.ceil(steps.length / 6));
  steps.forEach((s, i) => {
    if ((steps.length - 1 - i) % every === 0) ctx.fillText(s[0], X(i) + bw / 2, box.y + box.h + 13);
  });
}

function drawHistory(history, clock) {
  const { ctx, w, h } = canvas("history");
  const box = { x: 46, y: 8, w: w - 92, h: h - 44 };
  const span = 60;
  const rMax = niceMax(Math.max(4, ...history.map((p) => Math.max(p[2], p[3]))), true);
  axes(ctx, box, 100, "KV used (%)", "seconds ago (latest " + span + " s)", { max: rMax, title: "requests" });
  ctx.fillStyle = css("--muted"); ctx.textAlign = "center";
  for (let s = 0; s <= span; s += 10) ctx.fillText(s, box.x + box.w - (box.w * s) / span, box.y + box.h + 13);
  if (!history.length) return;
  // [clock (tenths of a second), KV use in permille, running, waiting]
  const X = (t) => box.x + box.w + (box.w * (t - clock)) / 10 / span;
  const line = (k, max, col, fill) => {
    ctx.beginPath();
    history.forEach((p, i) => {
      const yy = box.y + box.h - (box.h * p[k]) / max;
      i ? ctx.lineTo(X(p[0]), yy) : ctx.moveTo(X(p[0]), yy);
    });
    if (fill) {
      ctx.lineTo(X(history[history.length - 1][0]), box.y + box.h);
      ctx.lineTo(X(history[0][0]), box.y + box.h);
      ctx.fillStyle = fill; ctx.fill();
    } else {
      ctx.strokeStyle = col; ctx.lineWidth = 1.8; ctx.stroke();
    }
  };
  line(1, 1000, null, "rgba(112, 72, 232, 0.25)");
  line(1, 1000, css("--kv"));
  line(2, rMax, css("--run"));
  line(3, rMax, css("--wait"));
}

function drawKV(kv, requests) {
  const { ctx, w, h } = canvas("kvmap");
  const lanes = kv.length || 1;
  const labelW = kv.length > 1 ? 64 : 0;
  const owner = new Map(requests.map((r) => [r.key, r.id]));  // cells hold request keys
  let caption = [];
  kv.forEach((k, li) => {
    const top = (h / lanes) * li, height = h / lanes - 4;
    const cells = k.map;
    const n = cells.length;
    const cols = Math.max(1, Math.ceil(Math.sqrt((n * (w - labelW)) / height)));
    const rows = Math.ceil(n / cols);
    const size = Math.max(1, Math.min((w - labelW) / cols, height / rows, 22));
    const gap = size >= 5 ? 1 : 0;
    if (labelW) {
      ctx.fillStyle = css("--muted"); ctx.textBaseline = "top";
      ctx.fillText("replica " + k.replica, 0, top + 2);
    }
    for (let i = 0; i < n; i++) {
      const v = cells[i];
      const id = v >= 0 ? owner.get(v) : undefined;
      ctx.fillStyle = v === -1 ? css("--free") : v === -2 || id === undefined ? css("--cached") : colour(id);
      ctx.fillRect(labelW + (i % cols) * size, top + Math.floor(i / cols) * size, size - gap, size - gap);
    }
    caption.push(`${kv.length > 1 ? "replica " + k.replica + ": " : ""}${k.used} of ${k.num_blocks} blocks used` +
      (k.cached !== null ? `, ${k.cached} cached` : "") +
      ` (${k.block_size} tokens each${k.blocks_per_cell > 1 ? "; 1 cell = " + k.blocks_per_cell + " blocks" : ""})`);
  });
  $("kv-caption").textContent = caption.join(" · ");
}

// ---- lists ----------------------------------------------------------------------------------

function esc(s) {
  return String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

function listItems(items, max, row) {
  const shown = items.slice(0, max).map(row);
  if (items.length > max) shown.push(`<li class="more">+ ${items.length - max} more</li>`);
  return shown.join("") || '<li class="more">none</li>';
}

function renderRequests(requests, finished, numLanes, clock) {
  const running = requests.filter((r) => r.state === "running");
  const waiting = requests.filter((r) => r.state !== "running");
  const lane = (r) => (numLanes > 1 ? ` r${r.replica}` : "");
  $("running").innerHTML = listItems(running, 12, (r) => {
    const p = Math.min(1, r.computed / r.prompt), g = r.generated / Math.max(1, r.max_tokens);
    return `<li><i class="dot" style="background:${colour(r.id)}"></i><span class="id">${esc(r.id)}</span>` +
      `<span class="bar prompt" title="prompt computed"><i style="width:${100 * p}%"></i></span>` +
      `<span class="num">${Math.min(r.computed, r.prompt)}/${r.prompt}</span>` +
      `<span class="bar gen" title="tokens generated"><i style="width:${100 * g}%"></i></span>` +
      `<span class="num">${r.generated}/${r.max_tokens}${lane(r)}</span></li>`;
  });
  const hasPriority = waiting.some((r) => r.priority !== null);
  $("waiting-cols").textContent = hasPriority ? "priority · prompt · waited" : "prompt · waited";
  $("waiting").innerHTML = listItems(waiting, 12, (r) =>
    `<li><i class="dot" style="background:${colour(r.id)}"></i><span class="id">${esc(r.id)}</span>` +
    (hasPriority ? `<span class="num">p${r.priority ?? "–"}</span>` : "") +
    `<span class="num">${r.prompt} tok</span><span class="num">${fmt((clock - r.arrival) / 10, 1)} s` +
    `${r.state === "preempted" ? " ⟲" : ""}${lane(r)}</span></li>`);
  $("finished").tBodies[0].innerHTML = finished.slice(0, 8).map((f) =>
    `<tr><td>${esc(f.id)}</td><td>${f.replica}</td><td>${f.prompt}</td><td>${f.generated}</td>` +
    `<td>${fmt(f.ttft_ms)}</td><td>${fmt(f.e2e_ms)}</td><td>${esc(f.reason)}</td></tr>`).join("");
}

function renderLanes(lanes, clock) {
  $("lanes").innerHTML = lanes.map((l) => {
    const load = l.load || {};
    const chips = (l.recent || []).map(([t, id]) =>
      `<i title="${esc(id)} (${fmt((clock - t) / 10, 1)} s ago)" style="background:${colour(id)}"></i>`).join("");
    return `<div class="lane"><b>replica ${l.replica}</b><span class="state ${esc(l.state)}">${esc(l.state)}</span>` +
      `<span class="load">running ${load.num_running ?? 0} · waiting ${load.num_waiting ?? 0} · KV ` +
      `${fmt(100 * (load.kv_cache_usage ?? 0), 0)}%${l.routed !== undefined ? " · routed " + l.routed : ""}</span>` +
      `<span class="chips" title="requests sent here lately, newest right">${chips}</span></div>`;
  }).join("");
}

window.addEventListener("resize", () => lastFrame && render(lastFrame));
start();
