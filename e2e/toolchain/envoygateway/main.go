// Envoy Gateway's controller for the end-to-end tests: the Kubernetes provider, the Gateway API
// translator (which writes the status of Gateways, routes and policies) and the xDS server,
// wired as `envoy-gateway server` wires them, with every listener on loopback and the xDS
// server's certificate and port from flags instead of the fixed /certs and 18000 of an in-cluster
// install. Envoy proxies are not deployed (no infrastructure runner): the tests read the status
// the controller writes and the xDS it would send.
//
// build.sh copies this file into a copy of the github.com/envoyproxy/gateway module at the pinned
// version (as cmd/palisade-e2e) and builds it there, so it compiles against that module's own
// go.mod and go.sum.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/envoyproxy/gateway/internal/envoygateway/config"
	extensionregistry "github.com/envoyproxy/gateway/internal/extension/registry"
	gatewayapirunner "github.com/envoyproxy/gateway/internal/gatewayapi/runner"
	"github.com/envoyproxy/gateway/internal/logging"
	"github.com/envoyproxy/gateway/internal/message"
	providerrunner "github.com/envoyproxy/gateway/internal/provider/runner"
	xdsrunner "github.com/envoyproxy/gateway/internal/xds/runner"
)

func main() {
	cfgPath := flag.String("config", "", "EnvoyGateway configuration file")
	tlsDir := flag.String("tls-dir", "", "directory with tls.crt, tls.key and ca.crt for the xDS server")
	xdsPort := flag.Int("xds-port", 0, "loopback port of the xDS server")
	flag.Parse()
	if *cfgPath == "" || *tlsDir == "" || *xdsPort == 0 {
		fmt.Fprintln(os.Stderr, "usage: envoy-gateway-e2e --config FILE --tls-dir DIR --xds-port PORT")
		os.Exit(2)
	}
	if err := run(*cfgPath, *tlsDir, *xdsPort); err != nil {
		fmt.Fprintln(os.Stderr, "envoy-gateway-e2e:", err)
		os.Exit(1)
	}
}

func run(cfgPath, tlsDir string, xdsPort int) error {
	// No metrics listener (controller-runtime's default is :8080 on every interface).
	metricsserver.DefaultBindAddress = "0"
	xdsrunner.XdsServerPort = xdsPort

	cfg, err := config.New(os.Stdout, os.Stderr)
	if err != nil {
		return err
	}
	eg, err := config.Decode(cfgPath)
	if err != nil {
		return fmt.Errorf("decode %s: %w", cfgPath, err)
	}
	eg.SetEnvoyGatewayDefaults()
	eg.Logging.SetEnvoyGatewayLoggingDefaults()
	cfg.EnvoyGateway = eg
	cfg.Logger = logging.NewLogger(os.Stdout, eg.Logging)
	if _, err := cfg.Validate(); err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	runnerErrors := &message.RunnerErrors{}
	defer runnerErrors.Close()
	cfg.Elected = make(chan struct{})
	cfg.ProviderReady = make(chan struct{})
	pResources := new(message.ProviderResources)
	xdsIR := new(message.XdsIR)
	infraIR := new(message.InfraIR)

	extMgr, err := extensionregistry.NewManager(cfg, true)
	if err != nil {
		return err
	}
	runners := []interface {
		Start(context.Context) error
		Name() string
	}{
		providerrunner.New(&providerrunner.Config{
			Server: *cfg, ProviderResources: pResources, RunnerErrors: runnerErrors,
		}),
		gatewayapirunner.New(&gatewayapirunner.Config{
			Server: *cfg, ProviderResources: pResources, RunnerErrors: runnerErrors,
			XdsIR: xdsIR, InfraIR: infraIR, ExtensionManager: extMgr,
		}),
		xdsrunner.New(&xdsrunner.Config{
			Server: *cfg, XdsIR: xdsIR, ExtensionManager: extMgr,
			ProviderResources: pResources, RunnerErrors: runnerErrors,
			TLSCertPath: filepath.Join(tlsDir, "tls.crt"),
			TLSKeyPath:  filepath.Join(tlsDir, "tls.key"),
			TLSCaPath:   filepath.Join(tlsDir, "ca.crt"),
		}),
	}
	for _, r := range runners {
		cfg.Logger.Info("starting runner", "name", r.Name())
		if err := r.Start(ctx); err != nil {
			return fmt.Errorf("runner %s: %w", r.Name(), err)
		}
	}
	// Runner errors are printed (the stock server ignores them unless embedded): a test that
	// fails shows them in this process's log.
	errs := runnerErrors.Subscribe(ctx)
	for {
		select {
		case <-ctx.Done():
			xdsIR.Close()
			return nil
		case snap, ok := <-errs:
			if !ok {
				return nil
			}
			for _, u := range snap.Updates {
				if !u.Delete && u.Value != nil {
					fmt.Fprintf(os.Stderr, "runner error: %s: %v\n", u.Key, u.Value)
				}
			}
		}
	}
}
