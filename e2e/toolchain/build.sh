#!/usr/bin/env bash
# Builds the real upstream binaries the end-to-end tests and `e2e/up` run, from the Go module proxy,
# into a cache directory keyed by tool and version. A second run finds them and builds nothing.
#
#   e2e/toolchain/build.sh [TOOL...]     TOOL: k8s crds opa spire spirecm openbao cosign crane registry helm
#                                        istio envoygateway node coredns shopapp gitleaks conftest regal kyverno
#                                        (default: all but kyverno, which only a benchmark runs)
#   e2e/toolchain/build.sh --print-bin   the directory holding every built binary (created)
#
# Environment: PALISADE_CACHE (default ~/.cache/palisade-e2e).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${PALISADE_CACHE:-$HOME/.cache/palisade-e2e}
bin="$cache/bin"
mkdir -p "$bin"

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false

K8S_VERSION=v1.36.3
# Third-party CRDs, copied from their published Go modules: module@version  path-glob...
CRD_MODULES=(
  "istio.io/api@v1.31.4 kubernetes/customresourcedefinitions.gen.yaml"
  "sigs.k8s.io/gateway-api@v1.6.3 config/crd/standard/gateway.networking.k8s.io_*.yaml"
  "github.com/envoyproxy/gateway@v1.9.1 charts/gateway-helm/charts/crds/crds/generated/gateway.envoyproxy.io_*.yaml"
  "github.com/spiffe/spire-controller-manager@v0.7.0 config/crd/bases/spire.spiffe.io_clusterspiffeids.yaml config/crd/bases/spire.spiffe.io_clusterstaticentries.yaml config/crd/bases/spire.spiffe.io_clusterfederatedtrustdomains.yaml"
  "github.com/cert-manager/cert-manager@v1.21.2 deploy/crds/cert-manager.io_certificates.yaml deploy/crds/cert-manager.io_issuers.yaml deploy/crds/cert-manager.io_clusterissuers.yaml"
  "github.com/prometheus-operator/prometheus-operator@v0.85.0 example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml"
  # The wgpolicyk8s.io PolicyReport kinds, as Kyverno publishes them (only the CRD files are used).
  "github.com/kyverno/kyverno@v1.19.1 config/crds/policyreport/wgpolicyk8s.io_policyreports.yaml config/crds/policyreport/wgpolicyk8s.io_clusterpolicyreports.yaml"
)
# tool  version  package (for `go install`)
TOOLS=(
  "helm     v3.22.0 helm.sh/helm/v3/cmd/helm"
  "opa      v1.22.2 github.com/open-policy-agent/opa"
  "conftest v0.69.0 github.com/open-policy-agent/conftest"
  "cosign   v3.1.2  github.com/sigstore/cosign/v3/cmd/cosign"
  "crane    v0.22.1 github.com/google/go-containerregistry/cmd/crane"
  "registry v3.1.2  github.com/distribution/distribution/v3/cmd/registry"
  "gitleaks v8.30.1 github.com/zricethezav/gitleaks/v8"
)

# Programs whose upstream go.mod has local replaces (or that need cgo), built from a wrapper module
# under e2e/toolchain/<dir> that pins them: name  version-label  dir  cgo  binary=package...
MODULE_TOOLS=(
  "spire   v1.13.3 spire   1 spire-server=github.com/spiffe/spire/cmd/spire-server spire-agent=github.com/spiffe/spire/cmd/spire-agent"
  # The controller manager that turns ClusterSPIFFEIDs into SPIRE registration entries.
  "spirecm v0.7.0  spirecm 0 spire-controller-manager=github.com/spiffe/spire-controller-manager/cmd"
  "openbao v2.4.0  openbao 0 bao=github.com/openbao/openbao"
  "istio   1.31-eed52ebb istio 0 pilot-discovery=istio.io/istio/pilot/cmd/pilot-discovery xdsdump=./xdsdump"
  # Cluster DNS for the node: CoreDNS with the plugins it needs (e2e/toolchain/coredns/main.go).
  "coredns v1.15.0 coredns 0 coredns=."
  # Regal, the Rego linter (its module's latest version the proxy serves with a checksum).
  "regal   v0.33.1 regal 0 regal=github.com/styrainc/regal"
  # Kyverno's admission controller, for the side-by-side admission benchmark only (built on
  # request: `e2e/toolchain/build.sh kyverno`; no test uses it).
  "kyverno v1.19.1 kyverno 0 kyverno=github.com/kyverno/kyverno/cmd/kyverno"
  # The example shop's workload (the node's images); its version is a hash of its source.
  "shopapp $(cat "$here"/shopapp/go.mod "$here"/shopapp/*.go | sha256sum | cut -c1-12) shopapp 0 shop-app=."
)

