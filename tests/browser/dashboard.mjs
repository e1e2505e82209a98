// End-to-end check of the dashboard in headless Chromium (driven by playwright-core), against the real
// `sollol coordinator` with two agents in front of emulated Ollama nodes (started by scripts/dashboard-check).
//
// Env: GATEWAY (http://127.0.0.1:PORT), DOOMED_AGENT_PID (the agent of node "browser-node-b", killed here),
// OUT_DIR (screenshot and timings), CHROMIUM (the browser binary), PLAYWRIGHT_CORE (path to its index.mjs).
// Prints one line per check and a last line "dashboard: N passed, N failed"; exits 1 on any failure.

const { chromium } = await import(process.env.PLAYWRIGHT_CORE);
const { check, attempt, finish, openPhonePage } = await import('./checks.mjs');
const gateway = process.env.GATEWAY;
const outDir = process.env.OUT_DIR;
const requests = 10;


// Both agents have reported their node's models once the gateway lists them.
for (let tries = 0; tries < 100; tries += 1) {
  const tags = await fetch(`${gateway}/api/tags`).then((response) => response.text()).catch(() => '');
  const nodes = await fetch(`${gateway}/api/sollol/v1/nodes`).then((response) => response.json()).catch(() => ({ nodes: [] }));
  if (tags.includes('smollm2') && nodes.nodes.filter((node) => node.status === 'up').length === 2) break;
  await new Promise((resolve) => setTimeout(resolve, 100));
}

const { browser, page, consoleErrors } = await openPhonePage(chromium);
const foreign = [];
page.on('request', (request) => {
  if (!request.url().startsWith(gateway)) foreign.push(request.url());
});

const opened = Date.now();
await page.goto(`${gateway}/dashboard/`);
await attempt('node cards show the nodes by name', async () => {
  await page.waitForSelector('article.card[data-name="browser-node-a"]', { timeout: 15000 });
  await page.waitForSelector('article.card[data-name="browser-node-b"]', { timeout: 15000 });
  check('node cards show the nodes by name', true);
});
const paintMs = Date.now() - opened;
console.log(`first meaningful paint (navigation to node cards): ${paintMs} ms`);

await attempt('node cards show RAM from the agents', async () => {
  const list = await fetch(`${gateway}/api/sollol/v1/nodes`).then((response) => response.json());
  const node = list.nodes.find((candidate) => candidate.name === 'browser-node-a');
  const total = `${(node.hardware.memory.total_bytes / 1024 ** 3).toFixed(1)} GiB`;
  const text = await page.textContent('article.card[data-name="browser-node-a"]');
  check('node cards show RAM from the agents', text.includes('RAM') && text.includes(`/ ${total}`), `${total} not in ${text}`);
});

// The models page: which node holds which model, updated live when a pull through the gateway lands.
await attempt('the models page shows each model on each node, live', async () => {
  await page.click('#models-link');
  await page.waitForSelector('#model-matrix tr[data-model="smollm2:135m"]', { timeout: 10000 });
  const header = await page.$$eval('#model-matrix thead th', (cells) => cells.map((cell) => cell.textContent));
  check('the models page has a column per node', JSON.stringify(header) === JSON.stringify(['Model', 'Size', 'browser-node-a', 'browser-node-b']), JSON.stringify(header));
  const pulled = await fetch(`${gateway}/api/pull`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-sollol-node': 'browser-node-a' },
    body: JSON.stringify({ model: 'tinyllama:1b', stream: false }),
  });
  check('a pull through the gateway succeeds', pulled.status === 200, `${pulled.status} ${await pulled.text()}`);
  await page.waitForSelector('#model-matrix tr[data-model="tinyllama:1b"]', { timeout: 10000 });
  const cells = await page.$$eval('#model-matrix tr[data-model="tinyllama:1b"] td', (tds) => tds.map((td) => td.className));
  check('the pulled model shows on its node only', cells[2] === 'present' && cells[3] === 'absent', JSON.stringify(cells));
  await page.screenshot({ path: `${outDir}/dashboard-models.png`, fullPage: true });
  const width = await page.evaluate(() => document.documentElement.scrollWidth);
  check('the models page fits 360 px', width <= 360, `scroll width ${width}`);
  // A count kept by the coordinator: its own column, and the model added to the other node.
  const kept = await fetch(`${gateway}/api/sollol/v1/replicas/tinyllama:1b`, {
    method: 'PUT',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ replicas: 'all' }),
  });
  check('a replica count can be set', kept.status === 200, `${kept.status} ${await kept.text()}`);
  await page.waitForFunction(() => {
    const cells = [...document.querySelectorAll('#model-matrix tr[data-model="tinyllama:1b"] td')];
    return cells.length === 5 && cells[2].textContent === 'all' && cells[3].className === 'present' && cells[4].className === 'present';
  }, null, { timeout: 30000 });
  const keptHeader = await page.$$eval('#model-matrix thead th', (cells) => cells.map((cell) => cell.textContent));
  check('kept models show their count and fill every node', JSON.stringify(keptHeader) === JSON.stringify(['Model', 'Size', 'Keep', 'browser-node-a', 'browser-node-b']), JSON.stringify(keptHeader));
  await page.click('#nodes-link');
  await page.waitForSelector('article.card[data-name="browser-node-a"]', { timeout: 10000 });
});

