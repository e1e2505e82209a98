// Benchmark helper (scripts/bench/dashboard): opens DASHBOARDS live dashboards in headless Chromium, sends
// RATE requests/s through the gateway for SECONDS, and prints one JSON line with the coordinator's CPU use
// over that window (from /proc/PID/stat) and the requests that failed.
//
// Env: GATEWAY, COORDINATOR_PID, CLK_TCK, DASHBOARDS, RATE, SECONDS, CHROMIUM, PLAYWRIGHT_CORE.
import { readFileSync } from 'node:fs';

const { chromium } = await import(process.env.PLAYWRIGHT_CORE);
const gateway = process.env.GATEWAY;
const pid = Number(process.env.COORDINATOR_PID);
const ticksPerSecond = Number(process.env.CLK_TCK);
const dashboards = Number(process.env.DASHBOARDS);
const rate = Number(process.env.RATE);
const seconds = Number(process.env.SECONDS);

function cpuSeconds() {
  // Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th.
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / ticksPerSecond;
}

for (let tries = 0; tries < 100; tries += 1) {
  const nodes = await fetch(`${gateway}/api/sollol/v1/nodes`).then((r) => r.json()).catch(() => ({ nodes: [] }));
  if (nodes.nodes.filter((node) => node.status === 'up').length === 2) break;
  await new Promise((resolve) => setTimeout(resolve, 100));
}

const browser = dashboards > 0
  ? await chromium.launch({ executablePath: process.env.CHROMIUM, args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'] })
  : null;
for (let index = 0; index < dashboards; index += 1) {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  await page.goto(`${gateway}/dashboard/`);
  await page.waitForSelector('#connection.live', { timeout: 20000 });
}
await new Promise((resolve) => setTimeout(resolve, 2000));

let sent = 0;
let failed = 0;
const pending = [];
const startCpu = cpuSeconds();
const started = Date.now();
const body = JSON.stringify({ model: 'smollm2:135m', stream: false, messages: [{ role: 'user', content: 'hello' }] });
while (Date.now() - started < seconds * 1000) {
  const due = Math.floor(((Date.now() - started) / 1000) * rate);
  while (sent < due) {
    sent += 1;
    pending.push(
      fetch(`${gateway}/api/chat`, { method: 'POST', headers: { 'content-type': 'application/json' }, body })
        .then((response) => (response.ok ? response.arrayBuffer() : Promise.reject(new Error(`HTTP ${response.status}`))))
        .catch(() => { failed += 1; }),
    );
  }
  await new Promise((resolve) => setTimeout(resolve, 5));
}
await Promise.all(pending);
const wall = (Date.now() - started) / 1000;
const cpu = cpuSeconds() - startCpu;
if (browser) await browser.close();
console.log(JSON.stringify({ dashboards, requests: sent, failed, seconds: wall, coordinator_cpu_percent: (cpu / wall) * 100 }));
