// velotune dashboard: runs list, a run (live curves, notices, config, data report, before/after, checkpoints,
// chat), compare. Reads the JSON API of velotune/dashboard/server.py; all text goes in as text, never as HTML.
"use strict";

const POLL_METRICS_MS = 1000;
const POLL_RUN_MS = 3000;
const POLL_LIST_MS = 2000;
const STEP_INCREMENTS = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000];
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"];

// ---- small helpers ------------------------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({ cache: "no-store" }, options || {}));
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    throw new Error(`${response.status} ${response.statusText}`);
  }
  if (!response.ok) throw new Error(body && body.error ? body.error : `${response.status}`);
  return body;
}

const q = (name) => encodeURIComponent(name);
const num = (v, digits) => (typeof v === "number" ? v.toFixed(digits) : "—");
const sig = (v) => (typeof v === "number" ? Number(v.toPrecision(4)).toString() : "—");
const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "—");
const shortModel = (m) => (m ? String(m).split("/").filter(Boolean).pop() : "—");

let timers = [];
let charts = [];
function every(ms, fn) {
  fn();
  timers.push(setInterval(fn, ms));
}
function leaveView() {
  timers.forEach(clearInterval);
  timers = [];
  charts.forEach((c) => c.destroy());
  charts = [];
}

function copyable(command, id) {
  const code = el("code", { class: "command", text: command, id: id || null });
  const button = el("button", {
    class: "copy",
    text: "copy",
    onclick: async () => {
      try {
        await navigator.clipboard.writeText(command);
        button.textContent = "copied";
      } catch (err) {
        const range = document.createRange();
        range.selectNodeContents(code);
        getSelection().removeAllRanges();
        getSelection().addRange(range);
        button.textContent = "selected: Ctrl-C";
      }
      setTimeout(() => (button.textContent = "copy"), 1500);
    },
  });
  return el("div", { class: "copyable" }, code, button);
}

function statusBadge(status) {
  return el("span", { class: `status status-${status}`, text: status });
}

function section(title, id, ...children) {
  return el("section", { id }, el("h2", { text: title }), ...children);
}

// ---- metrics streams: rows of metrics.jsonl, read incrementally ---------------------------------------------

class MetricsStream {
  constructor(run) {
    this.run = run;
    this.rows = [];
    this.next = 0;
    this.generation = -1;
    this.badLines = 0;
  }

  // true when rows were added (or the file was rewritten)
  async poll() {
    const body = await api(
      `api/metrics?run=${q(this.run)}&since=${this.next}&generation=${this.generation}`
    );
    const reset = body.generation !== this.generation || body.since !== this.next;
    if (reset) this.rows = [];
    this.rows.push(...body.rows);
    this.generation = body.generation;
    this.next = body.next;
    this.badLines = body.bad_lines;
    return reset || body.rows.length > 0;
  }
}

const isTrain = (r) => typeof r.loss === "number" && !("skipped" in r);

// per-step tokens/s from the cumulative tokens and seconds of consecutive training rows
function tokensPerSecond(rows) {
  const out = [];
  let prev = null;
  for (const r of rows.filter(isTrain)) {
    if (prev && typeof r.tokens === "number" && typeof r.elapsed_s === "number" && r.elapsed_s > prev.elapsed_s) {
      out.push([r.step, (r.tokens - prev.tokens) / (r.elapsed_s - prev.elapsed_s)]);
    }
    prev = r;
  }
  return out;
}

function pointsOf(rows, key, filter) {
  return rows
    .filter((r) => (!filter || filter(r)) && typeof r[key] === "number" && Number.isFinite(r[key]))
    .map((r) => [r.step, r[key]]);
}

