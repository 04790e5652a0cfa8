// Envoy Gateway's controller for the end-to-end tests: the Kubernetes provider, the Gateway API
// translator (which writes the status of Gateways, routes and policies) and the xDS server,
// wired as `envoy-gateway server` wires them, with every listener on loopback and the xDS
// server's certificate and port from flags instead of the fixed /certs and 18000 of an in-cluster
// install. Envoy proxies are not deployed (no infrastructure runner): the tests read the status
// the controller writes and the xDS it would send.
//
// `envoy-gateway-e2e dump` is the other half: an xDS client that connects to that server as the
// Envoy of one gateway (node cluster = Envoy Gateway's key for it, `<namespace>/<name>`), with a
// client certificate of the same CA, and prints the listeners and routes it is sent, in the
// protobuf JSON form of Envoy's own messages.
//
// build.sh copies this file into a copy of the github.com/envoyproxy/gateway module at the pinned
// version (as cmd/palisade-e2e) and builds it there, so it compiles against that module's own
// go.mod and go.sum.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/encoding/protojson"

	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/envoyproxy/gateway/internal/envoygateway/config"
	extensionregistry "github.com/envoyproxy/gateway/internal/extension/registry"
	gatewayapirunner "github.com/envoyproxy/gateway/internal/gatewayapi/runner"
	"github.com/envoyproxy/gateway/internal/logging"
	"github.com/envoyproxy/gateway/internal/message"
	providerrunner "github.com/envoyproxy/gateway/internal/provider/runner"
	xdsrunner "github.com/envoyproxy/gateway/internal/xds/runner"
	// Registers every Envoy message Envoy Gateway's configuration carries, so typed
	// configuration prints as JSON.
	_ "github.com/envoyproxy/gateway/internal/xds/translator"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "dump" {
		if err := dump(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "envoy-gateway-e2e dump:", err)
			os.Exit(1)
		}
		return
	}
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

// dump fetches the listeners and routes the xDS server holds for one gateway and prints them as
// one JSON object {"listeners": [...], "routes": [...]}.
func dump(args []string) error {
	fs := flag.NewFlagSet("dump", flag.ExitOnError)
	addr := fs.String("xds", "", "xDS server address")
	cluster := fs.String("cluster", "", "the gateway's key, <namespace>/<name>")
	cert := fs.String("cert", "", "client certificate")
	key := fs.String("key", "", "client key")
	ca := fs.String("ca", "", "CA of the server certificate")
	timeout := fs.Duration("timeout", 10*time.Second, "how long to wait for each answer")
	if err := fs.Parse(args); err != nil {
		return err
	}
	pair, err := tls.LoadX509KeyPair(*cert, *key)
	if err != nil {
		return err
	}
	pem, err := os.ReadFile(*ca)
	if err != nil {
		return err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return fmt.Errorf("no certificate in %s", *ca)
	}
	creds := credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{pair}, RootCAs: roots, ServerName: "envoy-gateway",
		MinVersion: tls.VersionTLS12,
	})
	conn, err := grpc.NewClient(*addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		return err
	}
	defer conn.Close()
	out := map[string][]json.RawMessage{}
	for _, t := range []struct{ name, url string }{
		{"listeners", resourcev3.ListenerType},
		{"routes", resourcev3.RouteType},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), *timeout)
		resources, err := fetch(ctx, conn, *cluster, t.url)
		cancel()
		if err != nil {
			return fmt.Errorf("%s: %w", t.name, err)
		}
		out[t.name] = resources
	}
	return json.NewEncoder(os.Stdout).Encode(out)
}

func fetch(ctx context.Context, conn *grpc.ClientConn, cluster, typeURL string) ([]json.RawMessage, error) {
	stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		return nil, err
	}
	req := &discoveryv3.DiscoveryRequest{
		Node:    &corev3.Node{Id: "palisade-e2e", Cluster: cluster},
		TypeUrl: typeURL,
	}
	if err := stream.Send(req); err != nil {
		return nil, err
	}
	resp, err := stream.Recv()
	if err != nil {
		return nil, err
	}
	var out []json.RawMessage
	for _, res := range resp.Resources {
		msg, err := res.UnmarshalNew()
		if err != nil {
			return nil, err
		}
		b, err := protojson.Marshal(msg)
		if err != nil {
			return nil, err
		}
		out = append(out, b)
	}
	return out, nil
}
