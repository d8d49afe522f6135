// Monitoring page: GET /v1/monitoring; plot each drift signal's PSI over time and, per model version, live
// performance against readers' findings (interval bars, reliability diagram, confusion matrix), all inline SVG.
// Plain browser JavaScript, no build step, no third-party code; talks only to its own origin.
"use strict";

const API_MONITORING = "v1/monitoring";
const KEY_STORAGE = "btd-api-key"; // shared with the clinician page: one key per tab
const REFRESH_MS = 60000;
const SIGNAL_NAMES = {
  class_mix: "Predicted class mix",
  tumour_probability: "Tumour probability",
  ood_score: "Out-of-distribution score",
  intensity: "Input intensity (p05 / p99)",
};
const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 360;
const HEIGHT = 160;
const PAD = { left: 40, right: 10, top: 10, bottom: 24 };

const $ = (id) => document.getElementById(id);

function withKey(headers) {
  const key = sessionStorage.getItem(KEY_STORAGE) || "";
  return key ? { ...headers, "X-API-Key": key } : headers;
}

function svgElement(name, attributes) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  return element;
}

function timeLabel(iso) {
  return iso ? new Date(iso).toLocaleString() : "?";
}

// One signal's PSI over time as a line with the threshold dashed; a table says the same for screen readers.
function chart(name, signal) {
  const figure = document.createElement("figure");
  figure.className = "drift-chart";
  const points = signal.history.filter((p) => p.psi !== null);
  const top = Math.max(signal.threshold * 2, ...points.map((p) => p.psi)) * 1.05;
  const x = (i) => PAD.left + (points.length > 1 ? (i / (points.length - 1)) : 0.5) * (WIDTH - PAD.left - PAD.right);
  const y = (v) => HEIGHT - PAD.bottom - (v / top) * (HEIGHT - PAD.top - PAD.bottom);
  const svg = svgElement("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img",
    "aria-label": `${SIGNAL_NAMES[name] || name}: PSI over the last ${points.length} windows` });
  svg.append(svgElement("line", { x1: PAD.left, x2: PAD.left, y1: PAD.top, y2: HEIGHT - PAD.bottom, class: "axis" }));
  svg.append(svgElement("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: HEIGHT - PAD.bottom,
    y2: HEIGHT - PAD.bottom, class: "axis" }));
  // Value ticks at 0, the threshold and the top; one too close to another (under 12 px) is left out.
  let lastY = Infinity;
  for (const v of [0, signal.threshold, top]) {
    if (lastY - y(v) < 12) continue;
    lastY = y(v);
    const label = svgElement("text", { x: PAD.left - 4, y: y(v) + 4, class: "tick" });
    label.textContent = v.toFixed(2);
    svg.append(label);
  }
  // Time ticks: when the oldest and the newest window plotted ended.
  if (points.length) {
    const ends = points.length > 1 ? [[0, "start"], [points.length - 1, "end"]] : [[0, "middle"]];
    for (const [i, anchor] of ends) {
      const label = svgElement("text", { x: x(i), y: HEIGHT - 6, class: `tick time-${anchor}` });
      label.textContent = points[i].end ? new Date(points[i].end).toLocaleTimeString() : "";
      svg.append(label);
    }
  }
  svg.append(svgElement("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: y(signal.threshold),
    y2: y(signal.threshold), class: "threshold" }));
  if (points.length) {
    svg.append(svgElement("polyline", { points: points.map((p, i) => `${x(i)},${y(p.psi)}`).join(" "), class: "psi" }));
    points.forEach((p, i) => {
      const dot = svgElement("circle", { cx: x(i), cy: y(p.psi), r: 3, class: p.psi > signal.threshold ? "over" : "psi-dot" });
      const tip = svgElement("title", {});
      tip.textContent = `${timeLabel(p.end)}: PSI ${p.psi.toFixed(3)} (${p.records} answers)`;
      dot.append(tip);
      svg.append(dot);
    });
  }
  const caption = document.createElement("figcaption");
  const now = signal.psi === null ? "no value" : `PSI ${signal.psi.toFixed(3)}`;
  const ks = signal.ks === null ? "" : `, KS ${signal.ks.toFixed(3)}`;
  caption.textContent = `${SIGNAL_NAMES[name] || name}: ${now}${ks} over ${signal.records} answers` +
    (signal.over_threshold ? " - over the threshold" : "");
  if (signal.over_threshold) caption.className = "over-text";
  const table = document.createElement("table");
  table.className = "visually-hidden";
  table.innerHTML = "<caption></caption><thead><tr><th>Window ending</th><th>Answers</th><th>PSI</th></tr></thead>";
  table.caption.textContent = `${SIGNAL_NAMES[name] || name} over time`;
  const body = document.createElement("tbody");
  for (const p of signal.history) {
    const row = body.insertRow();
    row.insertCell().textContent = timeLabel(p.end);
    row.insertCell().textContent = String(p.records);
    row.insertCell().textContent = p.psi === null ? "-" : p.psi.toFixed(3);
  }
  table.append(body);
  figure.append(caption, svg, table);
  return figure;
}

