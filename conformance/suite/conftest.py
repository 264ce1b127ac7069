def pytest_configure(config):
    config.addinivalue_line("markers", "needs(*capabilities): backend capabilities the check requires")
