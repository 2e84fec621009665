"""The load-test client's tests reuse the API tests' live-server helper (a `headwise serve`
subprocess on a free loopback port, on a tiny random model)."""

from tests.api.conftest import ServerProcess, start_server  # noqa: F401  (start_server: a fixture)