# A real node: container runtime, CNI plugins, and the Kubernetes node components (built from the
# same wrapper module as the control plane, sharing its build cache). runc needs cgo and libseccomp.
RUNC_VERSION=v1.5.3
CONTAINERD_VERSION=v2.4.2
CNI_VERSION=v1.10.0
NODE_K8S=(kubelet kube-proxy kube-scheduler)

# Envoy Gateway's controller (the same version as its CRDs above), built inside a copy of its
# module with the harness in e2e/toolchain/envoygateway/main.go; two lines of it are changed so
# every listener is on loopback and the xDS port is a flag (see build_envoygateway).
EG_VERSION=v1.9.1

if [[ "${1:-}" == "--print-bin" ]]; then
  echo "$bin"
  exit 0
fi

log() { printf '[toolchain] %s\n' "$*" >&2; }
fail() {
  log "FAILED: $1 at step '$2' (log: $3)"
  tail -n 30 "$3" >&2 || true
  exit 1
}

# link TOOL DIR: expose DIR/TOOL as $bin/TOOL.
link() { ln -sfn "$2/$1" "$bin/$1"; }

# The version stamp every Kubernetes binary reports.
k8s_ldflags() {
  local minor p ld=""
  minor=$(cut -d. -f2 <<<"$K8S_VERSION")
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
    ld+=" -X $p.buildDate=2026-01-01T00:00:00Z"
  done
  echo "$ld"
}

build_k8s() {
  local dir="$cache/k8s-$K8S_VERSION" names=(kube-apiserver kube-controller-manager etcd kubectl)
  local missing=0 n
  for n in "${names[@]}"; do [[ -x "$dir/$n" ]] || missing=1; done
  if ((missing == 0)); then
    log "k8s $K8S_VERSION: cached in $dir"
  else
    local start=$SECONDS logf="$cache/k8s-$K8S_VERSION.log" ld
    ld=$(k8s_ldflags)
    mkdir -p "$dir.tmp"
    log "k8s $K8S_VERSION: downloading modules (etcd, kube-apiserver, kube-controller-manager, kubectl)"
    (cd "$here/k8s" && go mod download) >"$logf" 2>&1 || fail "k8s" "go mod download" "$logf"
    for n in "${names[@]}"; do
      [[ -x "$dir/$n" ]] && continue
      log "k8s $K8S_VERSION: building $n (cold: several minutes)"
      (cd "$here/k8s" && go build -trimpath -ldflags "-s -w $ld" -o "$dir.tmp/$n" "./cmd/$n") >>"$logf" 2>&1 ||
        fail "$n" "go build" "$logf"
      mkdir -p "$dir" && mv "$dir.tmp/$n" "$dir/$n"
    done
    rmdir "$dir.tmp" 2>/dev/null || true
    log "k8s $K8S_VERSION: built in $((SECONDS - start)) s"
  fi
  for n in "${names[@]}"; do link "$n" "$dir"; done
}