await attempt('the live stream connects', async () => {
  await page.waitForSelector('#connection.live', { timeout: 10000 });
  check('the live stream connects', true);
});

// Requests through the gateway appear in the feed and counters without a reload.
for (let index = 0; index < requests; index += 1) {
  const response = await fetch(`${gateway}/api/chat`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-sollol-app': 'browser-test' },
    body: JSON.stringify({
      model: 'smollm2:135m',
      stream: false,
      messages: [{ role: 'user', content: `hello ${index}` }],
    }),
  });
  if (!response.ok) check(`request ${index} answered`, false, `HTTP ${response.status}`);
  await response.arrayBuffer();
}
await attempt('the live counter counts every request', async () => {
  await page.waitForFunction(
    (expected) => document.querySelector('#requests-live')?.textContent === String(expected),
    requests,
    { timeout: 10000 },
  );
  check('the live counter counts every request', true);
});
await attempt('the feed lists every request with its routing reason', async () => {
  await page.waitForFunction(
    (expected) => document.querySelectorAll('#feed li.request').length >= expected,
    requests,
    { timeout: 10000 },
  );
  const decision = await page.textContent('#feed li.request .decision');
  check('the feed lists every request with its routing reason', /intelligent: /.test(decision), decision);
});
await attempt('the window statistics count the requests', async () => {
  await page.waitForFunction(
    (expected) => Number(document.querySelector('#requests-window')?.textContent) >= expected,
    requests,
    { timeout: 15000 },
  );
  await page.waitForSelector('#apps td', { timeout: 5000 });
  const apps = await page.textContent('#apps');
  check('the window statistics count the requests', apps.includes('browser-test'), apps);
});

// A node going down turns its card red within seconds.
process.kill(Number(process.env.DOOMED_AGENT_PID), 'SIGKILL');
const killed = Date.now();
await attempt('a killed node turns red', async () => {
  await page.waitForSelector('article.card[data-name="browser-node-b"][data-status="down"]', { timeout: 15000 });
  const border = await page.$eval(
    'article.card[data-name="browser-node-b"]',
    (card) => getComputedStyle(card).borderTopColor,
  );
  console.log(`node down shown after ${Date.now() - killed} ms`);
  check('a killed node turns red', border === 'rgb(207, 34, 46)', border);
});

await page.screenshot({ path: `${outDir}/dashboard.png`, fullPage: true });
console.log(`screenshot: ${outDir}/dashboard.png`);

await attempt('the node page shows its requests and hardware', async () => {
  await page.click('article.card[data-name="browser-node-a"] h3 a');
  await page.waitForSelector('#node-detail', { timeout: 10000 });
  const text = await page.textContent('main');
  check('the node page shows its requests and hardware', /samples\)/.test(text) && /Recent requests/.test(text), text.slice(0, 200));
  await page.screenshot({ path: `${outDir}/dashboard-node.png`, fullPage: true });
});

await attempt('the page fits 360 px', async () => {
  const width = await page.evaluate(() => document.documentElement.scrollWidth);
  check('the page fits 360 px', width <= 360, `scroll width ${width}`);
});
check('no console errors', consoleErrors.length === 0, consoleErrors.join(' | '));
check('no requests to other hosts', foreign.length === 0, foreign.join(' '));

await browser.close();
const { writeFileSync } = await import('node:fs');
writeFileSync(`${outDir}/dashboard-timings.json`, JSON.stringify({ first_meaningful_paint_ms: paintMs }) + '\n');
finish('dashboard');