// the curves a run page can show: [key, title, points(rows, extra) -> [[step, value]]]
const PANELS = [
  ["loss", "loss", (rows) => pointsOf(rows, "loss", isTrain), true],
  ["eval_loss", "eval loss", (rows) => pointsOf(rows, "eval_loss"), true],
  ["grad_norm", "gradient norm", (rows) => pointsOf(rows, "grad_norm", isTrain), true],
  ["lr", "learning rate", (rows) => pointsOf(rows, "lr", isTrain), true],
  ["tokens_per_s", "tokens / s", tokensPerSecond, true],
  ["gpu_memory", "GPU memory (GiB)", (rows) => pointsOf(rows, "gpu_memory_gib", isTrain), false],
  ["reward", "reward", (rows) => pointsOf(rows, "reward", isTrain), false],
  ["kl", "KL", (rows) => pointsOf(rows, "kl", isTrain), false],
  ["margins", "reward margin (chosen − rejected)", (rows) => pointsOf(rows, "rewards/margins", isTrain), false],
  ["accuracy", "preference accuracy", (rows) => pointsOf(rows, "rewards/accuracies", isTrain), false],
];

// notices the monitor and the loop write: warnings, skipped steps, out-of-memory recoveries
function noticesOf(rows) {
  const out = [];
  for (const r of rows) {
    if (r.warning) out.push({ step: r.step, kind: r.warning, text: r.message || r.warning });
    else if (r.skipped) out.push({ step: r.step, kind: "skipped", text: `step skipped: ${r.skipped}` });
    else if (r.event) {
      const extra = Object.entries(r)
        .filter(([k]) => k !== "step" && k !== "event")
        .map(([k, v]) => `${k} ${typeof v === "object" ? JSON.stringify(v) : v}`)
        .join(", ");
      out.push({ step: r.step, kind: r.event, text: `${r.event.replaceAll("_", " ")}${extra ? ": " + extra : ""}` });
    }
  }
  return out;
}

// ---- charts (uPlot) -----------------------------------------------------------------------------------------

// an axis label: short, and distinct for small values (learning rates)
function tick(v) {
  if (v === null || v === undefined) return "";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-2 || a >= 1e5)) return v.toExponential(1);
  return Number(v.toPrecision(4)).toString();
}

// x: sorted union of the series' steps; each series' y aligned to it (null where it has no value)
function align(seriesPoints) {
  const steps = [...new Set(seriesPoints.flatMap((pts) => pts.map((p) => p[0])))].sort((a, b) => a - b);
  const index = new Map(steps.map((s, i) => [s, i]));
  const ys = seriesPoints.map((pts) => {
    const y = new Array(steps.length).fill(null);
    for (const [s, v] of pts) y[index.get(s)] = v;
    return y;
  });
  return [steps, ...ys];
}

function markerPlugin(getMarks) {
  return {
    hooks: {
      draw: (u) => {
        const ctx = u.ctx;
        ctx.save();
        for (const mark of getMarks()) {
          const x = Math.round(u.valToPos(mark.step, "x", true));
          if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
          ctx.strokeStyle = mark.kind === "skipped" ? "#dc2626" : mark.kind === "out_of_memory" ? "#9333ea" : "#d97706";
          ctx.lineWidth = 2 * devicePixelRatio;
          ctx.setLineDash([4 * devicePixelRatio, 3 * devicePixelRatio]);
          ctx.beginPath();
          ctx.moveTo(x, u.bbox.top);
          ctx.lineTo(x, u.bbox.top + u.bbox.height);
          ctx.stroke();
        }
        ctx.restore();
      },
    },
  };
}

