// Opens btd validate's HTML report in Debian's chromium (playwright-core) and reports what rendered.
// Run by tests/browser/test_validation_report.py, which passes everything through env:
//   REPORT     the HTML file; ARTIFACTS  folder for the screenshot; PROFILE  a fresh user-data-dir
//   CHROMIUM   the browser binary (default /usr/bin/chromium)
// Prints one JSON object; exits non-zero (with the reason on stderr) on any failure.
import { chromium } from "playwright-core";
import path from "node:path";
import { pathToFileURL } from "node:url";

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`environment variable ${name} is required`);
  return value;
};

async function main() {
  const context = await chromium.launchPersistentContext(env("PROFILE"), {
    executablePath: env("CHROMIUM", "/usr/bin/chromium"),
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
    viewport: { width: 1280, height: 900 },
  });
  const report = { offsite: [], consoleErrors: [] };
  try {
    // The report is one file: anything fetched from the network is refused and recorded.
    await context.route(/^(https?|wss?):/, (route) => {
      report.offsite.push(route.request().url());
      return route.abort();
    });
    const page = context.pages()[0] || (await context.newPage());
    page.on("console", (msg) => msg.type() === "error" && report.consoleErrors.push(msg.text()));
    page.on("pageerror", (err) => report.consoleErrors.push(String(err)));
    await page.goto(pathToFileURL(env("REPORT")).href, { waitUntil: "load" });
    Object.assign(report, await page.evaluate(() => {
      const cells = (row) => [...row.querySelectorAll("td")].map((td) => td.textContent.trim());
      const numbers = (row) => cells(row).map(Number);
      const figures = [...document.querySelectorAll("figure")].map((figure) => {
        const svg = figure.querySelector("svg");
        const box = svg ? svg.getBoundingClientRect() : { width: 0, height: 0 };
        return { id: figure.id, width: box.width, height: box.height, paths: svg ? svg.querySelectorAll("path").length : 0,
          caption: figure.querySelector("figcaption")?.textContent.trim() ?? "" };
      });
      const cm = document.getElementById("confusion-matrix");
      const rows = cm ? [...cm.tBodies[0].rows] : [];
      const confusion = cm && {
        labels: [...cm.tHead.rows[0].cells].slice(1, -1).map((c) => c.textContent.trim()),
        rows: rows.slice(0, -1).map((r) => ({ label: r.cells[0].textContent.trim(), values: numbers(r).slice(0, -1),
          total: numbers(r).at(-1) })),
        columnTotals: numbers(rows.at(-1)).slice(0, -1),
        total: numbers(rows.at(-1)).at(-1),
        visible: cm.getBoundingClientRect().height > 0,
      };
      const comparison = Object.fromEntries([...document.querySelectorAll("#comparison tr[data-metric]")].map((r) =>
        [r.dataset.metric, { site: r.querySelector(".site").textContent.trim(), card: r.querySelector(".card").textContent.trim() }]));
      const subgroups = Object.fromEntries([...document.querySelectorAll("table.subgroup")].map((t) =>
        [t.id, [...t.tBodies[0].rows].map((r) => cells(r)[0])]));
      const counts = Object.fromEntries([...document.querySelectorAll("#counts [data-count]")].map((td) =>
        [td.dataset.count, td.textContent.trim()]));
      const resources = performance.getEntriesByType("resource").map((e) => e.name);
      return { title: document.title, figures, confusion, comparison, subgroups, counts, resources };
    }));
    await page.screenshot({ path: path.join(env("ARTIFACTS"), "validation-report.png"), fullPage: true });
  } finally {
    await context.close();
  }
  process.stdout.write(JSON.stringify(report));
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});
