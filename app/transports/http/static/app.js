// Clinician page: send one slice to POST /v1/predict?cam=png, or a series (the DICOM files of one series,
// or one NIfTI volume) to POST /v1/predict/series?cam=png, and show the answer.
// Plain browser JavaScript, no build step, no third-party code; talks only to its own origin.
"use strict";

const API_MODEL = "v1/model";
const API_PREDICT = "v1/predict?cam=png";
const API_SERIES = "v1/predict/series?cam=png";
// A NIfTI volume is a series by itself (sent as its body; the service reads it by its bytes). The image
// formats come from GET /v1/model; the series endpoint's NIfTI names are these.
const NIFTI_SUFFIXES = [".nii", ".nii.gz"];
// DICOM Part 10 files say "DICM" at byte 128 (app.core.formats, the service's own test): a folder's other
// files (DICOMDIR aside, which is DICOM but no image) are left out of a series.
const DICOM_MAGIC = { offset: 128, text: "DICM" };
const API_FEEDBACK = "v1/feedback";

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
let pendingAction = null; // what to send once a key has been given (one file, or a series)
let shownResult = null; // the answer on the page: what the reader's feedback is about
const READER_STORAGE = "btd-reader-code"; // the reader's pseudonymous code, for this tab only

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
const IMAGE_ADVICE = {
  400: "Check that the file is an intact PNG, JPEG or DICOM image.",
  413: "Choose a smaller image.",
  415: "Choose a PNG, JPEG or DICOM file.",
  422: "Choose a file that contains an image.",
};
const SERIES_ADVICE = {
  400: "Check that the files are intact DICOM instances of one series, or one intact NIfTI volume.",
  413: "Send fewer slices or a smaller volume.",
  415: "Choose the DICOM files of one series, or one .nii or .nii.gz file.",
  422: "Choose files that contain images.",
};

async function problemText(response, advice = IMAGE_ADVICE) {
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    /* not JSON: fall back to the status line */
  }
  const what = (body && (body.detail || body.title)) || response.statusText || "unknown error";
  const hint = {
    ...advice,
    401: "Enter a valid API key.",
    403: "This API key may not do this, or the page was opened from another site.",
    429: "Too many requests from this key or computer; wait a moment.",
    503: "The service is busy or starting; try again in a moment.",
    504: "The service took too long; try again.",
  }[response.status];
  const sentence = what.charAt(0).toUpperCase() + what.slice(1);
  return `${sentence}${/[.!?]$/.test(sentence) ? "" : "."}${hint ? " " + hint : ""} (HTTP ${response.status})`;
}

function setState(state) {
  document.body.dataset.state = state;
  $("file-input").disabled = state === "busy";
  $("folder-input").disabled = state === "busy";
  $("result").setAttribute("aria-busy", String(state === "busy"));
  $("series-result").setAttribute("aria-busy", String(state === "busy"));
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("status").textContent = "";
  $("file-input").value = ""; // so choosing the same file again (e.g. after a 503) retries it
  $("folder-input").value = "";
  setState("error");
}

function modelLine(model) {
  return `${model.name} ${model.version}`;
}

// The file picker offers the formats the service says it reads (GET /v1/model "formats").
function acceptFormats(formats) {
  if (!formats.length) return;
  $("file-input").accept = [...formats.flatMap((f) => [...f.suffixes, f.media_type]), ...NIFTI_SUFFIXES].join(",");
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
  renderFeedback(result);
  renderRegion(result.region, Boolean(result.cam) && !ood);
  $("result").hidden = false;
  $("status").textContent = ood
    ? `Result for ${fileName}: ${plainReason(result)}`
    : `Result for ${fileName}: ${displayName(result.label)}, ${percent(result.probabilities[result.label])}. ` +
      decisionText(result);
  setState("done");
}

// Readers' feedback (POST /v1/feedback): "Agree" sends the model's class back, "Correct it" the class the
// reader picks (the answering model's labels, in its order). Not offered for an image not assessed: the
// model named no class to agree with. The same API key as the predictions: a reader's key needs the
// "feedback" scope too, and a 403 says so.
function renderFeedback(result) {
  shownResult = result;
  const ood = notAssessed(result);
  $("feedback").hidden = ood || !result.request_id;
  $("feedback-form").hidden = true;
  $("feedback-correct").setAttribute("aria-expanded", "false");
  $("feedback-status").textContent = "";
  $("feedback-reader").value = sessionStorage.getItem(READER_STORAGE) || "";
  const select = $("feedback-label");
  select.replaceChildren(
    ...Object.keys(result.probabilities || {})
      .filter((label) => label !== result.label)
      .map((label) => Object.assign(document.createElement("option"), { value: label, textContent: displayName(label) })),
  );
  setFeedbackBusy(false);
}

