// Clinician page: send one slice to POST /v1/predict?cam=png and show the answer.
// Plain browser JavaScript, no build step, no third-party code; talks only to its own origin.
"use strict";

const API_MODEL = "v1/model";
const API_PREDICT = "v1/predict?cam=png";

// Presentation names for the labels this project's models use; any other label is shown as it is.
const DISPLAY_NAMES = {
  glioma: "Glioma",
  meningioma: "Meningioma",
  notumor: "No tumour",
  pituitary: "Pituitary tumour",
};

const $ = (id) => document.getElementById(id);

// An API key, when the service asks for one (401): kept for this tab only, sent as X-API-Key.
const KEY_STORAGE = "btd-api-key";
let pendingFile = null; // the file to analyse once a key has been given

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function withKey(headers) {
  const key = apiKey();
  return key ? { ...headers, "X-API-Key": key } : headers;
}

function askForKey(message) {
  const form = $("key-form");
  $("key-help").textContent = message;
  form.hidden = false;
  $("api-key").focus();
}

function displayName(label) {
  return DISPLAY_NAMES[label] || label;
}

function percent(p, digits = 1) {
  return `${(100 * p).toFixed(digits)}%`;
}

function milliseconds(ms) {
  return ms >= 100 ? `${Math.round(ms)} ms` : `${ms.toFixed(1)} ms`;
}

// A problem+json (RFC 9457) body or anything else the server sent, as one sentence for people.
async function problemText(response) {
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    /* not JSON: fall back to the status line */
  }
  const what = (body && (body.detail || body.title)) || response.statusText || "unknown error";
  const advice = {
    400: "Check that the file is an intact PNG, JPEG or DICOM image.",
    401: "Enter a valid API key.",
    403: "This API key may not do this, or the page was opened from another site.",
    413: "Choose a smaller image.",
    415: "Choose a PNG, JPEG or DICOM file.",
    422: "Choose a file that contains an image.",
    429: "Too many requests from this key or computer; wait a moment.",
    503: "The service is busy or starting; try again in a moment.",
    504: "The service took too long; try again.",
  }[response.status];
  const sentence = what.charAt(0).toUpperCase() + what.slice(1);
  return `${sentence}${/[.!?]$/.test(sentence) ? "" : "."}${advice ? " " + advice : ""} (HTTP ${response.status})`;
}

function setState(state) {
  document.body.dataset.state = state;
  $("file-input").disabled = state === "busy";
  $("result").setAttribute("aria-busy", String(state === "busy"));
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("status").textContent = "";
  $("file-input").value = ""; // so choosing the same file again (e.g. after a 503) retries it
  setState("error");
}

function modelLine(model) {
  return `${model.name} ${model.version}`;
}

// The file picker offers the formats the service says it reads (GET /v1/model "formats").
function acceptFormats(formats) {
  if (!formats.length) return;
  $("file-input").accept = formats.flatMap((f) => [...f.suffixes, f.media_type]).join(",");
  $("drop-help").textContent =
    `Drop one MRI slice here (${formats.map((f) => f.name.split(" ")[0]).join(", ")}), or choose a file.`;
}

async function loadModelInfo() {
  try {
    const response = await fetch(API_MODEL, { headers: withKey({ Accept: "application/json" }) });
    if (response.status === 401) {
      askForKey(
        apiKey()
          ? "That API key was not accepted. Check it, or ask whoever runs the service for a new one."
          : "This service asks for an API key. Ask whoever runs it for yours; the page keeps it in this browser tab only.",
      );
      $("model-info").textContent = "waiting for an API key";
      return;
    }
    if (!response.ok) throw new Error(await problemText(response));
    const model = await response.json();
    acceptFormats(model.formats || []);
    const providers = (model.providers || []).map((p) => p.replace("ExecutionProvider", "")).join(", ");
    $("model-info").textContent =
      `${modelLine(model)} (classes: ${model.labels.map(displayName).join(", ")}` +
      `${providers ? `; running on ${providers}` : ""})`;
  } catch (err) {
    $("model-info").textContent = `not available (${err.message})`;
  }
}

