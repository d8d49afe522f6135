// Drives Debian's chromium (playwright-core, no browser download) through the clinician page.
// Run by tests/browser/test_web_page.py, which starts the service and passes everything through env:
//   BASE_URL      the running service, e.g. http://127.0.0.1:8123
//   IMAGE         an MRI slice to upload (PNG/JPEG); DICOM  a DICOM slice; BROKEN  a corrupt file
//   ARTIFACTS     folder for screenshots; PROFILE  a fresh, empty user-data-dir
//   CHROMIUM      the browser binary (default /usr/bin/chromium)
//   SERIES_DIR    optional: a folder of one DICOM series (and a file that is not DICOM, to be left out)
//   NIFTI         optional: a small .nii.gz volume
//   KEYED_URL     optional: the same service with API keys; API_KEY  a valid key for it;
//                 PREDICT_ONLY_KEY  a key for it without the feedback scope
//   REGION_URL    optional: a service whose model has a tumour map; REGION_IMAGE  a slice it finds a region in
// Prints one JSON object with what it saw; exits non-zero (with the reason on stderr) on any failure.
import { chromium } from "playwright-core";
import { readFile } from "node:fs/promises";
import path from "node:path";

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`environment variable ${name} is required`);
  return value;
};
const BASE_URL = env("BASE_URL");
const ARTIFACTS = env("ARTIFACTS");
const STEP_TIMEOUT_MS = 30_000;

function check(condition, message) {
  if (!condition) throw new Error(message);
}

async function screenshot(page, name) {
  await page.evaluate(() => document.activeElement && document.activeElement.blur());
  await page.screenshot({ path: path.join(ARTIFACTS, `${name}.png`), fullPage: true });
}

// Upload one file and wait until the page says it is done (result or error).
async function upload(page, file) {
  await page.setInputFiles("#file-input", file);
  await page.waitForFunction(
    () => ["done", "error"].includes(document.body.dataset.state),
    null,
    { timeout: STEP_TIMEOUT_MS },
  );
  return page.evaluate(() => document.body.dataset.state);
}

// Drop a file (or several) on the drop zone, as dragging from the desktop does; no name suffix, no type:
// the page must recognise it by its bytes.
async function drop(page, file) {
  const files = Array.isArray(file) ? file : [file];
  const contents = await Promise.all(files.map(async (f) => (await readFile(f)).toString("base64")));
  const dataTransfer = await page.evaluateHandle((contents) => {
    const transfer = new DataTransfer();
    contents.forEach((bytes, i) => transfer.items.add(
      new File([Uint8Array.from(atob(bytes), (c) => c.charCodeAt(0))], contents.length > 1 ? `dropped-${i}` : "dropped-slice")));
    return transfer;
  }, contents);
  await page.dispatchEvent("#drop-zone", "drop", { dataTransfer });
  await page.waitForFunction(() => ["done", "error"].includes(document.body.dataset.state), null,
    { timeout: STEP_TIMEOUT_MS });
  return page.evaluate(() => document.body.dataset.state);
}

async function readResult(page) {
  return page.evaluate(() => {
    const $ = (id) => document.getElementById(id);
    const heatmap = $("cam-heatmap");
    const image = $("cam-image");
    return {
      label: $("result-label").textContent,
      decision: $("result-decision").textContent,
      bars: [...document.querySelectorAll("#probabilities li")].map((li) => ({
        label: li.dataset.label,
        value: li.querySelector(".bar-value").textContent,
        width: li.querySelector(".bar-fill").getBoundingClientRect().width,
        track: li.querySelector(".bar-track").getBoundingClientRect().width,
      })),
      status: $("status").textContent,
      timing: $("timing-server").textContent,
      model: $("result-model").textContent,
      modelHeader: $("model-info").textContent,
      camVisible: !$("cam-figure").hidden,
      camCaption: $("cam-caption").innerText,
      page: document.querySelector("#result").innerText,
      barsVisible: !$("class-scores").hidden && $("probabilities").children.length > 0,
      details: { visible: !$("ood-details").hidden, open: $("ood-details").open, text: $("ood-technical").textContent },
      image: { loaded: image.complete && image.naturalWidth > 0, width: image.naturalWidth, height: image.naturalHeight },
      heatmap: {
        loaded: heatmap.complete && heatmap.naturalWidth > 0,
        width: heatmap.naturalWidth,
        height: heatmap.naturalHeight,
        opacity: getComputedStyle(heatmap).opacity,
        shown: heatmap.getBoundingClientRect().width > 0,
      },
    };
  });
}

