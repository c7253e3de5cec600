// A page on one origin calls the API on another, as a browser client of the API would: opens
// PAGE_URL in Debian's headless Chromium (driven by playwright-core), then, from that page, runs
// fetch() for each call in CALLS_JSON and prints the outcomes as one JSON object on stdout.
// It judges nothing: tests/system/test_docs_page.py asserts on the report.
//
//   node cross_origin.mjs PAGE_URL USER_DATA_DIR CALLS_JSON
//
// CALLS_JSON: [{"name": ..., "url": ..., "key": ... or null, "body": {...}}, ...]. Each call is a
// POST with Content-Type: application/json (and Authorization when a key is given), so the
// browser sends a CORS preflight first. An outcome is {ok, status, body, remaining} when the
// browser let the page read the answer, or {error} (a TypeError) when CORS refused it.
import { launch, TIMEOUT_MS } from "./chromium.mjs";

const [pageUrl, userDataDir, callsJson] = process.argv.slice(2);
if (!pageUrl || !userDataDir || !callsJson) {
  console.error("usage: node cross_origin.mjs PAGE_URL USER_DATA_DIR CALLS_JSON");
  process.exit(2);
}
const calls = JSON.parse(callsJson);

const context = await launch(userDataDir);

const report = { page: pageUrl, origin: null, outcomes: {}, console: [] };
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(TIMEOUT_MS);
  page.on("console", (message) => report.console.push(message.text()));
  await page.goto(pageUrl, { waitUntil: "load" });
  report.origin = await page.evaluate(() => window.location.origin);
  for (const call of calls) {
    report.outcomes[call.name] = await page.evaluate(async ({ url, key, body }) => {
      const headers = { "Content-Type": "application/json" };
      if (key) headers.Authorization = `Bearer ${key}`;
      try {
        const response = await fetch(url, {
          method: "POST",
          headers,
          body: JSON.stringify(body),
        });
        return {
          ok: response.ok,
          status: response.status,
          body: await response.json(),
          remaining: response.headers.get("X-RateLimit-Remaining"),
        };
      } catch (error) {
        return { error: `${error.name}: ${error.message}` };
      }
    }, call);
  }
} finally {
  await context.close();
}
console.log(JSON.stringify(report));
