// What the browser checks share: one line per check ("ok: NAME" or "FAILED: NAME (detail)"), an
// action whose exception counts as a failed check, the closing line "PHASE: N passed, N failed"
// with exit code 1 on any failure, and a page in headless Chromium at a phone's width.

let passed = 0;
let failed = 0;

export function check(name, ok, detail = '') {
  if (ok) {
    passed += 1;
    console.log(`ok: ${name}`);
  } else {
    failed += 1;
    console.log(`FAILED: ${name}${detail ? ` (${detail})` : ''}`);
  }
}

export async function attempt(name, action) {
  try {
    await action();
  } catch (error) {
    check(name, false, String(error).split('\n')[0]);
  }
}

export function finish(phase) {
  console.log(`${phase}: ${passed} passed, ${failed} failed`);
  process.exit(failed === 0 ? 0 : 1);
}

// Headless Chromium (process.env.CHROMIUM) with one page 360 px wide, and the page's console errors
// and uncaught exceptions collected as they come.
export async function openPhonePage(chromium) {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
  const page = await browser.newPage({ viewport: { width: 360, height: 800 } });
  const consoleErrors = [];
  page.on('console', (message) => {
    if (message.type() === 'error') consoleErrors.push(message.text());
  });
  page.on('pageerror', (error) => consoleErrors.push(String(error)));
  return { browser, page, consoleErrors };
}
