// Monitoring page: GET /v1/monitoring and plot each drift signal's PSI over time (inline SVG).
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
  // The performance section's hook: filled once live performance is measured (readers' feedback).
  if (report.performance !== null) {
    $("performance-status").textContent = "Live performance against readers' findings:";
    $("performance-report").textContent = JSON.stringify(report.performance, null, 2);
    $("performance-report").hidden = false;
  }
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
