.PHONY: bench
bench:
	bash scripts/bench.sh $(ARGS)
