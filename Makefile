# Two entry points, each sets up .venv (idempotent) first: `make demo` and `make test`.
.PHONY: setup demo test validate bench lint

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/diffsim demo

test: setup
	.venv/bin/python -m pytest -q

validate: setup
	.venv/bin/diffsim validate mpm

bench: setup
	.venv/bin/diffsim bench mpm --particles 10000 --grid 64

lint: setup
	.venv/bin/ruff check .
