"""Load tests (locust) and the side-by-side benchmark harness; see load_tests/README.md."""
