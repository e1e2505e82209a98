// Two coordinators of one cluster in the dashboard (scripts/dashboard-check starts a second coordinator
// peered with the first after tests/browser/dashboard.mjs): each one's dashboard lists both, marks
// itself as the one the page reads, and links to the other's dashboard.
//
// Env: GATEWAY and PEER_GATEWAY (http://127.0.0.1:PORT each), OUT_DIR (screenshot), CHROMIUM,
// PLAYWRIGHT_CORE. Prints one line per check and "coordinators: N passed, N failed"; exits 1 on a failure.

const { chromium } = await import(process.env.PLAYWRIGHT_CORE);
const { check, attempt, finish, openPhonePage } = await import('./checks.mjs');
const gateway = process.env.GATEWAY;
const peer = process.env.PEER_GATEWAY;
const outDir = process.env.OUT_DIR;

const { browser, page, consoleErrors } = await openPhonePage(chromium);

for (const [label, url, other] of [['first', gateway, peer], ['second', peer, gateway]]) {
  await attempt(`the ${label} coordinator's dashboard lists both coordinators`, async () => {
    await page.goto(`${url}/dashboard/`);
    await page.waitForSelector('#coordinators li.coordinator[data-state="alive"]', { timeout: 20000 });
    const items = await page.$$eval('#coordinators li.coordinator', (lis) => lis.map((li) => ({
      state: li.dataset.state,
      current: li.getAttribute('aria-current'),
      link: li.querySelector('a')?.getAttribute('href') ?? null,
      text: li.textContent,
    })));
    const [self, them] = items;
    check(`the ${label} coordinator's dashboard lists both coordinators`, items.length === 2, JSON.stringify(items));
    check(`the ${label} dashboard marks the coordinator it reads`, self?.state === 'this' && self?.current === 'true'
      && self?.text.includes('this page reads it') && them?.current === null, JSON.stringify(items));
    check(`the ${label} dashboard links to the other's dashboard`, them?.link === `${other}/dashboard/`, JSON.stringify(items));
    const width = await page.evaluate(() => document.documentElement.scrollWidth);
    check(`the ${label} dashboard fits 360 px with the coordinators`, width <= 360, `scroll width ${width}`);
    await page.screenshot({ path: `${outDir}/dashboard-coordinators-${label}.png`, fullPage: true });
  });
}
check('no console errors', consoleErrors.length === 0, consoleErrors.join(' | '));
await browser.close();
finish('coordinators');
