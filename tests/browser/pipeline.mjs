// The dashboard's pipeline view in headless Chromium (playwright-core), against the real `sollol
// coordinator` serving the test model split over two agents (distributed inference; started by
// scripts/dashboard-check). One chat through the gateway plans the pipeline; the dashboard must then
// show both stages with their layers, and the page must stay free of console errors.
//
// Env: GATEWAY, OUT_DIR, CHROMIUM, PLAYWRIGHT_CORE (as dashboard.mjs). Prints one line per check and a
// last line "pipeline: N passed, N failed"; exits 1 on any failure.

const { chromium } = await import(process.env.PLAYWRIGHT_CORE);
const { check, attempt, finish, openPhonePage } = await import('./checks.mjs');
const gateway = process.env.GATEWAY;
const outDir = process.env.OUT_DIR;

// The distributed model is listed once the coordinator has probed its own front and the agents joined.
let listed = false;
for (let tries = 0; tries < 200 && !listed; tries += 1) {
  const nodes = await fetch(`${gateway}/api/sollol/v1/nodes`).then((response) => response.json()).catch(() => ({ nodes: [] }));
  const stages = nodes.nodes.filter((node) => node.status === 'up' && node.stage_address);
  const tags = await fetch(`${gateway}/api/tags`).then((response) => response.text()).catch(() => '');
  listed = stages.length === 2 && tags.includes('smollm2:135m');
  if (!listed) await new Promise((resolve) => setTimeout(resolve, 100));
}
check('the distributed model is listed with two stage agents up', listed);

const answer = await fetch(`${gateway}/api/chat`, {
  method: 'POST',
  body: JSON.stringify({
    model: 'smollm2:135m',
    stream: false,
    messages: [{ role: 'user', content: 'What is the capital of France?' }],
    options: { temperature: 0, num_predict: 8 },
  }),
}).then((response) => response.json()).catch((error) => ({ error: String(error) }));
check('a chat through the gateway is answered by the pipeline', answer.done === true && answer.eval_count > 0, JSON.stringify(answer).slice(0, 200));

const { browser, page, consoleErrors } = await openPhonePage(chromium);
await page.goto(`${gateway}/dashboard/`);
try {
  await page.waitForSelector('#pipelines .stage:nth-child(2)', { timeout: 15000 });
  const text = await page.textContent('#pipelines');
  check('the pipeline view shows both stages and their layers',
    /layers 0–14/.test(text) && /layers 15–29/.test(text) && /head, sampling/.test(text), text.slice(0, 300));
  check('the pipeline view shows what a token costs', /tokens\/s/.test(text) && /per token/.test(text), text.slice(0, 300));
  await page.screenshot({ path: `${outDir}/dashboard-pipeline.png`, fullPage: true });
} catch (error) {
  check('the pipeline view shows both stages and their layers', false, String(error).split('\n')[0]);
}
const width = await page.evaluate(() => document.documentElement.scrollWidth);
check('the page fits 360 px', width <= 360, `scroll width ${width}`);
check('no console errors', consoleErrors.length === 0, consoleErrors.join(' | '));
await browser.close();
finish('pipeline');