class Chart {
  // labels: one per series; marks: () => [{step, kind}] drawn as vertical lines
  constructor(container, key, title, labels, marks) {
    this.container = container;
    this.key = key;
    this.labels = labels;
    this.body = el("div", { class: "chart-body" });
    this.empty = el("p", { class: "muted chart-empty", text: "no points yet" });
    container.append(el("h3", { text: title }), this.body, this.empty);
    container.setAttribute("data-key", key);
    const width = Math.max(280, container.clientWidth - 16 || 460);
    const opts = {
      width,
      height: 200,
      scales: { x: { time: false } },
      axes: [{ label: "step", incrs: STEP_INCREMENTS }, { size: 64, values: (u, ticks) => ticks.map(tick) }],
      series: [
        { label: "step" },
        ...labels.map((label, i) => ({
          label,
          stroke: COLORS[i % COLORS.length],
          width: 1.5,
          spanGaps: true,
          points: { size: 5 },
        })),
      ],
      plugins: marks ? [markerPlugin(marks)] : [],
    };
    this.plot = new uPlot(opts, [[], ...labels.map(() => [])], this.body);
    charts.push(this);
    this.set(labels.map(() => []));
  }

  set(seriesPoints) {
    const data = align(seriesPoints);
    this.plot.setData(data);
    const counts = seriesPoints.map((pts) => pts.length);
    this.container.setAttribute("data-points", counts.join(","));
    this.container.setAttribute("data-series", String(counts.length));
    this.empty.hidden = counts.some((n) => n > 0);
  }

  destroy() {
    this.plot.destroy();
  }
}

// ---- views --------------------------------------------------------------------------------------------------

const view = () => document.getElementById("view");

function showError(err) {
  view().replaceChildren(el("p", { class: "error", id: "error", text: String(err.message || err) }));
}

async function runsView() {
  const selected = new Set();
  const table = el("table", { id: "runs" });
  const compareButton = el("button", {
    id: "compare",
    text: "compare selected",
    disabled: true,
    onclick: () => (location.hash = "#/compare/" + [...selected].map(q).join(",")),
  });
  const empty = el("div", { id: "empty", hidden: true });
  view().replaceChildren(
    el("div", { class: "toolbar" }, el("h1", { text: "Runs" }), compareButton),
    empty,
    table
  );
  const head = el(
    "tr",
    {},
    ["", "run", "status", "model", "method", "steps", "best eval loss", "tokens/s", "peak memory", "started"].map(
      (h) => el("th", { text: h })
    )
  );

  function row(run) {
    const box = el("input", {
      type: "checkbox",
      checked: selected.has(run.name),
      onchange: (e) => {
        e.target.checked ? selected.add(run.name) : selected.delete(run.name);
        compareButton.disabled = selected.size < 2;
      },
    });
    const statusCell = el("td", { class: "status-cell" }, statusBadge(run.status));
    if (run.note) statusCell.append(el("div", { class: "note", text: run.note }));
    if (run.resume_command) statusCell.append(copyable(run.resume_command));
    const name = el("td", {}, el("a", { href: `#/run/${q(run.name)}`, text: run.name }));
    if (run.config_error) name.append(el("div", { class: "config-error", text: run.config_error }));
    const steps = run.max_steps ? `${run.step} / ${run.max_steps}` : `${run.step}`;
    const memory = typeof run.peak_gpu_memory_gib === "number" ? `${num(run.peak_gpu_memory_gib, 2)} GiB` : "—";
    return el(
      "tr",
      { "data-run": run.name, "data-status": run.status },
      el("td", {}, box),
      name,
      statusCell,
      el("td", { text: shortModel(run.model), title: run.model || "" }),
      el("td", { text: run.method || "—" }),
      el("td", { class: "num", text: steps }),
      el("td", { class: "num", text: sig(run.best_eval_loss) }),
      el("td", { class: "num", text: num(run.tokens_per_second, 0) }),
      el("td", { class: "num", text: memory }),
      el("td", { text: when(run.started) })
    );
  }

  every(POLL_LIST_MS, async () => {
    let body;
    try {
      body = await api("api/runs");
    } catch (err) {
      return showError(err);
    }
    document.getElementById("root").textContent = body.root;
    const names = new Set(body.runs.map((r) => r.name));
    [...selected].filter((n) => !names.has(n)).forEach((n) => selected.delete(n));
    table.hidden = body.runs.length === 0;
    empty.hidden = body.runs.length !== 0;
    empty.replaceChildren(
      el("p", { text: `No runs in ${body.root} yet.` }),
      el("p", { class: "muted", text: "Start one, and it appears here as it trains:" }),
      copyable(`velotune train --output_dir ${body.root}/my-run`)
    );
    table.replaceChildren(el("thead", {}, head), el("tbody", {}, body.runs.map(row)));
  });
}

