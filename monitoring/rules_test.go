// Package monitoring checks the chart's PrometheusRule with Prometheus's own code: the rule
// groups parse and validate as Prometheus loads them (what `promtool check rules` does), and
// alerts fire, and stay quiet, on series loaded into Prometheus's test storage and evaluated by
// its PromQL engine and alerting-rule state machine (what `promtool test rules` does).
package monitoring

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql"
	"github.com/prometheus/prometheus/promql/parser"
	"github.com/prometheus/prometheus/promql/promqltest"
	"github.com/prometheus/prometheus/rules"
	"go.yaml.in/yaml/v3"
)

// The chart's PrometheusRule, rendered by helm (HELM, or helm on PATH) for release `palisade`
// in `palisade-system`; its rule groups as Prometheus reads a rule file.
func ruleGroups(t *testing.T) []byte {
	t.Helper()
	helm := os.Getenv("HELM")
	if helm == "" {
		helm = "helm"
	}
	chart, err := filepath.Abs("../charts/palisade")
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(helm, "template", "palisade", chart, "-n", "palisade-system",
		"--kube-version", "1.36.3", "--set", "metrics.prometheusRule.enabled=true",
		"--show-only", "templates/prometheusrule.yaml").Output()
	if err != nil {
		t.Fatalf("helm template: %v", err)
	}
	var doc struct {
		Spec yaml.Node `yaml:"spec"`
	}
	if err := yaml.Unmarshal(out, &doc); err != nil {
		t.Fatal(err)
	}
	spec, err := yaml.Marshal(&doc.Spec)
	if err != nil {
		t.Fatal(err)
	}
	return spec
}

func parse(content []byte) (*rulefmt.RuleGroups, []error) {
	return rulefmt.Parse(content, false, model.UTF8Validation, parser.NewParser(parser.Options{}), slog.New(slog.DiscardHandler))
}

func TestRulesLoadAsPrometheusLoadsThem(t *testing.T) {
	groups, errs := parse(ruleGroups(t))
	if len(errs) > 0 {
		t.Fatalf("the PrometheusRule does not load: %v", errs)
	}
	alerts := 0
	for _, g := range groups.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" {
				continue
			}
			alerts++
			if r.Labels["severity"] == "" || !strings.HasPrefix(r.Annotations["runbook"], "docs/operations.md#") {
				t.Errorf("%s: no severity or runbook", r.Alert)
			}
		}
	}
	if alerts != 9 {
		t.Fatalf("%d alerts, want 9", alerts)
	}
	// The checker itself refuses what Prometheus would: a broken expression, a bad duration.
	for _, bad := range []string{
		"groups: [{name: g, rules: [{alert: A, expr: 'sum(up'}]}]",
		"groups: [{name: g, rules: [{alert: A, expr: up, for: 5x}]}]",
	} {
		if _, errs := parse([]byte(bad)); len(errs) == 0 {
			t.Errorf("%q loaded", bad)
		}
	}
	t.Logf("%d alerts load as Prometheus loads them", alerts)
}

// alertRule is the chart's alert `name`, ready to evaluate.
func alertRule(t *testing.T, name string) *rules.AlertingRule {
	t.Helper()
	groups, errs := parse(ruleGroups(t))
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	for _, g := range groups.Groups {
		for _, r := range g.Rules {
			if r.Alert != name {
				continue
			}
			expr, err := parser.NewParser(parser.Options{}).ParseExpr(r.Expr)
			if err != nil {
				t.Fatal(err)
			}
			return rules.NewAlertingRule(r.Alert, expr, time.Duration(r.For), time.Duration(r.KeepFiringFor),
				labels.FromMap(r.Labels), labels.FromMap(r.Annotations), labels.EmptyLabels(), "", false,
				slog.New(slog.DiscardHandler))
		}
	}
	t.Fatalf("no alert %s", name)
	return nil
}

// firing evaluates `rule` every minute over `load` (promqltest's series notation, from time 0)
// and returns, per minute, whether it fires.
func firing(t *testing.T, rule *rules.AlertingRule, load string, minutes int) []bool {
	t.Helper()
	storage := promqltest.LoadedStorage(t, "load 1m\n"+load)
	engine := promql.NewEngine(promql.EngineOpts{MaxSamples: 100000, Timeout: 10 * time.Second})
	query := rules.EngineQueryFunc(engine, storage)
	out := make([]bool, 0, minutes+1)
	for m := 0; m <= minutes; m++ {
		at := time.Unix(0, 0).Add(time.Duration(m) * time.Minute)
		if _, err := rule.Eval(context.Background(), 0, at, query, nil, 0); err != nil {
			t.Fatal(err)
		}
		// As the rule group does after each evaluation.
		rule.SetEvaluationTimestamp(at)
		out = append(out, rule.State() == rules.StateFiring)
	}
	return out
}

func TestWebhookDownFiresAfterTwoMinutesDown(t *testing.T) {
	rule := alertRule(t, "PalisadeWebhookDown")
	// Up for 3 minutes, then down.
	got := firing(t, rule, `  up{namespace="palisade-system", service="palisade-webhook"} 1 1 1 0 0 0 0 0`, 7)
	want := []bool{false, false, false, false, false, true, true, true}
	for m := range want {
		if got[m] != want[m] {
			t.Fatalf("minute %d: firing %v, want %v (all: %v)", m, got[m], want[m], got)
		}
	}
	// One replica of two down: not down.
	rule = alertRule(t, "PalisadeWebhookDown")
	got = firing(t, rule, "  up{namespace=\"palisade-system\", service=\"palisade-webhook\", pod=\"a\"} 1 1 1 1 1 1\n"+
		"  up{namespace=\"palisade-system\", service=\"palisade-webhook\", pod=\"b\"} 1 0 0 0 0 0", 5)
	for m, f := range got {
		if f {
			t.Fatalf("minute %d: fired with one replica up", m)
		}
	}
}

func TestPoliciesNotReadyFiresOnlyForNotReadyOnes(t *testing.T) {
	rule := alertRule(t, "PalisadePoliciesNotReady")
	ready := `  palisade_operator_policies{namespace="palisade-system", kind="AuthPolicy", ready="true"} 5x30` + "\n" +
		`  palisade_operator_policies{namespace="palisade-system", kind="AuthPolicy", ready="false"} 0x30`
	for m, f := range firing(t, rule, ready, 30) {
		if f {
			t.Fatalf("minute %d: fired with every policy Ready", m)
		}
	}
	rule = alertRule(t, "PalisadePoliciesNotReady")
	notReady := `  palisade_operator_policies{namespace="palisade-system", kind="AuthPolicy", ready="false"} 0 0 2x30`
	got := firing(t, rule, notReady, 30)
	if !got[30] {
		t.Fatalf("two AuthPolicies not Ready for 28 minutes, and no alert: %v", got)
	}
	if got[2] {
		t.Fatalf("fired at once, before its `for`: %v", got)
	}
}
