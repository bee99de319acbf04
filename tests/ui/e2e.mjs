// End-to-end test of Tally's web UI in headless Chromium (Debian's chromium, driven by
// playwright-core from npm). Run by tests/integration/ui.rs against a real Tally it started and
// filled with events; it prints each step and exits non-zero on the first failure.
//
// Environment: TALLY_URL, TALLY_PROJECT, TALLY_MASTER_KEY, TALLY_WRITE_KEY, TALLY_PLAYWRIGHT
// (the playwright-core package directory), TALLY_CHROMIUM (the browser), and optionally
// TALLY_SCREENSHOT (where to write a screenshot of the Explorer) and TALLY_FAILURE_DIR.

import assert from "node:assert/strict";
import path from "node:path";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const base = env("TALLY_URL");
const project = env("TALLY_PROJECT");
const masterKey = env("TALLY_MASTER_KEY");
const writeKey = env("TALLY_WRITE_KEY");
const { chromium } = await import(path.join(env("TALLY_PLAYWRIGHT"), "index.mjs"));

const browser = await chromium.launch({
  executablePath: env("TALLY_CHROMIUM"),
  headless: true,
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
const page = await context.newPage();
const consoleErrors = [];
// Refused requests are logged by the browser itself; the test provokes some on purpose.
page.on("console", (m) => m.type() === "error" && !m.text().startsWith("Failed to load resource") && consoleErrors.push(m.text()));
page.on("pageerror", (e) => consoleErrors.push(String(e)));
page.setDefaultTimeout(20_000);

let current = "start";
const step = (name) => {
  current = name;
  console.log(`- ${name}`);
};

async function sendEvent(collection, event) {
  const url = `${base}/3.0/projects/${project}/events/${encodeURIComponent(collection)}`;
  const response = await fetch(url, {
    method: "POST",
    headers: { Authorization: writeKey, "Content-Type": "application/json" },
    body: JSON.stringify(event),
  });
  assert.equal(response.status, 201, `sending an event: ${await response.text()}`);
}

async function bars(scope) {
  return scope.locator("rect.bar").evaluateAll((rects) =>
    rects.map((r) => [r.getAttribute("data-label"), Number(r.getAttribute("data-value"))]).sort(),
  );
}

/** No script from event data ran: every injected payload sets window.__xss. */
async function assertNoInjection(p) {
  assert.equal(await p.evaluate(() => window.__xss), undefined, "a script from event data ran");
}

try {
  step("the UI is served with a strict Content-Security-Policy");
  const index = await page.goto(base + "/");
  assert.equal(index.status(), 200);
  assert.match(index.headers()["content-security-policy"], /script-src 'self'/);

  step("a wrong key is refused in words, with the error code");
  await page.fill("#project", project);
  await page.fill("#key", "not-a-key");
  await page.click("button[type=submit]");
  await page.locator(".error").waitFor();
  assert.match(await page.locator(".error").innerText(), /InvalidApiKeyError/);

  step("sign in with the master key");
  await page.fill("#key", masterKey);
  await page.click("button[type=submit]");
  await page.locator("[data-nav=explorer].active").waitFor();
  assert.equal(await page.evaluate(() => localStorage.length), 0, "nothing is kept beyond the session");

  step("a collection named with markup is listed as text");
  const options = await page.locator("#collection option").allTextContents();
  assert.ok(options.includes("<b>bold</b><img src=x onerror=window.__xss=3>"), options.join(", "));
  await assertNoInjection(page);

  step("build and run a sum grouped by customer: bars drawn");
  await page.selectOption("#collection", "purchases");
  await page.selectOption("#analysis", "sum");
  await page.selectOption("#target", "amount");
  await page.selectOption("#timeframe", "this_7_days");
  await page.selectOption("#group-by", "customer.id");
  await page.click("#run");
  await page.locator("svg.bar-chart rect.bar").first().waitFor();
  assert.deepEqual(await bars(page.locator("#chart")), [
    ["acme", 60],
    ["globex", 300],
  ]);
  const curl = await page.locator("#curl").textContent();
  assert.match(curl, /queries\/sum/);
  assert.ok(!curl.includes(masterKey), "the key is not written into the page");
  await page.click("text=JSON");
  assert.match(await page.locator("#json").innerText(), /"customer.id": "globex"/);
  await page.click("button.tab:text('Chart')");
  if (process.env.TALLY_SCREENSHOT) {
    await page.screenshot({ path: process.env.TALLY_SCREENSHOT, fullPage: true });
  }

  step("with a daily interval the answer is a line per customer");
  await page.selectOption("#interval", "daily");
  await page.click("#run");
  await page.locator("svg.line-chart").waitFor();
  assert.equal(await page.locator("svg.line-chart polyline.series").count(), 2);

  step("a count without groups is one big number");
  await page.selectOption("#interval", "");
  await page.selectOption("#analysis", "count");
  await page.selectOption("#group-by", "");
  await page.click("#run");
  assert.equal((await page.locator(".big-number").innerText()).trim(), "5");

  step("a broken query shows the API's error, and the page stays usable");
  await page.selectOption("#analysis", "percentile");
  await page.selectOption("#target", "amount");
  await page.fill("#percentile", "150");
  await page.click("#run");
  await page.locator("#result .error").waitFor();
  assert.match(await page.locator("#result .error").innerText(), /Error: .*percentile/i);
  assert.ok(await page.locator("#run").isVisible());

  step("save the grouped sum as a saved query");
  await page.selectOption("#analysis", "sum");
  await page.selectOption("#target", "amount");
  await page.selectOption("#group-by", "customer.id");
  await page.fill("#save-name", "revenue_by_customer");
  await page.click("#save");
  await page.locator(".save .ok").waitFor();

  step("create a dashboard and add the saved query's chart");
  await page.click("[data-nav=dashboards]");
  await page.fill("#new-dashboard", "overview");
  await page.fill("#new-dashboard-title", "Revenue overview");
  await page.click("#create-dashboard");
  await page.waitForURL(/#\/dashboards\/overview$/);
  await page.selectOption("#add-tile-query", "revenue_by_customer");
  await page.click("#add-tile");
  const tile = page.locator("section.tile[data-query=revenue_by_customer]");
  await tile.locator("rect.bar").first().waitFor();
  await tile.locator("button[title=wider]").click();
  await page.click("#save-dashboard");
  await page.locator("text=Dashboard saved.").waitFor();

  step("the dashboard is stored: it is there after a reload");
  await page.reload();
  await page.locator("section.tile[data-query=revenue_by_customer] rect.bar").first().waitFor();
  assert.deepEqual(await bars(page.locator("#grid")), [
    ["acme", 60],
    ["globex", 300],
  ]);

  step("an embed link with a key scoped to one customer shows only that customer");
  await page.click("summary:text('Embed link')");
  await page.fill("#embed-property", "customer.id");
  await page.fill("#embed-value", "acme");
  await page.click("#create-embed");
  const link = await page.locator("#embed-link").inputValue();
  assert.ok(!link.includes(masterKey), "the embed link must not carry the master key");
  const visitor = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const embedded = await visitor.newPage();
  await embedded.goto(link);
  await embedded.locator("section.tile rect.bar").first().waitFor();
  assert.deepEqual(await bars(embedded.locator("#grid")), [["acme", 60]]);
  assert.ok(!(await embedded.locator("body").innerText()).includes("globex"));
  assert.equal(await embedded.locator("[data-nav]").count(), 0, "an embed shows no navigation");

  step("the embed on a phone: the chart takes the screen's width");
  await embedded.setViewportSize({ width: 390, height: 844 });
  const box = await embedded.locator("section.tile").boundingBox();
  assert.ok(box.width > 300, `tile width ${box.width}`);
  await visitor.close();

  step("watch a live event arrive; a <script> in a value is shown as text");
  await page.click("[data-nav=live]");
  await page.fill("#live-collection", "purchases");
  await page.click("#live-watch");
  await page.locator("#live-connected").waitFor();
  const payload = '<script>window.__xss = 1</script><img src=x onerror="window.__xss=2">';
  await sendEvent("purchases", { customer: { id: "initech" }, amount: 7, note: payload });
  const arrived = page.locator(".live-event", { hasText: "initech" });
  await arrived.waitFor();
  assert.ok((await arrived.locator("pre").textContent()).includes(payload.replace(/"/g, '\\"')));
  assert.equal(await page.locator(".live-events img, .live-events script").count(), 0);
  await assertNoInjection(page);

  step("pause holds new events back; resume shows them");
  await page.click("#live-pause");
  await sendEvent("purchases", { customer: { id: "umbrella" }, amount: 1 });
  await page.locator("#live-pause", { hasText: "Resume (1 new)" }).waitFor();
  assert.equal(await page.locator(".live-event", { hasText: "umbrella" }).count(), 0);
  await page.click("#live-pause");
  await page.locator(".live-event", { hasText: "umbrella" }).waitFor();

  step("the filter box narrows the list");
  await page.fill("#live-filter", "umbrella");
  assert.equal(await page.locator(".live-event").count(), 1);

  step("schema and health: collections with counts, ingest figures");
  await page.click("[data-nav=schema]");
  const purchases = page.locator("details[data-collection=purchases]");
  await purchases.waitFor();
  assert.match(await purchases.locator("summary").innerText(), /\d+ events, \d+ properties/);
  await page.locator("#accepted").waitFor();
  assert.ok(Number((await page.locator("#accepted").innerText()).replace(/[^0-9]/g, "")) >= 8);
  await page.locator("#lag").waitFor();
  await assertNoInjection(page);

  assert.deepEqual(consoleErrors, [], "the browser console shows errors");
  console.log("ok");
} catch (e) {
  console.error(`FAILED at step "${current}": ${e.stack || e}`);
  if (process.env.TALLY_FAILURE_DIR) {
    await page.screenshot({ path: path.join(process.env.TALLY_FAILURE_DIR, "ui-failure.png"), fullPage: true }).catch(() => {});
  }
  console.error(`browser console: ${JSON.stringify(consoleErrors)}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