async function runView(name) {
  const stream = new MetricsStream(name);
  let details = null;
  const header = el("div", { class: "run-header" });
  const badLines = el("p", { id: "bad-lines", class: "warning", hidden: true });
  const grid = el("div", { class: "charts" });
  const noticeList = el("ol", { id: "notices" });
  const rest = el("div", {});
  view().replaceChildren(header, badLines, section("Curves", "curves", grid), section("Notices", "notices-section", noticeList), rest);

  let notices = [];
  const panels = new Map();
  function drawCharts() {
    notices = noticesOf(stream.rows);
    for (const [key, title, points, always] of PANELS) {
      let pts = points(stream.rows);
      if (!panels.has(key) && (always || pts.length)) {
        const box = el("div", { class: "chart", id: `chart-${key}` });
        grid.append(box);
        const labels = key === "gpu_memory" ? ["peak allocated", "planned"] : [title];
        panels.set(key, new Chart(box, key, title, labels, key === "loss" ? () => notices : null));
      }
      if (!panels.has(key)) continue;
      if (key === "gpu_memory") {
        const planned = details && details.planned_gpu_memory_gib;
        pts = [pts, planned ? pts.map(([s]) => [s, planned]) : []];
      } else pts = [pts];
      panels.get(key).set(pts);
    }
    const loss = document.getElementById("chart-loss");
    if (loss) loss.setAttribute("data-notices", String(notices.length));
    noticeList.replaceChildren(
      ...notices.map((n) =>
        el("li", { class: `notice notice-${n.kind}`, "data-step": n.step }, el("b", { text: `step ${n.step}` }), " ", n.text)
      )
    );
    if (!notices.length) noticeList.append(el("li", { class: "muted", text: "none: no skipped steps, out-of-memory recoveries or warnings" }));
    badLines.hidden = !stream.badLines;
    badLines.textContent = `${stream.badLines} malformed line${stream.badLines === 1 ? "" : "s"} of metrics.jsonl skipped`;
  }

  function drawDetails(d) {
    header.replaceChildren(
      ...[
      el("h1", {}, el("span", { id: "run-name", text: d.name }), " ", statusBadge(d.status)),
      el("p", { class: "muted", text: `${d.model || "model unknown"} · ${d.method || "—"} · ${d.path}` }),
      d.note ? el("p", { class: "note", id: "status-note", text: d.note }) : null,
      d.resume_command ? el("div", {}, el("p", { text: "resume with:" }), copyable(d.resume_command, "resume-command")) : null,
      ].filter(Boolean)
    );
    const parts = [];
    parts.push(
      section(
        "Config",
        "config",
        d.config_error
          ? el("p", { class: "error config-error", text: d.config_error })
          : el("pre", { text: d.config_text || "" })
      )
    );
    parts.push(
      section(
        "Data",
        "data-report",
        d.data_report
          ? el("pre", { class: "wrap", text: d.data_report })
          : el("p", { class: "muted", text: "this run wrote no data report (data_report.txt); the command below shows one" }),
        d.commands["data inspect"] ? copyable(d.commands["data inspect"]) : null
      )
    );
    parts.push(section("Before / after", "before-after", beforeAfter(d.before_after)));
    parts.push(section("Checkpoints", "checkpoints", checkpointTable(d.checkpoints)));
    parts.push(tryIt(d));
    rest.replaceChildren(...parts);
  }

  async function refreshDetails() {
    try {
      const d = await api(`api/run?run=${q(name)}`);
      const changed = JSON.stringify(d) !== JSON.stringify(details);
      details = d;
      if (changed) {
        // keep the chat pane (its conversation) while the page refreshes the rest
        const chat = document.getElementById("try-it");
        drawDetails(d);
        if (chat && d.status === chat.getAttribute("data-status")) document.getElementById("try-it").replaceWith(chat);
        drawCharts();
      }
    } catch (err) {
      showError(err);
    }
  }

  await refreshDetails();
  every(POLL_METRICS_MS, async () => {
    try {
      if (await stream.poll()) drawCharts();
    } catch (err) {
      /* the run page keeps what it has; the next poll tries again */
    }
  });
  timers.push(setInterval(refreshDetails, POLL_RUN_MS));
}

