"""The conformance checks, as pytest tests: `pytest --pyargs conformance.suite --backend NAME`."""
