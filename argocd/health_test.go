// Runs health.lua the way Argo CD runs resource health scripts (gopher-lua, the object as the
// global `obj`) on every sample in health_test.yaml.
package argocd

import (
	"os"
	"testing"

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
			l := lua.NewState(lua.Options{SkipOpenLibs: false})
			defer l.Close()
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
