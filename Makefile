# Convenience targets; each script does its own set-up, so every target works on a fresh Debian 12 box.
.PHONY: demo test build bench clean
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
build:
	bash scripts/setup.sh
bench:
	bash bench/run_all.sh
clean:
	rm -rf build python/lowbit/*.so
