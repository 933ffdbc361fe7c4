pytest_plugins = ["tests.support.engine"]