// Choose files (or, with the folder picker, a folder) and wait until the page is done.
async function uploadTo(page, selector, files) {
  await page.setInputFiles(selector, files);
  await page.waitForFunction(() => ["done", "error"].includes(document.body.dataset.state), null,
    { timeout: STEP_TIMEOUT_MS });
  return page.evaluate(() => document.body.dataset.state);
}

async function readSeries(page) {
  return page.evaluate(() => {
    const $ = (id) => document.getElementById(id);
    const image = $("series-image");
    const heatmap = $("series-heatmap");
    return {
      visible: !$("series-result").hidden,
      singleHidden: $("result").hidden,
      finding: $("series-finding").textContent,
      decision: $("series-decision").textContent,
      label: $("series-label").textContent,
      probability: $("series-probability").textContent,
      assessed: $("series-assessed").textContent,
      notAssessed: $("series-not-assessed").textContent,
      reasons: [...$("series-reasons").children].map((li) => li.textContent),
      rule: $("series-rule").textContent,
      warnings: [...$("series-warnings").children].map((li) => li.textContent),
      status: $("status").textContent,
      cells: [...document.querySelectorAll("#slice-strip [role=option]")].map((c) => ({
        index: Number(c.dataset.index),
        key: c.dataset.key === "true",
        assessed: c.dataset.assessed === "true",
        mark: c.querySelector(".slice-mark").textContent,
        label: c.getAttribute("aria-label"),
        barHeight: c.querySelector(".slice-bar") ? c.querySelector(".slice-bar").getBoundingClientRect().height : null,
        boxHeight: c.querySelector(".slice-box").getBoundingClientRect().height,
        over: c.classList.contains("over"),
      })),
      selected: [...document.querySelectorAll("#slice-strip [aria-selected=true]")].map((c) => Number(c.dataset.index)),
      activedescendant: $("slice-strip").getAttribute("aria-activedescendant"),
      caption: $("series-slice-caption").textContent,
      image: { loaded: image.complete && image.naturalWidth > 0, width: image.naturalWidth, src: image.src.slice(0, 64) },
      heatmapShown: !heatmap.hidden && heatmap.complete && heatmap.naturalWidth > 0,
    };
  });
}

async function selection(page) {
  return page.evaluate(() => [...document.querySelectorAll("#slice-strip [aria-selected=true]")].map((c) => Number(c.dataset.index)));
}

// Every form control has a name a screen reader can announce (a button's own text names it).
async function unlabelledControls(page) {
  return page.evaluate(() =>
    [...document.querySelectorAll("input, button, select, textarea")]
      .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute("aria-label") && !el.getAttribute("aria-labelledby"))
      .filter((el) => !(el.tagName === "BUTTON" && el.textContent.trim()))
      .map((el) => el.id || el.outerHTML.slice(0, 60)),
  );
}

// WCAG contrast ratio of each visible text element against the background it is drawn on.
async function lowContrastTexts(page, minimum = 4.5) {
  return page.evaluate((minimum) => {
    const rgba = (text) => (text.match(/[\d.]+/g) || []).map(Number);
    const luminance = ([r, g, b]) => {
      const lin = (c) => ((c /= 255) <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4);
      return 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b);
    };
    const background = (el) => {
      for (let node = el; node; node = node.parentElement) {
        const c = rgba(getComputedStyle(node).backgroundColor);
        if (c.length === 3 || (c.length === 4 && c[3] > 0.9)) return c.slice(0, 3);
      }
      return [255, 255, 255];
    };
    const failures = [];
    for (const el of document.querySelectorAll("body *")) {
      const ownText = [...el.childNodes].some((n) => n.nodeType === Node.TEXT_NODE && n.textContent.trim());
      if (!ownText || !el.getClientRects().length || el.closest("[hidden]")) continue;
      const fg = luminance(rgba(getComputedStyle(el).color));
      const bg = luminance(background(el));
      const ratio = (Math.max(fg, bg) + 0.05) / (Math.min(fg, bg) + 0.05);
      if (ratio < minimum) failures.push({ text: el.textContent.trim().slice(0, 40), ratio: ratio.toFixed(2) });
    }
    return failures;
  }, minimum);
}