function setFeedbackBusy(busy) {
  for (const id of ["feedback-agree", "feedback-correct", "feedback-send"]) $(id).disabled = busy;
}

async function sendFeedback(label, corrected) {
  const result = shownResult;
  const reader = $("feedback-reader").value.trim();
  if (reader && !$("feedback-reader").checkValidity()) {
    $("feedback-status").textContent = "The reader code may hold letters, digits, - and _ only (64 at most).";
    return;
  }
  sessionStorage.setItem(READER_STORAGE, reader);
  const body = { request_id: result.request_id, label, ...(reader ? { reader_id: reader } : {}) };
  setFeedbackBusy(true);
  $("feedback-status").textContent = "Sending your reading…";
  try {
    const response = await fetch(API_FEEDBACK, {
      method: "POST",
      headers: withKey({ "Content-Type": "application/json", Accept: "application/json" }),
      body: JSON.stringify(body),
    });
    if (response.status === 403) {
      $("feedback-status").textContent =
        "Your reading was not recorded: this API key may not send feedback (it needs the feedback scope). " +
        "Ask whoever runs the service for a key with it. " + (await problemText(response));
      return;
    }
    if (!response.ok) {
      $("feedback-status").textContent = `Your reading was not recorded. ${await problemText(response)}`;
      return;
    }
    const saved = await response.json();
    $("feedback-form").hidden = true;
    $("feedback-correct").setAttribute("aria-expanded", "false");
    $("feedback-status").textContent = corrected
      ? `Correction recorded: ${displayName(saved.label)}.`
      : `Recorded: you agree (${displayName(saved.label)}).`;
  } catch (err) {
    $("feedback-status").textContent = `Your reading was not recorded: the service did not answer (${err.message}).`;
  } finally {
    setFeedbackBusy(false);
  }
}

function openCorrection() {
  const form = $("feedback-form");
  form.hidden = !form.hidden;
  $("feedback-correct").setAttribute("aria-expanded", String(!form.hidden));
  if (!form.hidden) $("feedback-label").focus();
}

