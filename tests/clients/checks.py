"""Runs a client script's `test_*` functions and reports them the way the Rust tests read it."""

import sys
import traceback


def run_tests(label, namespace):
    """Runs every callable `test_*` in `namespace` (a module's globals()), prints one line per test and a
    closing "LABEL: N passed, N failed", and exits non-zero on any failure."""
    tests = [(name, value) for name, value in namespace.items() if name.startswith("test_") and callable(value)]
    passed = failed = 0
    for name, test in tests:
        try:
            test()
            passed += 1
            print(f"ok      {name}")
        except Exception:  # noqa: BLE001 - report every failure, then the summary
            failed += 1
            print(f"FAILED  {name}")
            traceback.print_exc()
    print(f"{label}: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