async function tabOrder(page, stops) {
  await page.evaluate(() => document.activeElement && document.activeElement.blur());
  const seen = [];
  for (let i = 0; i < stops; i++) {
    await page.keyboard.press("Tab");
    seen.push(await page.evaluate(() => document.activeElement && (document.activeElement.id || document.activeElement.tagName)));
  }
  return seen;
}

async function main() {
  const context = await chromium.launchPersistentContext(env("PROFILE"), {
    executablePath: env("CHROMIUM", "/usr/bin/chromium"),
    headless: true,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
    viewport: { width: 1280, height: 900 },
  });
  const report = { offsite: [], consoleErrors: [] };
  try {
    // The page and /docs must work offline: anything not from the service itself is refused and recorded.
    const origins = [BASE_URL, process.env.KEYED_URL, process.env.REGION_URL].filter(Boolean).map((u) => new URL(u).origin);
    await context.route("**/*", (route) => {
      const url = route.request().url();
      if (origins.some((o) => url.startsWith(o)) || url.startsWith("data:")) return route.continue();
      report.offsite.push(url);
      return route.abort();
    });
    const page = context.pages()[0] || (await context.newPage());
    page.setDefaultTimeout(STEP_TIMEOUT_MS);
    page.on("console", (msg) => msg.type() === "error" && report.consoleErrors.push(msg.text()));
    page.on("pageerror", (err) => report.consoleErrors.push(String(err)));

    await page.goto(`${BASE_URL}/`);
    await page.waitForFunction(() => !document.getElementById("model-info").textContent.includes("loading"));
    report.modelHeader = await page.textContent("#model-info");
    report.notice = await page.textContent(".notice");
    report.unlabelled = await unlabelledControls(page);
    report.tabOrderBefore = await tabOrder(page, 3);
    report.accept = await page.getAttribute("#file-input", "accept");

    // 1. A real slice: result, bars and the heatmap over the image.
    report.imageState = await upload(page, env("IMAGE"));
    check(report.imageState === "done", `upload of the image ended in state ${report.imageState}: ${await page.textContent("#error")}`);
    await page.waitForFunction(() => {
      const img = document.getElementById("cam-heatmap");
      return img.complete && img.naturalWidth > 0;
    });
    report.result = await readResult(page);
    report.regionControlWithoutMap = await page.isVisible("#region-control"); // the model has no tumour map
    report.unlabelledAfter = await unlabelledControls(page);
    report.lowContrast = await lowContrastTexts(page);
    await screenshot(page, "web-page-result");

    // Keyboard: the opacity slider and the on/off toggle work without a mouse.
    await page.focus("#cam-opacity");
    for (let i = 0; i < 4; i++) await page.keyboard.press("ArrowLeft");
    report.opacityAfterKeys = {
      slider: await page.inputValue("#cam-opacity"),
      output: await page.textContent("#cam-opacity-value"),
      heatmap: await page.evaluate(() => getComputedStyle(document.getElementById("cam-heatmap")).opacity),
    };
    await page.focus("#cam-toggle");
    await page.keyboard.press("Space");
    report.toggledOff = {
      checked: await page.isChecked("#cam-toggle"),
      heatmapVisible: await page.isVisible("#cam-heatmap"),
      sliderDisabled: await page.isDisabled("#cam-opacity"),
    };
    await page.keyboard.press("Space");
    report.toggledOn = { checked: await page.isChecked("#cam-toggle"), heatmapVisible: await page.isVisible("#cam-heatmap") };

    // Readers' feedback on that answer: "Agree", then "Correct it" with another class.
    report.feedback = {
      visible: await page.isVisible("#feedback"),
      requestId: (await page.textContent("#result-request-id")).trim(),
    };
    await page.fill("#feedback-reader", "reader-17");
    await page.click("#feedback-agree");
    await page.waitForFunction(() => /^(Recorded|Your reading was not)/.test(document.getElementById("feedback-status").textContent));
    report.feedback.agreed = await page.textContent("#feedback-status");
    await page.click("#feedback-correct");
    report.feedback.formOpen = await page.isVisible("#feedback-form");
    report.feedback.unlabelled = await unlabelledControls(page);
    report.feedback.options = await page.$$eval("#feedback-label option", (els) => els.map((e) => e.value));
    report.feedback.corrected = await page.inputValue("#feedback-label");
    await page.click("#feedback-send");
    await page.waitForFunction(() => /^(Correction recorded|Your reading was not)/.test(document.getElementById("feedback-status").textContent));
    report.feedback.correctedStatus = await page.textContent("#feedback-status");
    report.feedback.formHiddenAfter = await page.isHidden("#feedback-form");
    report.lowContrastFeedback = await lowContrastTexts(page);

    // 2. A DICOM slice, dropped: the browser cannot draw DICOM, so the page shows the server's rendering.
    if (process.env.DICOM) {
      report.dicomState = await drop(page, process.env.DICOM);
      check(report.dicomState === "done", `upload of the DICOM ended in state ${report.dicomState}: ${await page.textContent("#error")}`);
      report.dicom = await readResult(page);
      report.dicom.feedbackVisible = await page.isVisible("#feedback");
      await screenshot(page, "web-page-dicom");
    }

    // 3. A broken file: the problem+json detail, in words, in an alert.
    report.brokenState = await upload(page, env("BROKEN"));
    report.error = {
      text: await page.textContent("#error"),
      role: await page.getAttribute("#error", "role"),
      visible: await page.isVisible("#error"),
      resultHidden: !(await page.isVisible("#result")),
    };
    await screenshot(page, "web-page-error");
    report.lowContrastError = await lowContrastTexts(page);

    // 4. A series: several DICOM files at once, then the same as a folder, then a NIfTI volume.
    if (process.env.SERIES_DIR) {
      const dir = process.env.SERIES_DIR;
      const { readdir } = await import("node:fs/promises");
      const files = (await readdir(dir)).sort().map((name) => path.join(dir, name));
      const state = await uploadTo(page, "#file-input", files);
      check(state === "done", `the series ended in state ${state}: ${await page.textContent("#error")}`);
      await page.waitForFunction(() => document.getElementById("series-image").complete);
      const series = { files: files.map((f) => path.basename(f)), shown: await readSeries(page) };
      series.unlabelled = await unlabelledControls(page);
      series.lowContrast = await lowContrastTexts(page);
      await screenshot(page, "web-page-series");
      // The keyboard: the strip is one tab stop; arrows, Home and End move the selection.
      await page.focus("#slice-strip");
      const keys = [];
      for (const key of ["Home", "ArrowRight", "ArrowRight", "ArrowLeft", "End", "ArrowRight", "ArrowDown", "ArrowUp"]) {
        await page.keyboard.press(key);
        keys.push({ key, selected: await selection(page), caption: await page.textContent("#series-slice-caption") });
      }
      series.keys = keys;
      series.afterKeys = await readSeries(page);
      // A click on a cell, then the mouse wheel over the viewer.
      await page.click("#slice-1");
      series.clicked = await selection(page);
      await page.hover("#series-viewer");
      await page.mouse.wheel(0, 120);
      series.wheeled = await selection(page);
      series.wheelCaption = await page.textContent("#series-slice-caption");
      // The same files dropped together on the drop zone.
      series.droppedState = await drop(page, files);
      series.dropped = await readSeries(page);
      // The same series as a folder (webkitdirectory): the file that is not DICOM is left out.
      series.folderState = await uploadTo(page, "#folder-input", dir);
      series.folder = await readSeries(page);
      // Instances of two series: the service's problem+json detail, in an alert.
      series.mixedState = await uploadTo(page, "#file-input", [env("DICOM"), files[0]]);
      series.mixedError = {
        text: await page.textContent("#error"),
        role: await page.getAttribute("#error", "role"),
        seriesHidden: !(await page.isVisible("#series-result")),
      };
      report.series = series;
    }
    if (process.env.NIFTI) {
      const state = await uploadTo(page, "#file-input", env("NIFTI"));
      check(state === "done", `the NIfTI ended in state ${state}: ${await page.textContent("#error")}`);
      report.nifti = await readSeries(page);
    }

    // 5. /docs: Swagger UI from local files, listing the predict operation.
    await page.goto(`${BASE_URL}/docs`);
    await page.waitForSelector(".swagger-ui .opblock", { timeout: STEP_TIMEOUT_MS });
    report.docs = {
      title: await page.textContent(".swagger-ui .info .title"),
      operations: await page.$$eval(".opblock-summary-path", (els) => els.map((e) => e.textContent.trim())),
    };
    await screenshot(page, "docs");

    // 6. A service with API keys: the page asks for one, a wrong one is refused, the right one works.
    if (process.env.KEYED_URL) {
      await page.goto(`${process.env.KEYED_URL}/`);
      await page.waitForSelector("#key-form:not([hidden])");
      report.keyed = { askedFirst: await page.textContent("#key-help"), header: await page.textContent("#model-info") };
      await page.fill("#api-key", "btd_not-a-key");
      await page.click("#key-submit");
      await page.waitForFunction(() => document.getElementById("key-help").textContent.includes("not accepted"));
      report.keyed.wrongKey = await page.textContent("#key-help");
      await page.fill("#api-key", env("API_KEY"));
      await page.click("#key-submit");
      await page.waitForFunction(() => !document.getElementById("model-info").textContent.includes("API key"));
      report.keyed.formHiddenAfter = await page.isHidden("#key-form");
      report.keyed.modelHeader = await page.textContent("#model-info");
      report.keyed.state = await upload(page, env("IMAGE"));
      report.keyed.label = await page.textContent("#result-label");
      report.keyed.unlabelled = await unlabelledControls(page);
      report.keyed.keyInStorage = await page.evaluate(() => sessionStorage.getItem("btd-api-key") !== null);
      report.keyed.keyInLocalStorage = await page.evaluate(() => JSON.stringify(localStorage).includes("btd_"));
      // A key without the feedback scope: the page says what the key lacks.
      await page.evaluate((key) => sessionStorage.setItem("btd-api-key", key), env("PREDICT_ONLY_KEY"));
      await page.click("#feedback-agree");
      await page.waitForFunction(() => document.getElementById("feedback-status").textContent.startsWith("Your reading was not"));
      report.keyed.feedbackRefused = await page.textContent("#feedback-status");
    }

    // 6. A model with a tumour map: the region's outline and box over the image, with its own toggle.
    if (process.env.REGION_URL) {
      await page.goto(`${process.env.REGION_URL}/`);
      await page.waitForFunction(() => !document.getElementById("model-info").textContent.includes("loading"));
      report.region = { state: await upload(page, env("REGION_IMAGE")) };
      check(report.region.state === "done", `upload of the region image ended in state ${report.region.state}`);
      await page.waitForFunction(() => document.getElementById("cam-image").complete);
      Object.assign(report.region, await page.evaluate(() => {
        const $ = (id) => document.getElementById(id);
        const rect = (el) => {
          const r = el.getBoundingClientRect();
          return { x: r.x, y: r.y, width: r.width, height: r.height };
        };
        return {
          viewBox: $("region-overlay").getAttribute("viewBox"),
          polygons: [...$("region-contours").children].map((p) => p.getAttribute("points")),
          box: Object.fromEntries(["x", "y", "width", "height"].map((k) => [k, Number($("region-box").getAttribute(k))])),
          imageRect: rect($("cam-image")),
          overlayRect: rect($("region-overlay")),
          contoursRect: rect($("region-contours")),
          caption: $("region-caption").hidden ? "" : $("region-caption").textContent.replace(/\s+/g, " ").trim(),
        };
      }));
      report.region.visible = await page.isVisible("#region-overlay");
      report.region.heatmapVisible = await page.isVisible("#cam-heatmap");
      await screenshot(page, "web-page-region");
      await page.focus("#region-toggle");
      await page.keyboard.press("Space");
      report.region.toggledOff = { checked: await page.isChecked("#region-toggle"), visible: await page.isVisible("#region-overlay"),
                                   heatmapVisible: await page.isVisible("#cam-heatmap") };
      await page.keyboard.press("Space");
      report.region.toggledOn = { checked: await page.isChecked("#region-toggle"), visible: await page.isVisible("#region-overlay") };
      report.region.unlabelled = await unlabelledControls(page);
      report.region.lowContrast = await lowContrastTexts(page);
    }
  } catch (err) {
    const page = context.pages()[0];
    if (page) await screenshot(page, "failure").catch(() => {});
    throw err;
  } finally {
    await context.close();
  }
  process.stdout.write(JSON.stringify(report));
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});
