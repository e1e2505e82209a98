// The dashboard with API keys on, in headless Chromium: it asks for a key instead of failing, refuses
// a wrong one, and with the right one shows the cluster and its live stream (which an EventSource can
// only authenticate with the session cookie). The key is kept nowhere in the page.
//
// Env: GATEWAY (a coordinator with SOLLOL_API_KEYS=dashboard=KEY and one node "keyed-node"), API_KEY,
// OUT_DIR, CHROMIUM, PLAYWRIGHT_CORE. Last line "sign-in: N passed, N failed"; exits 1 on any failure.

const { chromium } = await import(process.env.PLAYWRIGHT_CORE);
const { check, attempt, finish } = await import('./checks.mjs');
const gateway = process.env.GATEWAY;
const key = process.env.API_KEY;

// The node has reported once the gateway (asked with the key) lists it.
for (let tries = 0; tries < 100; tries += 1) {
  const nodes = await fetch(`${gateway}/api/sollol/v1/nodes`, { headers: { authorization: `Bearer ${key}` } })
    .then((response) => response.json())
    .catch(() => ({ nodes: [] }));
  if (nodes.nodes.some((node) => node.name === 'keyed-node' && node.status === 'up')) break;
  await new Promise((resolve) => setTimeout(resolve, 100));
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
});
const page = await browser.newPage({ viewport: { width: 360, height: 800 } });
const pageErrors = [];
page.on('pageerror', (error) => pageErrors.push(String(error)));
const unauthorized = [];
page.on('response', (response) => {
  if (response.status() === 401 && !response.url().endsWith('/session')) unauthorized.push(response.url());
});

await page.goto(`${gateway}/dashboard/`);
await attempt('the dashboard asks for a key', async () => {
  await page.waitForSelector('#sign-in #api-key', { timeout: 15000 });
  check('the dashboard asks for a key', true);
});
check('nothing is read before signing in', unauthorized.length === 0, unauthorized.join(' '));

await attempt('a wrong key is refused', async () => {
  await page.fill('#api-key', 'not-the-key-0123456789');
  await page.click('#sign-in-button');
  await page.waitForSelector('#sign-in-error', { timeout: 10000 });
  const message = await page.textContent('#sign-in-error');
  check('a wrong key is refused', message.includes('not one of'), message);
});

await attempt('the right key shows the cluster', async () => {
  await page.fill('#api-key', key);
  await Promise.all([page.waitForNavigation({ timeout: 15000 }), page.click('#sign-in-button')]);
  await page.waitForSelector('article.card[data-name="keyed-node"]', { timeout: 15000 });
  check('the right key shows the cluster', true);
});
await attempt('the live stream connects with the session', async () => {
  await page.waitForSelector('#connection.live', { timeout: 10000 });
  check('the live stream connects with the session', true);
});
await attempt('the key is kept nowhere in the page', async () => {
  const stored = await page.evaluate(() => JSON.stringify({
    cookie: document.cookie,
    local: { ...localStorage },
    session: { ...sessionStorage },
  }));
  check('the key is kept nowhere in the page', !stored.includes(key), stored);
});
await page.screenshot({ path: `${process.env.OUT_DIR}/dashboard-signed-in.png`, fullPage: true });
check('no page errors', pageErrors.length === 0, pageErrors.join(' | '));

await browser.close();
finish('sign-in');