function beforeAfter(ba) {
  if (!ba) return el("p", { class: "muted", text: "no before/after comparison (written when a run with held-out prompts finishes)" });
  if (ba.metrics) {
    return el(
      "table",
      { class: "before-after" },
      el("tr", {}, el("th", { text: "metric" }), el("th", { text: "before" }), el("th", { text: "after" })),
      ba.metrics.map((m) => el("tr", {}, el("td", { text: m.name }), el("td", { class: "num", text: sig(m.before) }), el("td", { class: "num", text: sig(m.after) })))
    );
  }
  return el(
    "div",
    {},
    el("p", { text: `exact match: base ${ba.score.before}, tuned ${ba.score.after}` }),
    el(
      "table",
      { class: "before-after" },
      el("tr", {}, ["prompt", "reference", "base model", "tuned model"].map((h) => el("th", { text: h }))),
      ba.rows.map((r) =>
        el("tr", {}, el("td", { text: r.prompt || "—" }), el("td", { text: r.reference || "—" }), el("td", { text: r.before }), el("td", { text: r.after }))
      )
    )
  );
}

function checkpointTable(checkpoints) {
  if (!checkpoints.length) return el("p", { class: "muted", text: "no checkpoints (save_steps writes them)" });
  return el(
    "table",
    {},
    el("tr", {}, ["checkpoint", "step", "eval loss", "size"].map((h) => el("th", { text: h }))),
    checkpoints.map((c) =>
      el(
        "tr",
        { "data-checkpoint": c.name },
        el("td", {}, c.name, c.best ? el("span", { class: "best", text: " best" }) : null),
        el("td", { class: "num", text: c.step }),
        el("td", { class: "num", text: sig(c.eval_loss) }),
        el("td", { class: "num", text: `${c.mib} MiB` })
      )
    )
  );
}