# Copies third-party CRD YAML into $cache/crds/<module>@<version>/, printed as a directory list.
build_crds() {
  local entry mod globs dir src logf="$cache/crds.log" n
  for entry in "${CRD_MODULES[@]}"; do
    read -r mod globs <<<"$entry"
    dir="$cache/crds/${mod//\//_}"
    # Cached when the files were copied with the same globs.
    if compgen -G "$dir/*.yaml" >/dev/null && [[ "$(cat "$dir/.globs" 2>/dev/null)" == "$globs" ]]; then
      log "crds $mod: cached"
      continue
    fi
    log "crds $mod: downloading"
    src=$(cd "$here/k8s" && go mod download -json "$mod" 2>>"$logf" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
    [[ -n "$src" && -d "$src" ]] || fail "crds" "go mod download $mod" "$logf"
    mkdir -p "$dir.tmp"
    n=0
    for g in $globs; do
      for f in "$src"/$g; do
        [[ -f "$f" ]] || fail "crds" "find $g in $mod" "$logf"
        cp "$f" "$dir.tmp/" && n=$((n + 1))
      done
    done
    echo "$globs" >"$dir.tmp/.globs"
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
    log "crds $mod: $n files"
  done
}

build_tool() {
  local name=$1 version=$2 pkg=$3
  local dir="$cache/$name-$version"
  if [[ -x "$dir/$name" ]]; then
    log "$name $version: cached"
  else
    local start=$SECONDS logf="$cache/$name-$version.log"
    log "$name $version: building $pkg"
    mkdir -p "$dir.tmp"
    GOBIN="$dir.tmp" go install -trimpath -ldflags "-s -w" "$pkg@$version" >"$logf" 2>&1 ||
      fail "$name" "go install $pkg@$version" "$logf"
    mkdir -p "$dir" && mv "$dir.tmp/$name" "$dir/$name" && rm -rf "$dir.tmp"
    log "$name $version: built in $((SECONDS - start)) s"
  fi
  link "$name" "$dir"
}

# build_module NAME VERSION DIR CGO BINARY=PACKAGE...: go build each package of the wrapper module.
build_module() {
  local name=$1 version=$2 mdir=$3 cgo=$4
  shift 4
  local dir="$cache/$name-$version" missing=0 pair b
  for pair in "$@"; do [[ -x "$dir/${pair%%=*}" ]] || missing=1; done
  if ((missing == 0)); then
    log "$name $version: cached"
  else
    local start=$SECONDS logf="$cache/$name-$version.log"
    mkdir -p "$dir.tmp" "$dir"
    : >"$logf"
    for pair in "$@"; do
      b=${pair%%=*}
      [[ -x "$dir/$b" ]] && continue
      log "$name $version: building $b (cold: several minutes)"
      (cd "$here/$mdir" && CGO_ENABLED=$cgo GONOSUMDB=github.com/openbao \
        go build -trimpath -ldflags "-s -w" -o "$dir.tmp/$b" "${pair#*=}") >>"$logf" 2>&1 ||
        fail "$b" "go build ${pair#*=}" "$logf"
      mv "$dir.tmp/$b" "$dir/$b"
    done
    rm -rf "$dir.tmp"
    log "$name $version: built in $((SECONDS - start)) s"
  fi
  for pair in "$@"; do link "${pair%%=*}" "$dir"; done
}

# go_install_into DIR LOG PKG@VERSION...: go install into DIR (cgo as CGO_ENABLED says).
# patch FILE OLD NEW: replace the one line equal to OLD (leading whitespace aside) with NEW; fails
# unless exactly one line matches, so an upstream change is noticed rather than built around.
patch_line() {
  local file=$1 old=$2 new=$3 n
  n=$(grep -cxF -- "$old" <(sed 's/^[[:space:]]*//' "$file")) || true
  [[ "$n" == 1 ]] || return 1
  OLD="$old" NEW="$new" perl -0pi -e 's/^([ \t]*)\Q$ENV{OLD}\E$/$1$ENV{NEW}/m' "$file"
}

build_envoygateway() {
  local tag dir src work logf="$cache/envoygateway.log"
  tag=$(cat "$here/envoygateway/main.go" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-12)
  dir="$cache/envoygateway-$EG_VERSION-$tag"
  if [[ -x "$dir/envoy-gateway-e2e" ]]; then
    log "envoygateway $EG_VERSION: cached"
  else
    local start=$SECONDS
    : >"$logf"
    log "envoygateway $EG_VERSION: building the controller (cold: several minutes)"
    src=$(cd "$here/k8s" && go mod download -json "github.com/envoyproxy/gateway@$EG_VERSION" 2>>"$logf" |
      sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
    [[ -n "$src" && -d "$src" ]] || fail "envoygateway" "go mod download" "$logf"
    work="$cache/envoygateway-src"
    rm -rf "$work" && cp -r "$src" "$work" && chmod -R u+w "$work"
    # The xDS server listens on loopback, on the port the harness sets; the controller manager's
    # health probe (a fixed :8081 on every interface) is off.
    patch_line "$work/internal/xds/runner/runner.go" 'XdsServerAddress = "0.0.0.0"' 'XdsServerAddress = "127.0.0.1"' &&
      patch_line "$work/internal/xds/runner/runner.go" \
        'addr := net.JoinHostPort(XdsServerAddress, strconv.Itoa(bootstrap.DefaultXdsServerPort))' \
        'addr := net.JoinHostPort(XdsServerAddress, strconv.Itoa(xdsServerPort(bootstrap.DefaultXdsServerPort)))' &&
      patch_line "$work/internal/provider/kubernetes/kubernetes.go" 'healthProbeBindAddress = ":8081"' \
        'healthProbeBindAddress = "0"' ||
      fail "envoygateway" "patch $EG_VERSION (a patched line changed upstream)" "$logf"
    cat >"$work/internal/xds/runner/palisade_e2e.go" <<'EOF'
package runner

// XdsServerPort is the port of the xDS server when not zero (set by the e2e harness).
var XdsServerPort int

func xdsServerPort(def int) int {
	if XdsServerPort != 0 {
		return XdsServerPort
	}
	return def
}
EOF
    mkdir -p "$work/cmd/palisade-e2e" "$dir"
    cp "$here/envoygateway/main.go" "$work/cmd/palisade-e2e/main.go"
    (cd "$work" && go build -trimpath -ldflags "-s -w" -o "$dir/envoy-gateway-e2e.tmp" ./cmd/palisade-e2e) >>"$logf" 2>&1 ||
      fail "envoygateway" "go build" "$logf"
    mv "$dir/envoy-gateway-e2e.tmp" "$dir/envoy-gateway-e2e"
    rm -rf "$work"
    log "envoygateway $EG_VERSION: built in $((SECONDS - start)) s"
  fi
  link envoy-gateway-e2e "$dir"
}

go_install_into() {
  local dir=$1 logf=$2
  shift 2
  GOBIN="$dir" go install -trimpath -ldflags "-s -w" "$@" >>"$logf" 2>&1
}

build_node() {
  local dir="$cache/node-$K8S_VERSION-$CONTAINERD_VERSION" logf="$cache/node.log"
  local names=(runc containerd containerd-shim-runc-v2 ctr bridge host-local loopback portmap pause "${NODE_K8S[@]}")
  local missing=0 n
  for n in "${names[@]}"; do [[ -x "$dir/$n" ]] || missing=1; done
  if ((missing == 0)); then
    log "node: cached in $dir"
  else
    local start=$SECONDS t
    mkdir -p "$dir" && : >"$logf"
    if [[ ! -x "$dir/runc" ]]; then
      log "node: runc $RUNC_VERSION (cgo, seccomp)"
      pkg-config --exists libseccomp 2>/dev/null || fail "runc" "libseccomp not found (apt-get install libseccomp-dev pkg-config)" "$logf"
      CGO_ENABLED=1 GOBIN="$dir" go install -trimpath -tags seccomp "github.com/opencontainers/runc@$RUNC_VERSION" >>"$logf" 2>&1 ||
        fail "runc" "go install" "$logf"
    fi
    if [[ ! -x "$dir/containerd-shim-runc-v2" ]]; then
      t=$SECONDS
      log "node: containerd $CONTAINERD_VERSION (cold: a few minutes)"
      go_install_into "$dir" "$logf" "github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION" \
        "github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION" \
        "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION" ||
        fail "containerd" "go install" "$logf"
      log "node: containerd built in $((SECONDS - t)) s"
    fi
    if [[ ! -x "$dir/portmap" ]]; then
      log "node: CNI plugins $CNI_VERSION"
      go_install_into "$dir" "$logf" "github.com/containernetworking/plugins/plugins/main/bridge@$CNI_VERSION" \
        "github.com/containernetworking/plugins/plugins/ipam/host-local@$CNI_VERSION" \
        "github.com/containernetworking/plugins/plugins/main/loopback@$CNI_VERSION" \
        "github.com/containernetworking/plugins/plugins/meta/portmap@$CNI_VERSION" ||
        fail "cni" "go install" "$logf"
    fi
    if [[ ! -x "$dir/pause" ]]; then
      # The sandbox image's one binary, from the Kubernetes module's own source.
      local src
      src=$(cd "$here/k8s" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c
      [[ -f "$src" ]] || fail "pause" "find build/pause/linux/pause.c" "$logf"
      gcc -Os -static -DVERSION=palisade-e2e -o "$dir/pause" "$src" >>"$logf" 2>&1 || fail "pause" "gcc -static" "$logf"
    fi
    for n in "${NODE_K8S[@]}"; do
      [[ -x "$dir/$n" ]] && continue
      t=$SECONDS
      log "node: building $n (cold: several minutes)"
      (cd "$here/k8s" && go build -trimpath -ldflags "-s -w $(k8s_ldflags)" -o "$dir/$n.tmp" "./cmd/$n") >>"$logf" 2>&1 ||
        fail "$n" "go build" "$logf"
      mv "$dir/$n.tmp" "$dir/$n"
      log "node: $n built in $((SECONDS - t)) s"
    done
    log "node: built in $((SECONDS - start)) s"
  fi
  for n in "${names[@]}"; do link "$n" "$dir"; done
}

want=("$@")
((${#want[@]})) || want=(k8s crds opa conftest regal spire spirecm openbao istio envoygateway node coredns shopapp cosign crane registry helm gitleaks)
total=$SECONDS
for w in "${want[@]}"; do
  case "$w" in
    k8s) build_k8s ;;
    node) build_node ;;
    crds) build_crds ;;
    envoygateway) build_envoygateway ;;
    *)
      found=0
      for t in "${TOOLS[@]}"; do
        read -r name version pkg <<<"$t"
        if [[ "$name" == "$w" ]]; then build_tool "$name" "$version" "$pkg"; found=1; fi
      done
      for t in "${MODULE_TOOLS[@]}"; do
        read -r -a f <<<"$t"
        if [[ "${f[0]}" == "$w" ]]; then build_module "${f[@]}"; found=1; fi
      done
      ((found)) || {
        log "unknown tool '$w' (known: k8s crds helm opa conftest regal cosign crane registry gitleaks spire spirecm openbao istio envoygateway node coredns shopapp kyverno)"
        exit 2
      }
      ;;
  esac
done
log "toolchain ready in $bin ($((SECONDS - total)) s)"
