// Runs health.lua the way Argo CD runs resource health scripts (gopher-lua with the base, table
// and package libraries, the object as the global `obj`) on every sample in health_test.yaml.
package argocd

import (
	"os"
	"regexp"
	"testing"

	"github.com/gobwas/glob"
	lua "github.com/yuin/gopher-lua"
	"sigs.k8s.io/yaml"
)

type expectation struct {
	Tests []struct {
		InputPath    string `json:"inputPath"`
		HealthStatus struct {
			Status  string `json:"status"`
			Message string `json:"message"`
		} `json:"healthStatus"`
	} `json:"tests"`
}

func toLua(l *lua.LState, v any) lua.LValue {
	switch v := v.(type) {
	case map[string]any:
		t := l.NewTable()
		for k, e := range v {
			t.RawSetString(k, toLua(l, e))
		}
		return t
	case []any:
		t := l.NewTable()
		for _, e := range v {
			t.Append(toLua(l, e))
		}
		return t
	case string:
		return lua.LString(v)
	case float64:
		return lua.LNumber(v)
	case bool:
		return lua.LBool(v)
	default:
		return lua.LNil
	}
}

func TestHealth(t *testing.T) {
	script, err := os.ReadFile("health.lua")
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile("health_test.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var exp expectation
	if err := yaml.Unmarshal(raw, &exp); err != nil {
		t.Fatal(err)
	}
	if len(exp.Tests) == 0 {
		t.Fatal("no samples")
	}
	for _, tc := range exp.Tests {
		t.Run(tc.InputPath, func(t *testing.T) {
			data, err := os.ReadFile(tc.InputPath)
			if err != nil {
				t.Fatal(err)
			}
			var obj map[string]any
			if err := yaml.Unmarshal(data, &obj); err != nil {
				t.Fatal(err)
			}
			// Only the libraries Argo CD opens for custom health scripts.
			l := lua.NewState(lua.Options{SkipOpenLibs: true})
			defer l.Close()
			for _, lib := range []struct {
				name string
				open lua.LGFunction
			}{{lua.LoadLibName, lua.OpenPackage}, {lua.BaseLibName, lua.OpenBase}, {lua.TabLibName, lua.OpenTable}} {
				l.Push(l.NewFunction(lib.open))
				l.Push(lua.LString(lib.name))
				l.Call(1, 0)
			}
			l.SetGlobal("obj", toLua(l, obj))
			if err := l.DoString(string(script)); err != nil {
				t.Fatal(err)
			}
			hs, ok := l.Get(-1).(*lua.LTable)
			if !ok {
				t.Fatalf("the script returned %v, not a table", l.Get(-1))
			}
			status := hs.RawGetString("status").String()
			message := hs.RawGetString("message").String()
			if status != tc.HealthStatus.Status || message != tc.HealthStatus.Message {
				t.Errorf("got %s %q, want %s %q", status, message, tc.HealthStatus.Status, tc.HealthStatus.Message)
			}
		})
	}
}

// The ConfigMap users merge into argocd-cm: its keys are keys the API server accepts, its
// resource.customizations block parses as Argo CD reads it (group/kind keys, health.lua), and
// Argo CD's lookup — an exact group/kind key, else the first glob (gobwas/glob, no
// separators) that matches — finds health.lua, unchanged, for each of Palisade's kinds.
func TestArgoConfigMap(t *testing.T) {
	raw, err := os.ReadFile("argocd-cm.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var cm struct {
		Data map[string]string `json:"data"`
	}
	if err := yaml.Unmarshal(raw, &cm); err != nil {
		t.Fatal(err)
	}
	validKey := regexp.MustCompile(`^[-._a-zA-Z0-9]+$`)
	for k := range cm.Data {
		if !validKey.MatchString(k) || len(k) > 253 {
			t.Errorf("%q is not a valid ConfigMap key", k)
		}
	}
	var overrides map[string]struct {
		HealthLua string `json:"health.lua"`
	}
	if err := yaml.Unmarshal([]byte(cm.Data["resource.customizations"]), &overrides); err != nil {
		t.Fatal(err)
	}
	script, err := os.ReadFile("health.lua")
	if err != nil {
		t.Fatal(err)
	}
	for _, kind := range []string{"AuthPolicy", "RateLimitPolicy", "SecretBinding", "ImagePolicy"} {
		key := "palisade.dev/" + kind
		found, ok := overrides[key]
		if !ok {
			for pattern, o := range overrides {
				g, err := glob.Compile(pattern)
				if err != nil {
					t.Fatalf("%q: %v", pattern, err)
				}
				if g.Match(key) && o.HealthLua != "" {
					found, ok = o, true
					break
				}
			}
		}
		if !ok {
			t.Errorf("no health check for %s", key)
			continue
		}
		if found.HealthLua != string(script) {
			t.Errorf("the health check for %s is not health.lua", key)
		}
	}
	// The split-key form with a wildcard is not a ConfigMap key at all.
	if validKey.MatchString("resource.customizations.health.palisade.dev_*") {
		t.Error("the key check accepts `*`")
	}
}
