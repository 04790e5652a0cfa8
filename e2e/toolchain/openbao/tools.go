//go:build tools

// Package tools pins the OpenBao server module for the end-to-end toolchain build.
package tools

import _ "github.com/openbao/openbao"
