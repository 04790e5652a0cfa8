// Palisade's Argo CD health check run by Argo CD's own code (github.com/argoproj/argo-cd/v3):
// argocd-cm.yaml is loaded by Argo CD's settings manager exactly as `argocd admin settings
// resource-overrides health --argocd-cm-path` loads it (a clientset that holds the ConfigMap and
// the Argo CD Secret), and every sample in health_test.yaml gets its health from Argo CD's
// resource-health path (the override lookup, then the Lua VM with the libraries Argo CD opens).
package argocd

import (
	"context"
	"os"
	"testing"

	"github.com/argoproj/argo-cd/gitops-engine/v3/pkg/health"
	"github.com/argoproj/argo-cd/v3/pkg/apis/application/v1alpha1"
	"github.com/argoproj/argo-cd/v3/util/lua"
	"github.com/argoproj/argo-cd/v3/util/settings"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/kubernetes/fake"
	"sigs.k8s.io/yaml"
)

var kinds = []string{"AuthPolicy", "RateLimitPolicy", "SecretBinding", "ImagePolicy"}

type expectation struct {
	Tests []struct {
		InputPath    string `json:"inputPath"`
		HealthStatus struct {
			Status  string `json:"status"`
			Message string `json:"message"`
		} `json:"healthStatus"`
	} `json:"tests"`
}

func read(t *testing.T, path string) []byte {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

// The shipped argocd-cm ConfigMap.
func configMap(t *testing.T) *corev1.ConfigMap {
	t.Helper()
	var cm corev1.ConfigMap
	if err := yaml.Unmarshal(read(t, "argocd-cm.yaml"), &cm); err != nil {
		t.Fatal(err)
	}
	return &cm
}

// The resource overrides Argo CD's settings manager reads from `cm`.
func overridesOf(t *testing.T, cm *corev1.ConfigMap) map[string]v1alpha1.ResourceOverride {
	t.Helper()
	secret := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{
		Name:      "argocd-secret",
		Namespace: cm.Namespace,
		Labels:    map[string]string{"app.kubernetes.io/part-of": "argocd"},
	}}
	mgr := settings.NewSettingsManager(context.Background(), fake.NewClientset(cm, secret), cm.Namespace)
	overrides, err := mgr.GetResourceOverrides()
	if err != nil {
		t.Fatalf("Argo CD does not load the ConfigMap: %v", err)
	}
	return overrides
}

// The health Argo CD gives the object in `path` under `overrides`.
func healthOf(t *testing.T, overrides map[string]v1alpha1.ResourceOverride, path string) *health.HealthStatus {
	t.Helper()
	var obj unstructured.Unstructured
	if err := yaml.Unmarshal(read(t, path), &obj.Object); err != nil {
		t.Fatal(err)
	}
	hs, err := health.GetResourceHealth(&obj, lua.ResourceHealthOverrides(overrides))
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	if hs == nil {
		t.Fatalf("%s: Argo CD finds no health check for %s", path, obj.GroupVersionKind())
	}
	return hs
}

func samples(t *testing.T) expectation {
	t.Helper()
	var exp expectation
	if err := yaml.Unmarshal(read(t, "health_test.yaml"), &exp); err != nil {
		t.Fatal(err)
	}
	if len(exp.Tests) == 0 {
		t.Fatal("no samples")
	}
	return exp
}

// Every sample, with the shipped ConfigMap, gets the health and message it expects.
func TestHealth(t *testing.T) {
	overrides := overridesOf(t, configMap(t))
	for _, tc := range samples(t).Tests {
		t.Run(tc.InputPath, func(t *testing.T) {
			hs := healthOf(t, overrides, tc.InputPath)
			if string(hs.Status) != tc.HealthStatus.Status || hs.Message != tc.HealthStatus.Message {
				t.Errorf("got %s %q, want %s %q", hs.Status, hs.Message, tc.HealthStatus.Status, tc.HealthStatus.Message)
			}
		})
	}
}

// The ConfigMap's keys are keys the API server accepts (its own validation), the script in it
// is health.lua, and Argo CD resolves it for each of the four kinds (the block form's
// `palisade.dev/*` glob).
func TestConfigMap(t *testing.T) {
	cm := configMap(t)
	for k := range cm.Data {
		if errs := validation.IsConfigMapKey(k); len(errs) > 0 {
			t.Errorf("%q is not a valid ConfigMap key: %v", k, errs)
		}
	}
	script := string(read(t, "health.lua"))
	vm := lua.VM{ResourceOverrides: overridesOf(t, cm)}
	for _, kind := range kinds {
		obj := &unstructured.Unstructured{}
		obj.SetAPIVersion("palisade.dev/v1alpha1")
		obj.SetKind(kind)
		found, _, err := vm.GetHealthScript(obj)
		if err != nil {
			t.Fatal(err)
		}
		if found != script {
			t.Errorf("Argo CD's health script for %s is not health.lua", kind)
		}
	}
	// The split-key form cannot take the wildcard: `*` is not a ConfigMap key character.
	if len(validation.IsConfigMapKey("resource.customizations.health.palisade.dev_*")) == 0 {
		t.Error("the API server's key validation accepts `*`")
	}
}

// The per-kind split keys (`resource.customizations.health.palisade.dev_<Kind>`, the form
// Argo CD's documentation shows first) work as well: Argo CD loads them and gives every sample
// the same health.
func TestSplitKeys(t *testing.T) {
	script := string(read(t, "health.lua"))
	cm := configMap(t)
	cm.Data = map[string]string{}
	for _, kind := range kinds {
		cm.Data["resource.customizations.health.palisade.dev_"+kind] = script
	}
	overrides := overridesOf(t, cm)
	for _, tc := range samples(t).Tests {
		hs := healthOf(t, overrides, tc.InputPath)
		if string(hs.Status) != tc.HealthStatus.Status || hs.Message != tc.HealthStatus.Message {
			t.Errorf("%s: got %s %q, want %s %q", tc.InputPath, hs.Status, hs.Message, tc.HealthStatus.Status, tc.HealthStatus.Message)
		}
	}
	// Without any key, Argo CD has no health check for the kinds: the tests above are not
	// passing on a default.
	cm.Data = map[string]string{}
	var obj unstructured.Unstructured
	if err := yaml.Unmarshal(read(t, samples(t).Tests[0].InputPath), &obj.Object); err != nil {
		t.Fatal(err)
	}
	hs, err := health.GetResourceHealth(&obj, lua.ResourceHealthOverrides(overridesOf(t, cm)))
	if err != nil {
		t.Fatal(err)
	}
	if hs != nil {
		t.Errorf("a health (%s) without Palisade's check", hs.Status)
	}
}