async function analyse(file) {
  $("error").hidden = true;
  $("result").hidden = true;
  $("series-result").hidden = true;
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
      pendingAction = () => analyse(file);
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

// ------------------------------------------------------------------------------------------- series

let shownSeries = null; // the series answer on the page
let selectedSlice = 0;

const isNifti = (file) => NIFTI_SUFFIXES.some((suffix) => file.name.toLowerCase().endsWith(suffix));

async function isDicomFile(file) {
  if (file.name.toUpperCase() === "DICOMDIR") return false; // the folder's index, not an image
  const { offset, text } = DICOM_MAGIC;
  return (await file.slice(offset, offset + text.length).text()) === text;
}

// One file is today's single-image flow (or a NIfTI volume, a series by itself); several files, or a
// folder, are the DICOM instances of one series.
async function chooseFiles(files, fromFolder) {
  setState("busy"); // from now: reading the files' first bytes takes a moment for a large folder
  const visible = files.filter((f) => !f.name.startsWith(".")); // a folder's hidden files (.DS_Store)
  if (visible.length === 1 && !fromFolder) {
    if (isNifti(visible[0])) analyseSeries({ name: visible[0].name, volume: visible[0] });
    else analyse(visible[0]);
    return;
  }
  const niftis = visible.filter(isNifti);
  if (niftis.length) {
    showError(`${niftis[0].name} is a NIfTI volume, a series by itself: choose it alone, not with other files.`);
    return;
  }
  const isDicom = await Promise.all(visible.map(isDicomFile)); // 4 bytes of each file, read side by side
  const dicom = visible.filter((_, i) => isDicom[i]);
  const where = fromFolder ? "this folder" : "these files";
  if (!dicom.length) {
    showError(`None of ${where} is a DICOM file, so there is no series to send. A series is the DICOM files of ` +
      "one series (or one NIfTI volume); choose one PNG, JPEG or DICOM file to classify a single slice.");
    return;
  }
  const left = visible.length - dicom.length;
  const folder = fromFolder && dicom[0].webkitRelativePath ? dicom[0].webkitRelativePath.split("/")[0] : null;
  analyseSeries({
    name: `${folder ? `folder ${folder}: ` : ""}${dicom.length} DICOM file${dicom.length === 1 ? "" : "s"}`,
    instances: dicom,
    note: left ? ` ${left} file${left === 1 ? " that is" : "s that are"} not DICOM images (e.g. ${
      visible.find((f) => !dicom.includes(f)).name}) left out.` : "",
  });
}

// multipart/related; type="application/dicom" (as STOW-RS sends a series), built from the File objects
// themselves: the browser streams them, the page never holds the bytes.
function relatedBody(files) {
  // getRandomValues, not randomUUID: the latter needs a secure context, and a site may serve plain HTTP.
  const random = [...crypto.getRandomValues(new Uint8Array(16))].map((b) => b.toString(16).padStart(2, "0")).join("");
  const boundary = `btd-${random}`;
  const parts = files.flatMap((file) => [`--${boundary}\r\nContent-Type: application/dicom\r\n\r\n`, file, "\r\n"]);
  return {
    body: new Blob([...parts, `--${boundary}--\r\n`]),
    contentType: `multipart/related; type="application/dicom"; boundary=${boundary}`,
  };
}

async function analyseSeries(series) {
  $("error").hidden = true;
  $("result").hidden = true;
  $("series-result").hidden = true;
  $("status").textContent = `Analysing ${series.name}…`;
  setState("busy");
  const started = performance.now();
  const request = series.volume
    ? { body: series.volume, contentType: "application/octet-stream" } // the service reads NIfTI by its bytes
    : relatedBody(series.instances);
  try {
    const response = await fetch(API_SERIES, {
      method: "POST",
      headers: withKey({ "Content-Type": request.contentType, Accept: "application/json" }),
      body: request.body,
    });
    if (response.status === 401) {
      pendingAction = () => analyseSeries(series);
      showError(`${series.name} was not analysed: the service needs a valid API key. ${await problemText(response, SERIES_ADVICE)}`);
      askForKey("Enter your API key; the series is analysed as soon as it is accepted.");
      return;
    }
    if (!response.ok) {
      showError(`${series.name} could not be analysed. ${await problemText(response, SERIES_ADVICE)}`);
      return;
    }
    renderSeries(series, await response.json(), performance.now() - started);
  } catch (err) {
    showError(`${series.name} could not be analysed: the service did not answer (${err.message}).`);
  }
}

const ORDERING_TEXT = {
  position: "by position along the slice normal (from the DICOM or NIfTI headers)",
  "instance-number": "by Instance Number (the headers give no usable positions)",
  received: "as received (the headers give neither positions nor Instance Numbers)",
};

function seriesDecision(finding) {
  if (!finding.assessed) {
    return "Not assessed: no slice of this series is within what the model reads (see why below). " +
      "No finding is made; check the series and the study it came from.";
  }
  if (finding.tumour_detected === null) {
    return "This model has no 'no tumour' class, so it makes no tumour / no tumour decision.";
  }
  const p = percent(finding.tumour_probability);
  const t = percent(finding.threshold, 0);
  return finding.tumour_detected
    ? `Tumour suspected: series tumour probability ${p} (decision threshold ${t}).`
    : `No tumour suspected: series tumour probability ${p} (decision threshold ${t}).`;
}

function findingWord(finding) {
  if (!finding.assessed) return "Not assessed";
  if (finding.tumour_detected === null) return displayName(finding.label);
  return finding.tumour_detected ? "Tumour suspected" : "No tumour suspected";
}

function sliceWords(slice) {
  const r = slice.result;
  const total = shownSeries.slices.length;
  const where = `Slice ${slice.index + 1} of ${total}` +
    (slice.position === null || slice.position === undefined ? "" : ` (${slice.position} mm)`);
  const key = shownSeries.finding.key_slices.includes(slice.index) ? ", key slice" : "";
  if (notAssessed(r)) {
    const reasons = (r.ood_reasons || []).map((c) => OOD_REASON_TEXT[c] || c);
    return `${where}${key}: not assessed. ${reasons.join(" ") || "No reason given."}`;
  }
  const tumour = typeof r.tumour_probability === "number" ? `, tumour probability ${percent(r.tumour_probability)}` : "";
  return `${where}${key}: ${displayName(r.label)} ${percent(r.probabilities[r.label])}${tumour}.`;
}

function renderSeries(series, answer, roundTripMs) {
  shownSeries = answer;
  const finding = answer.finding;
  $("series-file").textContent = series.name;
  $("series-finding").textContent = findingWord(finding);
  const decision = $("series-decision");
  decision.textContent = seriesDecision(finding);
  decision.classList.toggle("positive", finding.tumour_detected === true);
  decision.classList.toggle("ood", !finding.assessed);
  $("series-label").textContent = finding.label ? displayName(finding.label) : "none (not assessed)";
  $("series-probability").textContent = typeof finding.tumour_probability === "number"
    ? `${percent(finding.tumour_probability)} (threshold ${percent(finding.threshold, 0)})` : "not computed";
  $("series-assessed").textContent = `${finding.slices_assessed} of ${answer.slices.length}`;
  $("series-not-assessed").textContent = String(finding.slices_not_assessed);
  $("series-key").textContent = finding.key_slices.length
    ? finding.key_slices.map((i) => `slice ${i + 1}`).join(", ") : "none";
  $("series-ordering").textContent = ORDERING_TEXT[answer.ordering] || answer.ordering;
  const reasons = Object.entries(finding.not_assessed_reasons || {});
  $("series-reasons").replaceChildren(...reasons.map(([code, n]) => Object.assign(document.createElement("li"), {
    textContent: `${n} slice${n === 1 ? "" : "s"}: ${OOD_REASON_TEXT[code] || code}`,
  })));
  $("series-reasons").hidden = reasons.length === 0;
  $("series-rule").textContent = finding.rule.charAt(0).toUpperCase() + finding.rule.slice(1) + ".";
  $("series-warnings").replaceChildren(
    ...(answer.warnings || []).map((w) => Object.assign(document.createElement("li"), { textContent: w })),
  );
  $("series-warnings").hidden = !(answer.warnings || []).length;
  $("series-roundtrip").textContent = milliseconds(roundTripMs);
  $("series-model").textContent = `${modelLine(finding.model)} (sha256 ${String(finding.model.sha256 || "").slice(0, 12)}…)`;
  $("series-request-id").textContent = answer.request_id || "";
  renderStrip(answer);
  $("series-result").hidden = false;
  // Start where the finding is: its first key slice, else the most probable assessed slice, else the first.
  const assessed = answer.slices.filter((s) => !notAssessed(s.result) && typeof s.result.tumour_probability === "number");
  const start = finding.key_slices.length ? finding.key_slices[0]
    : assessed.length ? assessed.reduce((a, b) => (b.result.tumour_probability > a.result.tumour_probability ? b : a)).index
    : 0;
  selectSlice(start);
  $("status").textContent = `Series result for ${series.name}: ${seriesDecision(finding)}${series.note || ""}`;
  setState("done");
}

function renderStrip(answer) {
  const strip = $("slice-strip");
  strip.style.setProperty("--threshold", `${(100 * answer.finding.threshold).toFixed(2)}%`);
  strip.replaceChildren(...answer.slices.map((slice) => {
    const r = slice.result;
    const cell = document.createElement("div");
    cell.id = `slice-${slice.index}`;
    cell.className = "slice-cell";
    cell.dataset.index = String(slice.index);
    cell.setAttribute("role", "option");
    cell.setAttribute("aria-selected", "false");
    cell.setAttribute("aria-label", sliceWords(slice));
    cell.title = sliceWords(slice);
    const key = answer.finding.key_slices.includes(slice.index);
    const skipped = notAssessed(r);
    cell.dataset.key = String(key);
    cell.dataset.assessed = String(!skipped);
    cell.classList.toggle("not-assessed", skipped);
    const mark = Object.assign(document.createElement("span"), { className: "slice-mark" });
    mark.setAttribute("aria-hidden", "true");
    mark.textContent = skipped ? "\u2715" : key ? "\u2605" : "";
    const box = Object.assign(document.createElement("span"), { className: "slice-box" });
    box.setAttribute("aria-hidden", "true");
    if (!skipped && typeof r.tumour_probability === "number") {
      const bar = Object.assign(document.createElement("span"), { className: "slice-bar" });
      bar.style.height = `${(100 * r.tumour_probability).toFixed(2)}%`;
      cell.classList.toggle("over", r.tumour_probability >= answer.finding.threshold);
      box.append(bar);
    }
    cell.append(mark, box);
    return cell;
  }));
}

function selectSlice(index) {
  if (!shownSeries || !shownSeries.slices.length) return;
  selectedSlice = Math.max(0, Math.min(shownSeries.slices.length - 1, index));
  const strip = $("slice-strip");
  for (const cell of strip.children) {
    const on = Number(cell.dataset.index) === selectedSlice;
    cell.classList.toggle("selected", on);
    cell.setAttribute("aria-selected", String(on));
  }
  strip.setAttribute("aria-activedescendant", `slice-${selectedSlice}`);
  $(`slice-${selectedSlice}`).scrollIntoView({ block: "nearest", inline: "nearest" });
  const slice = shownSeries.slices[selectedSlice];
  $("series-slice-caption").textContent = sliceWords(slice);
  const cam = slice.result.cam;
  const hasImage = Boolean(cam && cam.format === "png");
  $("series-stack").hidden = !hasImage;
  $("series-no-image").hidden = hasImage;
  $("series-no-image").textContent = hasImage ? "" :
    "The service sent no image for this slice (see the series warnings), so only its figures are shown.";
  const showMap = hasImage && !notAssessed(slice.result);
  $("series-viewer").dataset.map = String(showMap);
  if (hasImage) {
    $("series-image").src = `data:image/png;base64,${cam.image_png}`;
    $("series-image").alt = `Slice ${selectedSlice + 1} as the model saw it`;
    if (showMap) $("series-heatmap").src = `data:image/png;base64,${cam.heatmap_png}`;
    else $("series-heatmap").removeAttribute("src");
  }
  applySeriesCam();
}

function applySeriesCam() {
  const visible = $("series-cam-toggle").checked && $("series-viewer").dataset.map === "true";
  $("series-heatmap").hidden = !visible;
}

// Arrow keys, Home / End and Page Up / Down on the strip or the viewer; the mouse wheel over the viewer.
const SLICE_KEYS = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1, PageDown: 10, PageUp: -10 };