function tryIt(d) {
  const pane = el("section", { id: "try-it", "data-status": d.status }, el("h2", { text: "Try it" }));
  const models = [];
  if (d.status === "finished") models.push(["", "the trained model (final)"]);
  for (const c of [...d.checkpoints].reverse()) models.push([c.name, c.name]);
  if (!models.length) {
    pane.append(el("p", { class: "muted", id: "chat-unavailable", text: "chat opens when the run has finished or written a checkpoint" }));
  } else {
    const select = el("select", { id: "chat-model" }, models.map(([value, label]) => el("option", { value, text: label })));
    const log = el("div", { id: "chat-log" });
    const input = el("textarea", { id: "chat-input", rows: 2, placeholder: "a message to the model" });
    const maxTokens = el("input", { id: "chat-max-tokens", type: "number", value: 64, min: 1, max: 1024 });
    let messages = [];
    const send = el("button", {
      id: "chat-send",
      text: "send",
      onclick: async () => {
        const text = input.value.trim();
        if (!text) return;
        messages.push({ role: "user", content: text });
        log.append(el("div", { class: "msg user", text }));
        const waiting = el("div", { class: "msg assistant pending", text: "…" });
        log.append(waiting);
        input.value = "";
        send.disabled = true;
        try {
          const body = await api("api/chat", {
            method: "POST",
            headers: { "Content-Type": "application/json" },
            body: JSON.stringify({
              run: d.name,
              checkpoint: select.value || null,
              messages,
              max_new_tokens: Number(maxTokens.value) || 64,
            }),
          });
          messages.push({ role: "assistant", content: body.text });
          waiting.replaceWith(el("div", { class: "msg assistant", text: body.text }));
        } catch (err) {
          messages.pop();
          waiting.replaceWith(el("div", { class: "msg error", text: String(err.message || err) }));
        } finally {
          send.disabled = false;
        }
      },
    });
    const reset = el("button", { text: "new conversation", onclick: () => ((messages = []), log.replaceChildren()) });
    select.addEventListener("change", () => ((messages = []), log.replaceChildren()));
    pane.append(
      el("div", { class: "chat-controls" }, el("label", {}, "model ", select), el("label", {}, "max new tokens ", maxTokens), reset),
      log,
      el("div", { class: "chat-input" }, input, send)
    );
  }
  const exports = Object.entries(d.commands).filter(([k]) => k !== "data inspect");
  if (exports.length) {
    pane.append(el("h3", { text: "Use it" }), ...exports.map(([label, command]) => el("div", { class: "command-row" }, el("span", { class: "label", text: label }), copyable(command))));
  }
  return pane;
}

async function compareView(names) {
  const streams = names.map((n) => new MetricsStream(n));
  const grid = el("div", { class: "charts" });
  const diff = el("div", { id: "config-diff" });
  view().replaceChildren(
    el("h1", { text: "Compare" }),
    el("p", {}, ...names.map((n, i) => el("a", { class: "run-chip", href: `#/run/${q(n)}`, text: n, style: `border-color:${COLORS[i % COLORS.length]}` }))),
    section("Curves", "curves", grid),
    section("Config differences", "differences", diff)
  );
  const panels = PANELS.filter(([key]) => ["loss", "eval_loss", "grad_norm", "lr", "tokens_per_s", "reward", "kl"].includes(key));
  const shown = new Map();
  function draw() {
    for (const [key, title, points, always] of panels) {
      const pts = streams.map((s) => points(s.rows));
      if (!shown.has(key) && (always || pts.some((p) => p.length))) {
        const box = el("div", { class: "chart", id: `chart-${key}` });
        grid.append(box);
        shown.set(key, new Chart(box, key, title, names, null));
      }
      if (shown.has(key)) shown.get(key).set(pts);
    }
  }
  try {
    const body = await api(`api/compare?${names.map((n) => "run=" + q(n)).join("&")}`);
    if (!body.differences.length) diff.append(el("p", { class: "muted", text: "the runs have the same settings" }));
    else {
      diff.append(
        el(
          "table",
          {},
          el("tr", {}, el("th", { text: "setting" }), names.map((n) => el("th", { text: n }))),
          body.differences.map((d) =>
            el("tr", { "data-key": d.key }, el("td", { text: d.key }), names.map((n) => el("td", { text: JSON.stringify(d.values[n]) })))
          )
        )
      );
    }
  } catch (err) {
    return showError(err);
  }
  every(POLL_METRICS_MS * 2, async () => {
    try {
      const changed = await Promise.all(streams.map((s) => s.poll()));
      if (changed.some(Boolean)) draw();
    } catch (err) {
      /* try again at the next poll */
    }
  });
}

// ---- routing ------------------------------------------------------------------------------------------------

function route() {
  leaveView();
  const hash = location.hash.replace(/^#\/?/, "");
  if (hash.startsWith("run/")) return runView(decodeURIComponent(hash.slice(4)));
  if (hash.startsWith("compare/")) {
    const names = hash.slice(8).split(",").filter(Boolean).map(decodeURIComponent);
    return compareView(names);
  }
  return runsView();
}

window.addEventListener("hashchange", route);
route();
