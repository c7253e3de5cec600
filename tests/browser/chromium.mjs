// Debian's headless Chromium (/usr/bin/chromium, or $CHROMIUM) driven by playwright-core, with
// the flags every test page needs on this machine: without the background-networking ones
// Chromium tries to reach Google's services (there is no internet here) and logs the failures.
import playwright from "playwright-core";

export const TIMEOUT_MS = 90_000; // a shared 2-core machine: generous, only a hang should reach it

export function launch(userDataDir, options = {}) {
  return playwright.chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--disable-dev-shm-usage",
    ],
    timeout: TIMEOUT_MS,
    ...options,
  });
}
