//go:build tools

// Package tools pins istiod (pilot-discovery) for the end-to-end toolchain build.
package tools

import _ "istio.io/istio/pilot/cmd/pilot-discovery"
