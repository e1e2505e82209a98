// What the browser checks share: one line per check ("ok: NAME" or "FAILED: NAME (detail)"), an
// action whose exception counts as a failed check, and the closing line "PHASE: N passed, N failed"
// with exit code 1 on any failure.

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