function onSliceKey(event) {
  if (!shownSeries) return;
  let target = null;
  if (event.key in SLICE_KEYS) target = selectedSlice + SLICE_KEYS[event.key];
  else if (event.key === "Home") target = 0;
  else if (event.key === "End") target = shownSeries.slices.length - 1;
  if (target === null) return;
  event.preventDefault(); // no page scroll
  selectSlice(target);
}

function setUpSeriesViewer() {
  $("slice-strip").addEventListener("keydown", onSliceKey);
  $("series-viewer").addEventListener("keydown", onSliceKey);
  $("slice-strip").addEventListener("click", (event) => {
    const cell = event.target.closest(".slice-cell");
    if (cell) {
      selectSlice(Number(cell.dataset.index));
      $("slice-strip").focus();
    }
  });
  $("series-viewer").addEventListener("wheel", (event) => {
    if (!shownSeries || event.deltaY === 0) return;
    event.preventDefault(); // the wheel scrolls the slices, not the page, while over the slice
    selectSlice(selectedSlice + Math.sign(event.deltaY));
  }, { passive: false });
  $("series-cam-toggle").addEventListener("change", applySeriesCam);
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
      $("file-input").value = ""; // the pickers no longer name the files being shown
      $("folder-input").value = "";
      chooseFiles([...files], false);
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
  if (pendingAction && $("key-form").hidden) {
    const run = pendingAction;
    pendingAction = null;
    run();
  }
}

function init() {
  $("key-form").addEventListener("submit", useKey);
  $("file-input").addEventListener("change", (event) => {
    const files = [...(event.target.files || [])];
    if (files.length) chooseFiles(files, false);
  });
  $("folder-input").addEventListener("change", (event) => {
    const files = [...(event.target.files || [])];
    if (files.length) chooseFiles(files, true);
  });
  setUpSeriesViewer();
  $("feedback-agree").addEventListener("click", () => shownResult && sendFeedback(shownResult.label, false));
  $("feedback-correct").addEventListener("click", openCorrection);
  $("feedback-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (shownResult && $("feedback-label").value) sendFeedback($("feedback-label").value, true);
  });
  $("cam-toggle").addEventListener("change", applyCamControls);
  $("cam-opacity").addEventListener("input", applyCamControls);
  $("region-toggle").addEventListener("change", applyRegionControl);
  setUpDropZone();
  applyCamControls();
  loadModelInfo();
}

document.addEventListener("DOMContentLoaded", init);
