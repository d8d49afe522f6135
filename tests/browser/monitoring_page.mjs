// Drives Debian's chromium (playwright-core) through the monitoring page (/monitoring).
// Run by tests/browser/test_monitoring_page.py, which starts the service and passes through env:
//   BASE_URL   the running service; ARTIFACTS  folder for screenshots; PROFILE  a fresh user-data-dir
//   CHROMIUM   the browser binary (default /usr/bin/chromium)
// Prints one JSON object with what it saw; exits non-zero (with the reason on stderr) on any failure.
import { chromium } from "playwright-core";
import path from "node:path";

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`environment variable ${name} is required`);
  return value;
};
const BASE_URL = env("BASE_URL");

async function main() {
  const context = await chromium.launchPersistentContext(env("PROFILE"), {
    executablePath: env("CHROMIUM", "/usr/bin/chromium"),
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    viewport: { width: 1280, height: 900 },
  });
  const report = { offsite: [], consoleErrors: [] };
  try {
    const origin = new URL(BASE_URL).origin;
    await context.route("**/*", (route) => {
      const url = route.request().url();
      if (url.startsWith(origin) || url.startsWith("data:")) return route.continue();
      report.offsite.push(url);
      return route.abort();
    });
    const page = context.pages()[0] || (await context.newPage());
    page.setDefaultTimeout(30_000);
    page.on("console", (msg) => msg.type() === "error" && report.consoleErrors.push(msg.text()));
    page.on("pageerror", (err) => report.consoleErrors.push(String(err)));
    await page.goto(`${BASE_URL}/monitoring`);
    await page.waitForFunction(() => document.querySelectorAll("#drift-charts figure").length > 0);
    Object.assign(report, await page.evaluate(() => ({
      model: document.getElementById("model-info").textContent,
      status: document.getElementById("drift-status").textContent,
      statusClass: document.getElementById("drift-status").className,
      threshold: document.getElementById("drift-threshold").textContent,
      performance: document.getElementById("performance-status").textContent,
      charts: [...document.querySelectorAll("#drift-charts figure")].map((figure) => ({
        caption: figure.querySelector("figcaption").textContent,
        points: figure.querySelectorAll("svg circle").length,
        over: figure.querySelectorAll("svg circle.over").length,
        thresholdLine: figure.querySelectorAll("svg line.threshold").length,
        width: figure.querySelector("svg").getBoundingClientRect().width,
        tableRows: figure.querySelectorAll("table tbody tr").length,
      })),
    })));
    await page.screenshot({ path: path.join(env("ARTIFACTS"), "monitoring-page.png"), fullPage: true });
  } finally {
    await context.close();
  }
  process.stdout.write(JSON.stringify(report));
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(1);
});
