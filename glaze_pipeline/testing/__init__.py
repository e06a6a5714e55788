"""Stand-ins for the outside world, on loopback: the mock provider APIs (`mock_server`), the mock
LLM (`mock_llm`) and the runner both serve from (`loopback`). Used by the tests, the benchmark
and `glaze mock-providers` / `glaze mock-llm`; the product (core, defs, api, launcher) never
imports them (an import-linter contract in pyproject.toml)."""
