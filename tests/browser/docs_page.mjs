// Opens GET /docs in Debian's headless Chromium (driven by playwright-core), waits for Swagger UI
// to render the spec, saves a full-page screenshot, and prints what it saw as one JSON object on
// stdout. It judges nothing: tests/system/test_docs_page.py asserts on the report.
//
//   node docs_page.mjs URL SCREENSHOT USER_DATA_DIR
//
// Every request, failed request, 4xx/5xx answer, console error and uncaught page error is
// recorded; a request to any other origin counts as external (the page must work offline).
import { launch, TIMEOUT_MS } from "./chromium.mjs";

const [url, screenshot, userDataDir] = process.argv.slice(2);
if (!url || !screenshot || !userDataDir) {
  console.error("usage: node docs_page.mjs URL SCREENSHOT USER_DATA_DIR");
  process.exit(2);
}
const origin = new URL(url).origin;

const context = await launch(userDataDir, { viewport: { width: 1280, height: 900 } });

const report = {
  url,
  screenshot,
  requests: [],
  external: [],
  failed: [],
  bad_responses: [],
  console_errors: [],
  page_errors: [],
  responses: {},
  rendered: false,
  paths: [],
  title: null,
  text: "",
};

try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(TIMEOUT_MS);
  page.on("request", (request) => {
    report.requests.push(request.url());
    if (new URL(request.url()).origin !== origin && !request.url().startsWith("data:")) {
      report.external.push(request.url());
    }
  });
  page.on("requestfailed", (request) => {
    report.failed.push({ url: request.url(), error: request.failure()?.errorText ?? "" });
  });
  page.on("response", (response) => {
    const headers = response.headers();
    report.responses[response.url()] = {
      status: response.status(),
      content_type: headers["content-type"] ?? null,
      nosniff: headers["x-content-type-options"] ?? null,
    };
    if (response.status() >= 400) {
      report.bad_responses.push({ url: response.url(), status: response.status() });
    }
  });
  page.on("console", (message) => {
    if (message.type() === "error") report.console_errors.push(message.text());
  });
  page.on("pageerror", (error) => report.page_errors.push(String(error)));

  await page.goto(url, { waitUntil: "load" });
  try {
    // One block per operation, once the spec has been fetched and rendered.
    await page.locator(".opblock-summary-path").first().waitFor({ state: "visible" });
    report.rendered = true;
  } catch (error) {
    report.page_errors.push(`no operation rendered: ${error.message.split("\n")[0]}`);
  }
  await page.waitForLoadState("networkidle");
  report.paths = await page
    .locator(".opblock-summary-path")
    .evaluateAll((elements) =>
      elements.filter((e) => e.offsetParent !== null).map((e) => e.innerText.trim()),
    );
  report.title = await page.title();
  report.text = await page.locator("body").innerText();
  await page.screenshot({ path: screenshot, fullPage: true });
} finally {
  await context.close();
}
console.log(JSON.stringify(report));