function render(report) {
  const drift = report.drift;
  $("model-info").textContent = `${report.model_name} ${report.model_version}`;
  $("drift-window").textContent = drift.rule.window;
  $("drift-threshold").textContent = drift.rule.psi_threshold;
  $("drift-min").textContent = drift.rule.min_records;
  const when = drift.refreshed_at ? `, measured ${timeLabel(drift.refreshed_at)}` : "";
  const words = { ok: "No drift", alert: "Drift alert", pending: "Not measured yet", "no-baseline": "No baseline",
    "no-records": "No records", unavailable: "Records unavailable" };
  $("drift-status").textContent = `${words[drift.status] || drift.status}: ${drift.window_records} answers in the ` +
    `window${when}` + (drift.reason ? ` (${drift.reason})` : "");
  $("drift-status").className = drift.alert ? "status error" : "status";
  const charts = $("drift-charts");
  charts.replaceChildren(...Object.entries(drift.signals).map(([name, signal]) => chart(name, signal)));
  renderPerformance(report.performance, report.model_version);
}

const PROPORTIONS = {
  sensitivity: "Sensitivity (tumour found when readers found one)",
  specificity: "Specificity (no tumour when readers found none)",
  class_agreement: "Class agreement (the model's class is the readers')",
};
const BAR = { width: 160, height: 18, pad: 4 };
const DIAGRAM = { size: 260, pad: 36 };

const fixed = (v, digits = 2) => (v === null || v === undefined ? "-" : v.toFixed(digits));

