module palisade.dev/e2e/toolchain/shopapp

go 1.26.0

require github.com/lib/pq v1.10.9