function renderProbabilities(probabilities, topLabel) {
  const list = $("probabilities");
  list.replaceChildren();
  const entries = Object.entries(probabilities).sort((a, b) => b[1] - a[1]);
  for (const [label, p] of entries) {
    const item = document.createElement("li");
    item.dataset.label = label;
    if (label === topLabel) item.classList.add("top");
    const name = document.createElement("span");
    name.className = "bar-name";
    name.textContent = displayName(label);
    const track = document.createElement("span");
    track.className = "bar-track";
    track.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.className = "bar-fill";
    fill.style.display = "block";
    fill.style.width = `${(100 * p).toFixed(2)}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "bar-value";
    value.textContent = percent(p);
    item.append(name, track, value);
    list.append(item);
  }
}

// The service says an image is not assessed: it is out of distribution (not a brain MR slice as the
// model knows them), or its DICOM headers say a plane or sequence the model is not validated for. The
// page then names no class and shows no class activation map; it says why in plain words (from
// ood_reasons), and keeps the service's technical warnings in a collapsed section.
const OOD_PHRASE = "the image does not look like a brain MR slice";
const GATE_PHRASE = "the slice is outside what the model is validated for";
const OOD_REASON_TEXT = {
  modality: "It is not an MR image (it looks like a CT scan, or its DICOM header names another kind of scan).",
  plane: "Its DICOM header names a slice plane the model is not validated for (e.g. sagittal or coronal).",
  sequence: "Its DICOM header names an MR sequence the model is not validated for.",
  model: "It does not look like the brain MR slices this model was trained on.",
  "no-head": "No head could be found in it.",
  "small-image": "It is too small to be a whole MR slice.",
};
const GATE_REASONS = ["plane", "sequence"];

function notAssessed(result) {
  return result.in_distribution === false;
}

function isNotAssessedWarning(w) {
  return w.startsWith(OOD_PHRASE) || w.startsWith(GATE_PHRASE);
}

function plainReason(result) {
  const codes = result.ood_reasons || [];
  const reasons = codes.map((r) => OOD_REASON_TEXT[r]).filter(Boolean);
  const lead = codes.length && codes.every((r) => GATE_REASONS.includes(r))
    ? "Not assessed: this slice is outside what the model is validated for. "
    : "Not assessed: this tool reads brain MR slices only, and this image does not look like one. ";
  return lead + (reasons.length ? reasons.join(" ") + " " : "") +
    "No finding is made; check the image and the study it came from.";
}

function technicalWarning(result) {
  const found = (result.warnings || []).filter(isNotAssessedWarning);
  return found.length ? found.join("; ") : null;
}

function decisionText(result) {
  if (notAssessed(result)) return plainReason(result);
  if (result.tumour_detected === null || result.tumour_detected === undefined) {
    return "This model has no 'no tumour' class, so it makes no tumour / no tumour decision.";
  }
  const p = percent(result.tumour_probability);
  const t = percent(result.threshold, 0);
  return result.tumour_detected
    ? `Tumour suspected: tumour probability ${p} (decision threshold ${t}).`
    : `No tumour suspected: tumour probability ${p} (decision threshold ${t}).`;
}

// ``showMap`` false (not assessed): the slice alone, no heatmap and no caption naming a class.
function renderCam(cam, showMap) {
  const figure = $("cam-figure");
  if (!cam || cam.format !== "png") {
    figure.hidden = true;
    return;
  }
  $("cam-image").src = `data:image/png;base64,${cam.image_png}`;
  $("cam-image").width = cam.width;
  $("cam-image").height = cam.height;
  if (showMap) $("cam-heatmap").src = `data:image/png;base64,${cam.heatmap_png}`;
  else $("cam-heatmap").removeAttribute("src");
  $("cam-label").textContent = showMap ? displayName(cam.label) : "";
  $("cam-caption-map").hidden = !showMap;
  $("cam-caption-ood").hidden = showMap;
  $("cam-controls").hidden = !showMap;
  figure.dataset.map = String(showMap);
  figure.hidden = false;
  applyCamControls();
}

// The tumour region (a model with a tumour map, a called tumour): its contours and box, drawn in the
// decoded image's pixels over the picture of the image (an SVG whose viewBox is the image's size).
const SVG_NS = "http://www.w3.org/2000/svg";

function renderRegion(region, shown) {
  const has = Boolean(region) && shown;
  $("region-control").hidden = !has;
  $("region-caption").hidden = !has;
  const overlay = $("region-overlay");
  const contours = $("region-contours");
  contours.replaceChildren();
  overlay.dataset.present = String(has);
  if (has) {
    overlay.setAttribute("viewBox", `0 0 ${region.image_width} ${region.image_height}`);
    for (const contour of region.contours) {
      const polygon = document.createElementNS(SVG_NS, "polygon");
      // Contour points are pixel centres; in the SVG a pixel i spans [i, i + 1].
      polygon.setAttribute("points", contour.map(([x, y]) => `${x + 0.5},${y + 0.5}`).join(" "));
      contours.append(polygon);
    }
    const box = $("region-box");
    for (const key of ["x", "y", "width", "height"]) box.setAttribute(key, region.box[key]);
    $("region-text").textContent =
      `${region.box.width} × ${region.box.height} pixels at (${region.box.x}, ${region.box.y}), ` +
      `${percent(region.area_share)} of the area the model saw`;
  }
  applyRegionControl();
}

function applyRegionControl() {
  const overlay = $("region-overlay"); // an SVG element: no ``hidden`` property, the attribute itself
  overlay.toggleAttribute("hidden", !(overlay.dataset.present === "true" && $("region-toggle").checked));
}

function applyCamControls() {
  const opacity = Number($("cam-opacity").value) / 100;
  const visible = $("cam-toggle").checked && $("cam-figure").dataset.map !== "false";
  $("cam-heatmap").style.opacity = visible ? String(opacity) : "0";
  $("cam-heatmap").hidden = !visible;
  $("cam-opacity").disabled = !visible;
  $("cam-opacity-value").textContent = percent(opacity, 0);
}

function renderTimings(timings, roundTripMs) {
  const t = timings || {};
  const parts = ["decode", "preprocess", "queue", "inference", "cam", "region"]
    .filter((k) => typeof t[k] === "number" && (k !== "region" || t[k] > 0))
    .map((k) => `${k} ${milliseconds(t[k])}`);
  $("timing-server").textContent =
    typeof t.total === "number" ? `${milliseconds(t.total)}${parts.length ? ` (${parts.join(", ")})` : ""}` : "not reported";
  $("timing-roundtrip").textContent = milliseconds(roundTripMs);
}

function renderResult(fileName, result, roundTripMs) {
  const ood = notAssessed(result);
  $("result-file").textContent = fileName;
  $("result-label-name").textContent = ood ? "Result" : "Most likely class";
  $("result-label").textContent = ood ? "Not assessed" : displayName(result.label);
  const decision = $("result-decision");
  decision.textContent = decisionText(result);
  decision.classList.toggle("positive", !ood && result.tumour_detected === true);
  decision.classList.toggle("ood", ood);
  decision.setAttribute("role", ood ? "alert" : "status");
  // Not assessed: no class is named anywhere on the page (no bars), the service's words go below.
  $("class-scores").hidden = ood;
  if (ood) $("probabilities").replaceChildren();
  else renderProbabilities(result.probabilities, result.label);
  const technical = ood ? technicalWarning(result) : null;
  $("ood-technical").textContent = technical ? technical.charAt(0).toUpperCase() + technical.slice(1) + "." : "";
  $("ood-details").hidden = !technical;
  $("ood-details").open = false;
  const warnings = $("warnings");
  warnings.replaceChildren(
    ...(result.warnings || [])
      .filter((w) => !isNotAssessedWarning(w)) // the not-assessed reason is shown above
      .map((w) => Object.assign(document.createElement("li"), { textContent: w })),
  );
  warnings.hidden = warnings.children.length === 0;
  renderTimings(result.timings_ms, roundTripMs);
  $("result-model").textContent = `${modelLine(result.model)} (sha256 ${String(result.model.sha256 || "").slice(0, 12)}…)`;
  $("result-request-id").textContent = result.request_id || "";
  renderCam(result.cam, !ood);
  renderRegion(result.region, Boolean(result.cam) && !ood);
  $("result").hidden = false;
  $("status").textContent = ood
    ? `Result for ${fileName}: ${plainReason(result)}`
    : `Result for ${fileName}: ${displayName(result.label)}, ${percent(result.probabilities[result.label])}. ` +
      decisionText(result);
  setState("done");
}

async function analyse(file) {
  $("error").hidden = true;
  $("result").hidden = true;
  $("status").textContent = `Analysing ${file.name}…`;
  setState("busy");
  const started = performance.now();
  try {
    const response = await fetch(API_PREDICT, {
      method: "POST",
      // The service recognises the format by its signature: one place knows the formats.
      headers: withKey({ "Content-Type": "application/octet-stream", Accept: "application/json" }),
      body: file,
    });
    if (response.status === 401) {
      pendingFile = file;
      showError(`${file.name} was not analysed: the service needs a valid API key. ${await problemText(response)}`);
      askForKey("Enter your API key; the file is analysed as soon as it is accepted.");
      return;
    }
    if (!response.ok) {
      showError(`${file.name} could not be analysed. ${await problemText(response)}`);
      return;
    }
    const result = await response.json();
    renderResult(file.name, result, performance.now() - started);
  } catch (err) {
    showError(`${file.name} could not be analysed: the service did not answer (${err.message}).`);
  }
}

function setUpDropZone() {
  const zone = $("drop-zone");
  const stop = (event) => {
    event.preventDefault();
    event.stopPropagation();
  };
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      stop(event);
      zone.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, (event) => {
      stop(event);
      zone.classList.remove("dragging");
    });
  }
  zone.addEventListener("drop", (event) => {
    const files = event.dataTransfer && event.dataTransfer.files;
    if (files && files.length > 0) {
      $("file-input").value = ""; // the picker no longer names the file being shown
      analyse(files[0]); // one slice at a time; the CLI does batches
    }
  });
  // A file dropped outside the zone must not make the browser navigate away from the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
}

async function useKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("api-key").value = "";
  $("key-form").hidden = true;
  await loadModelInfo();
  if (pendingFile && $("key-form").hidden) {
    const file = pendingFile;
    pendingFile = null;
    analyse(file);
  }
}

function init() {
  $("key-form").addEventListener("submit", useKey);
  $("file-input").addEventListener("change", (event) => {
    const file = event.target.files && event.target.files[0];
    if (file) analyse(file);
  });
  $("cam-toggle").addEventListener("change", applyCamControls);
  $("cam-opacity").addEventListener("input", applyCamControls);
  $("region-toggle").addEventListener("change", applyRegionControl);
  setUpDropZone();
  applyCamControls();
  loadModelInfo();
}

document.addEventListener("DOMContentLoaded", init);