function element(name, text, className) {
  const node = document.createElement(name);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

// A proportion's value and interval in words: "0.93 (95% interval 0.84-0.97; 56 of 60)".
function proportionText(p, level) {
  if (p.value === null) return "no case yet";
  return `${fixed(p.value)} (${level} interval ${fixed(p.lower)}-${fixed(p.upper)}; ${p.successes} of ${p.trials})`;
}

// The interval as a bar on a 0-1 scale with a dot at the value; decorative beside the words.
function intervalBar(p) {
  const x = (v) => BAR.pad + v * (BAR.width - 2 * BAR.pad);
  const svg = svgElement("svg", { viewBox: `0 0 ${BAR.width} ${BAR.height}`, class: "interval-bar",
    "aria-hidden": "true" });
  svg.append(svgElement("line", { x1: x(0), x2: x(1), y1: BAR.height / 2, y2: BAR.height / 2, class: "track" }));
  if (p.value !== null) {
    svg.append(svgElement("rect", { x: x(p.lower), y: 4, width: Math.max(1, x(p.upper) - x(p.lower)),
      height: BAR.height - 8, class: "interval" }));
    svg.append(svgElement("circle", { cx: x(p.value), cy: BAR.height / 2, r: 4, class: "value" }));
  }
  return svg;
}

function proportionsTable(model, level) {
  const table = element("table", undefined, "figures");
  table.createCaption().textContent = "Against readers' findings";
  table.createTHead().insertRow().append(...["Figure", "Value and interval", "Interval (0 to 1)"].map((h) => {
    const th = element("th", h);
    th.scope = "col";
    return th;
  }));
  const body = table.createTBody();
  for (const [key, name] of Object.entries(PROPORTIONS)) {
    const row = body.insertRow();
    row.dataset.figure = key;
    const th = element("th", name);
    th.scope = "row";
    row.append(th);
    row.insertCell().textContent = proportionText(model[key], level);
    row.insertCell().append(intervalBar(model[key]));
  }
  return table;
}

// Reliability diagram: each non-empty bin's mean tumour probability against the share readers found a
// tumour (dot area by cases), the diagonal a calibrated model follows; a hidden table says the same.
function reliabilityDiagram(calibration) {
  const figure = element("figure", undefined, "reliability");
  const { size, pad } = DIAGRAM;
  const span = size - 2 * pad;
  const x = (v) => pad + v * span;
  const y = (v) => size - pad - v * span;
  const bins = calibration.reliability || [];
  const filled = bins.filter((b) => b.cases > 0);
  const caption = element("figcaption", calibration.cases
    ? `Reliability of the tumour probability: ECE ${fixed(calibration.ece, 3)} over ${calibration.cases} cases`
    : "Reliability of the tumour probability: no confirmed case with a tumour decision yet");
  const svg = svgElement("svg", { viewBox: `0 0 ${size} ${size}`, role: "img",
    "aria-label": `Reliability diagram: ${filled.length} of ${bins.length} probability bins hold cases` });
  svg.append(svgElement("rect", { x: pad, y: pad, width: span, height: span, class: "frame" }));
  svg.append(svgElement("line", { x1: x(0), y1: y(0), x2: x(1), y2: y(1), class: "diagonal" }));
  for (const v of [0, 0.5, 1]) {
    const left = svgElement("text", { x: pad - 4, y: y(v) + 4, class: "tick" });
    left.textContent = v.toFixed(1);
    const bottom = svgElement("text", { x: x(v), y: size - pad + 14, class: "tick tick-x" });
    bottom.textContent = v.toFixed(1);
    svg.append(left, bottom);
  }
  const xName = svgElement("text", { x: size / 2, y: size - 4, class: "axis-name" });
  xName.textContent = "Mean predicted tumour probability";
  const yName = svgElement("text", { x: 0, y: 0, class: "axis-name",
    transform: `translate(10 ${size / 2}) rotate(-90)` });
  yName.textContent = "Readers found a tumour";
  svg.append(xName, yName);
  const most = Math.max(1, ...filled.map((b) => b.cases));
  for (const b of filled) {
    const dot = svgElement("circle", { cx: x(b.mean_probability), cy: y(b.observed),
      r: 3 + 5 * Math.sqrt(b.cases / most), class: "bin" });
    const tip = svgElement("title", {});
    tip.textContent = `${fixed(b.lower, 1)}-${fixed(b.upper, 1)}: ${b.cases} cases, mean probability ` +
      `${fixed(b.mean_probability)}, tumour found in ${fixed(b.observed)}`;
    dot.append(tip);
    svg.append(dot);
  }
  const table = element("table", undefined, "visually-hidden");
  table.createCaption().textContent = "Reliability bins";
  table.createTHead().insertRow().append(...["Probability bin", "Cases", "Mean probability",
    "Share with a tumour"].map((h) => element("th", h)));
  const body = table.createTBody();
  for (const b of bins) {
    const row = body.insertRow();
    for (const text of [`${fixed(b.lower, 1)}-${fixed(b.upper, 1)}`, String(b.cases), fixed(b.mean_probability),
      fixed(b.observed)]) row.insertCell().textContent = text;
  }
  figure.append(caption, svg, table);
  return figure;
}

// The model's class (rows) against the readers' (columns), with totals; the diagonal is agreement.
function confusionTable(confusion) {
  const { labels, counts } = confusion;
  if (!labels.length) return element("p", "Confusion matrix: no reader has named a class yet.", "muted-note");
  const table = element("table", undefined, "confusion");
  table.createCaption().textContent = "The model's class (rows) against the readers' class (columns)";
  const head = table.createTHead().insertRow();
  const corner = element("th", "Model ↓ readers →");
  corner.scope = "col";
  head.append(corner, ...[...labels, "Total"].map((label) => {
    const th = element("th", label);
    th.scope = "col";
    return th;
  }));
  const body = table.createTBody();
  const columnTotals = labels.map((_, j) => counts.reduce((sum, row) => sum + row[j], 0));
  labels.forEach((label, i) => {
    const row = body.insertRow();
    const th = element("th", label);
    th.scope = "row";
    row.append(th);
    counts[i].forEach((n, j) => {
      const cell = row.insertCell();
      cell.textContent = String(n);
      if (i === j) cell.className = "agree";
    });
    row.insertCell().textContent = String(counts[i].reduce((a, b) => a + b, 0));
    row.lastChild.className = "total";
  });
  const foot = table.createTFoot().insertRow();
  const th = element("th", "Total");
  th.scope = "row";
  foot.append(th);
  for (const n of [...columnTotals, columnTotals.reduce((a, b) => a + b, 0)]) {
    foot.insertCell().textContent = String(n);
  }
  return table;
}

function modelSection(version, model, level, served) {
  const section = element("section", undefined, "model-performance");
  const headingId = `performance-${version.replace(/[^A-Za-z0-9_-]/g, "_")}`;
  section.setAttribute("aria-labelledby", headingId);
  section.dataset.version = version;
  const heading = element("h3", `Model ${version}${served ? " (served now)" : ""}`);
  heading.id = headingId;
  const extra = [model.not_assessed ? `${model.not_assessed} not assessed (in no figure)` : "",
    model.disputed ? `${model.disputed} with readers tied (left out of that figure)` : ""].filter(Boolean);
  const summary = element("p", `${model.confirmed} confirmed cases from ${model.readings} readings` +
    (extra.length ? `; ${extra.join(", ")}` : ""), "confirmed");
  const charts = element("div", undefined, "performance-grid");
  charts.append(reliabilityDiagram(model.calibration), confusionTable(model.confusion));
  section.append(heading, summary, proportionsTable(model, level), charts);
  return section;
}

function renderPerformance(performance, servedVersion) {
  const status = $("performance-status");
  const holder = $("performance-models");
  if (performance === null) {
    status.textContent = "Not measured yet: the reliability diagram and the confusion matrix against readers' " +
      "findings appear here once readers' feedback is measured (the service needs records for it).";
    holder.replaceChildren();
    return;
  }
  const level = `${Math.round(performance.confidence_level * 100)}%`;
  $("performance-level").textContent = level;
  const versions = Object.keys(performance.models)
    .sort((a, b) => (b === servedVersion) - (a === servedVersion)); // the served version first
  status.textContent = versions.length
    ? `Measured ${timeLabel(performance.generated_at)} from readers' feedback on ${versions.length} model ` +
      `version${versions.length > 1 ? "s" : ""}.`
    : `No readers' feedback yet (measured ${timeLabel(performance.generated_at)}): readers confirm answers ` +
      "with POST /v1/feedback, and the figures appear here.";
  holder.replaceChildren(...versions.map((v) => modelSection(v, performance.models[v], level, v === servedVersion)));
}

async function load() {
  try {
    const response = await fetch(API_MONITORING, { headers: withKey({ Accept: "application/json" }) });
    if (response.status === 401 || response.status === 403) {
      $("key-form").hidden = false;
      $("drift-status").textContent = "This service needs an API key with the predict scope.";
      return;
    }
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      $("drift-status").textContent = `Cannot read the monitoring report: ${body.detail || response.statusText}`;
      return;
    }
    render(await response.json());
  } catch (error) {
    $("drift-status").textContent = `Cannot reach the service: ${error.message}`;
  }
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  $("api-key").value = "";
  $("key-form").hidden = true;
  load();
});

load();
setInterval(load, REFRESH_MS);
