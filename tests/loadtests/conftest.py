"""The load-test client's tests reuse the API tests' live-server helper (a `headwise serve`
subprocess on a free loopback port, on a tiny random model)."""

from tests.api.conftest import start_server  # noqa: F401  (a fixture, registered by importing it)
