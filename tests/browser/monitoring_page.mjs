// Drives Debian's chromium (playwright-core) through the monitoring page (/monitoring).
// Run by tests/browser/test_monitoring_page.py, which starts the service and passes through env:
//   BASE_URL   the running service; ARTIFACTS  folder for screenshots; PROFILE  a fresh user-data-dir
//   CHROMIUM   the browser binary (default /usr/bin/chromium); SHOT  the screenshot's file name
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
    // Rendered: the drift status no longer says "Loading…" (a model without a baseline has no charts).
    await page.waitForFunction(() => !document.getElementById("drift-status").textContent.startsWith("Loading"));
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
      models: [...document.querySelectorAll("#performance-models .model-performance")].map((section) => {
        const texts = (cells) => [...cells].map((cell) => cell.textContent);
        const confusion = section.querySelector("table.confusion");
        const reliability = section.querySelector("figure.reliability");
        return {
          version: section.dataset.version,
          heading: section.querySelector("h3").textContent,
          labelledBy: document.getElementById(section.getAttribute("aria-labelledby"))?.textContent,
          confirmed: section.querySelector(".confirmed").textContent,
          figures: Object.fromEntries([...section.querySelectorAll("table.figures tbody tr")].map((row) =>
            [row.dataset.figure, row.cells[1].textContent])),
          intervalBars: section.querySelectorAll("svg.interval-bar rect.interval").length,
          confusion: confusion && {
            columns: texts(confusion.querySelectorAll("thead th")).slice(1),
            rows: texts(confusion.querySelectorAll("tbody th")),
            counts: [...confusion.querySelectorAll("tbody tr")].map((row) => texts(row.querySelectorAll("td")).map(Number)),
            totals: texts(confusion.querySelectorAll("tfoot td")).map(Number),
            agree: [...confusion.querySelectorAll("td.agree")].reduce((sum, cell) => sum + Number(cell.textContent), 0),
          },
          reliability: {
            caption: reliability.querySelector("figcaption").textContent,
            dots: reliability.querySelectorAll("svg circle.bin").length,
            diagonal: reliability.querySelectorAll("svg line.diagonal").length,
            width: reliability.querySelector("svg").getBoundingClientRect().width,
            binRows: reliability.querySelectorAll("table tbody tr").length,
            bins: [...reliability.querySelectorAll("table tbody tr")].map((row) => texts(row.cells)),
            binCases: [...reliability.querySelectorAll("table tbody tr")]
              .reduce((sum, row) => sum + Number(row.cells[1].textContent), 0),
          },
        };
      }),
    })));
    await page.screenshot({ path: path.join(env("ARTIFACTS"), env("SHOT", "monitoring-page.png")), fullPage: true });
  } finally {
    await context.close();
  }
  process.stdout.write(JSON.stringify(report));
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(1);
});
