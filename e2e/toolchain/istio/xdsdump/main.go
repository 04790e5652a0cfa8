// Command xdsdump connects to istiod's plain-text xDS port as the sidecar of one workload and
// prints, for every listener push it receives, the parts of the configuration that decide whether
// a request reaches the workload: per filter chain, its match, the network and HTTP RBAC filters,
// the JWT authentication filter and the external authorization filter, as one JSON line.
//
// It acknowledges each push, so istiod keeps sending updates until the process is stopped or
// -timeout passes.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	extauthz "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	jwtauthn "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/jwt_authn/v3"
	httprbac "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	netrbac "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"
)

const listenerType = "type.googleapis.com/envoy.config.listener.v3.Listener"

type chain struct {
	Listener    string            `json:"listener"`
	Name        string            `json:"name"`
	Match       json.RawMessage   `json:"match,omitempty"`
	NetworkRBAC []json.RawMessage `json:"networkRbac,omitempty"`
	HTTP        bool              `json:"http"`
	HTTPRBAC    []json.RawMessage `json:"httpRbac,omitempty"`
	JWTAuthn    []json.RawMessage `json:"jwtAuthn,omitempty"`
	ExtAuthz    []json.RawMessage `json:"extAuthz,omitempty"`
}

type push struct {
	Version string  `json:"version"`
	Chains  []chain `json:"chains"`
}

func main() {
	addr := flag.String("addr", "127.0.0.1:15010", "istiod's plain-text xDS address")
	ns := flag.String("namespace", "", "the workload's namespace")
	sa := flag.String("service-account", "", "the workload's ServiceAccount")
	pod := flag.String("pod", "", "the workload's pod name")
	ip := flag.String("ip", "", "the workload's pod IP")
	labels := flag.String("labels", "", "the workload's labels, k=v,k=v")
	version := flag.String("istio-version", "1.31.0", "the proxy version announced")
	only := flag.String("listener", "virtualInbound", "print only this listener (empty: all)")
	timeout := flag.Duration("timeout", 10*time.Minute, "stop after this long")
	flag.Parse()
	if *ns == "" || *sa == "" || *pod == "" || *ip == "" {
		fail("-namespace, -service-account, -pod and -ip are required")
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	node, err := sidecar(*ns, *sa, *pod, *ip, *labels, *version)
	if err != nil {
		fail(err.Error())
	}
	conn, err := grpc.NewClient(*addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fail("connect: " + err.Error())
	}
	defer conn.Close()
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		fail("open stream: " + err.Error())
	}
	req := &discovery.DiscoveryRequest{Node: node, TypeUrl: listenerType}
	for {
		if err := stream.Send(req); err != nil {
			fail("send: " + err.Error())
		}
		resp, err := stream.Recv()
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			fail("receive: " + err.Error())
		}
		out := push{Version: resp.GetVersionInfo(), Chains: []chain{}}
		for _, res := range resp.GetResources() {
			var l listener.Listener
			if err := res.UnmarshalTo(&l); err != nil {
				fail("decode listener: " + err.Error())
			}
			if *only != "" && l.GetName() != *only {
				continue
			}
			for _, fc := range l.GetFilterChains() {
				c, err := summarize(l.GetName(), fc)
				if err != nil {
					fail(err.Error())
				}
				out.Chains = append(out.Chains, c)
			}
		}
		line, err := json.Marshal(out)
		if err != nil {
			fail("encode: " + err.Error())
		}
		fmt.Println(string(line))
		req = &discovery.DiscoveryRequest{
			TypeUrl:       listenerType,
			VersionInfo:   resp.GetVersionInfo(),
			ResponseNonce: resp.GetNonce(),
		}
	}
}

// sidecar is the node a sidecar of this workload announces, as istio-agent does.
func sidecar(ns, sa, pod, ip, labels, version string) (*core.Node, error) {
	l := map[string]any{}
	for _, kv := range strings.Split(labels, ",") {
		if kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, fmt.Errorf("label %q is not k=v", kv)
		}
		l[k] = v
	}
	meta, err := structpb.NewStruct(map[string]any{
		"NAMESPACE":         ns,
		"SERVICE_ACCOUNT":   sa,
		"NAME":              pod,
		"LABELS":            l,
		"INSTANCE_IPS":      ip,
		"ISTIO_VERSION":     version,
		"CLUSTER_ID":        "Kubernetes",
		"INTERCEPTION_MODE": "REDIRECT",
	})
	if err != nil {
		return nil, err
	}
	return &core.Node{
		Id:       fmt.Sprintf("sidecar~%s~%s.%s~%s.svc.cluster.local", ip, pod, ns, ns),
		Metadata: meta,
	}, nil
}

func summarize(name string, fc *listener.FilterChain) (chain, error) {
	c := chain{Listener: name, Name: fc.GetName()}
	if m := fc.GetFilterChainMatch(); m != nil {
		raw, err := protojson.Marshal(m)
		if err != nil {
			return c, err
		}
		c.Match = raw
	}
	for _, f := range fc.GetFilters() {
		switch f.GetName() {
		case "envoy.filters.network.rbac":
			raw, err := decode(f.GetTypedConfig(), &netrbac.RBAC{})
			if err != nil {
				return c, fmt.Errorf("chain %s: network RBAC: %w", c.Name, err)
			}
			c.NetworkRBAC = append(c.NetworkRBAC, raw)
		case "envoy.filters.network.http_connection_manager":
			c.HTTP = true
			var h hcm.HttpConnectionManager
			if err := f.GetTypedConfig().UnmarshalTo(&h); err != nil {
				return c, fmt.Errorf("chain %s: HTTP connection manager: %w", c.Name, err)
			}
			for _, hf := range h.GetHttpFilters() {
				var err error
				var raw json.RawMessage
				switch hf.GetName() {
				case "envoy.filters.http.rbac":
					raw, err = decode(hf.GetTypedConfig(), &httprbac.RBAC{})
					c.HTTPRBAC = append(c.HTTPRBAC, raw)
				case "envoy.filters.http.jwt_authn":
					raw, err = decode(hf.GetTypedConfig(), &jwtauthn.JwtAuthentication{})
					c.JWTAuthn = append(c.JWTAuthn, raw)
				case "envoy.filters.http.ext_authz":
					raw, err = decode(hf.GetTypedConfig(), &extauthz.ExtAuthz{})
					c.ExtAuthz = append(c.ExtAuthz, raw)
				}
				if err != nil {
					return c, fmt.Errorf("chain %s: filter %s: %w", c.Name, hf.GetName(), err)
				}
			}
		}
	}
	return c, nil
}

func decode(a *anypb.Any, m proto.Message) (json.RawMessage, error) {
	if err := a.UnmarshalTo(m); err != nil {
		return nil, err
	}
	return protojson.Marshal(m)
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, "xdsdump: "+msg)
	os.Exit(1)
}
