// Command shop-app is the example shop's workload. It serves HTTP as the service SHOP_SERVICE
// (frontend, orders or payments) and, when VAULT_ADDR is set, does what an application using a
// SecretBinding does: it logs in to Vault/OpenBao with its projected ServiceAccount token, reads
// its KV secret and a database credential, and runs a query in PostgreSQL with that credential.
// It repeats this every VAULT_REFRESH_SECONDS (when set) and answers GET /status with the steps
// of the last finished round (a step it did not reach is absent), so a test can read what the
// workload itself obtained. When SPIFFE_ENDPOINT_SOCKET is set, GET /identity fetches the
// workload's X.509-SVID from the SPIFFE Workload API and answers with its SPIFFE ID. GET
// /resolve?name=N looks N up as the pod's resolver does (its resolv.conf: cluster DNS, search
// domains).
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	_ "github.com/lib/pq"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// step is the outcome of one step, as /status reports it.
type step struct {
	OK    bool   `json:"ok"`
	Value string `json:"value,omitempty"`
	Error string `json:"error,omitempty"`
	At    string `json:"at"`
}

type state struct {
	mu      sync.Mutex
	rounds  int
	steps   map[string]step
	current map[string]step
}

// set records the outcome of one step of the round in progress.
func (s *state) set(name string, value string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := step{OK: err == nil, Value: value, At: time.Now().UTC().Format(time.RFC3339Nano)}
	if err != nil {
		st.Error = err.Error()
	}
	s.current[name] = st
	line, _ := json.Marshal(map[string]any{"step": name, "ok": st.OK, "error": st.Error})
	log.Print(string(line))
}

// finish makes the round in progress the one /status reports: a step the round did not reach
// is absent, never left over from an earlier round.
func (s *state) finish() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.steps = s.current
	s.current = map[string]step{}
	s.rounds++
}

func env(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

type vault struct {
	addr   string
	client *http.Client
}

func newVault() (*vault, error) {
	pool := x509.NewCertPool()
	if ca := os.Getenv("VAULT_CACERT"); ca != "" {
		pem, err := os.ReadFile(ca)
		if err != nil {
			return nil, err
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("no certificate in %s", ca)
		}
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}
	return &vault{addr: strings.TrimSuffix(os.Getenv("VAULT_ADDR"), "/"), client: &http.Client{Transport: tr, Timeout: 10 * time.Second}}, nil
}

// call sends a request and decodes the JSON answer; a non-2xx status is an error carrying
// Vault's own error text.
func (v *vault) call(method, path, token string, body any) (map[string]any, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, v.addr+"/v1/"+path, rd)
	if err != nil {
		return nil, err
	}
	if token != "" {
		req.Header.Set("X-Vault-Token", token)
	}
	resp, err := v.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	var out map[string]any
	_ = json.Unmarshal(raw, &out)
	if resp.StatusCode/100 != 2 {
		return nil, fmt.Errorf("%s %s: %d %v", method, path, resp.StatusCode, out["errors"])
	}
	return out, nil
}

func field(m map[string]any, keys ...string) string {
	var cur any = m
	for _, k := range keys {
		next, ok := cur.(map[string]any)
		if !ok {
			return ""
		}
		cur = next[k]
	}
	s, _ := cur.(string)
	return s
}

// round logs in, reads the KV secret and database credentials, and queries PostgreSQL.
func round(v *vault, s *state) {
	jwt, err := os.ReadFile(env("VAULT_TOKEN_PATH", "/var/run/secrets/vault/token"))
	if err != nil {
		s.set("login", "", err)
		return
	}
	login, err := v.call("POST", "auth/kubernetes/login", "", map[string]string{"role": os.Getenv("VAULT_ROLE"), "jwt": strings.TrimSpace(string(jwt))})
	token := field(login, "auth", "client_token")
	if err == nil && token == "" {
		err = fmt.Errorf("login answered without a token")
	}
	s.set("login", os.Getenv("VAULT_ROLE"), err)
	if err != nil {
		return
	}
	if kv := os.Getenv("VAULT_KV"); kv != "" {
		secret, err := v.call("GET", kv, token, nil)
		data, _ := json.Marshal(secret["data"])
		s.set("kv", string(data), err)
	}
	role := os.Getenv("VAULT_DB_ROLE")
	if role == "" {
		return
	}
	creds, err := v.call("GET", "database/creds/"+role, token, nil)
	user, password := field(creds, "data", "username"), field(creds, "data", "password")
	s.set("database-credential", user, err)
	if err != nil {
		return
	}
	host, port, err := net.SplitHostPort(os.Getenv("PG_ADDR"))
	if err != nil {
		s.set("postgres", "", err)
		return
	}
	dsn := fmt.Sprintf("host=%s port=%s user=%s password=%s dbname=%s sslmode=disable connect_timeout=10",
		host, port, user, password, env("PG_DATABASE", "postgres"))
	db, err := sql.Open("postgres", dsn)
	if err != nil {
		s.set("postgres", "", err)
		return
	}
	defer db.Close()
	var who string
	err = db.QueryRow("SELECT current_user").Scan(&who)
	s.set("postgres", who, err)
}

func main() {
	log.SetFlags(0)
	name := env("SHOP_SERVICE", "shop")
	s := &state{steps: map[string]step{}, current: map[string]step{}}
	if os.Getenv("VAULT_ADDR") != "" {
		v, err := newVault()
		if err != nil {
			log.Fatalf("vault client: %v", err)
		}
		refresh, _ := strconv.Atoi(os.Getenv("VAULT_REFRESH_SECONDS"))
		go func() {
			for {
				round(v, s)
				s.finish()
				if refresh <= 0 {
					return
				}
				time.Sleep(time.Duration(refresh) * time.Second)
			}
		}()
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/status", func(w http.ResponseWriter, _ *http.Request) {
		s.mu.Lock()
		defer s.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"service": name, "rounds": s.rounds, "steps": s.steps})
	})
	mux.HandleFunc("/identity", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		socket := os.Getenv("SPIFFE_ENDPOINT_SOCKET")
		if socket == "" {
			w.WriteHeader(http.StatusNotFound)
			_ = json.NewEncoder(w).Encode(map[string]string{"error": "SPIFFE_ENDPOINT_SOCKET is not set"})
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		svid, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr(socket))
		if err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			_ = json.NewEncoder(w).Encode(map[string]string{"error": err.Error()})
			return
		}
		_ = json.NewEncoder(w).Encode(map[string]string{
			"spiffeID": svid.ID.String(),
			"notAfter": svid.Certificates[0].NotAfter.UTC().Format(time.RFC3339),
		})
	})
	mux.HandleFunc("/resolve", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		name := r.URL.Query().Get("name")
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		addrs, err := net.DefaultResolver.LookupHost(ctx, name)
		out := map[string]any{"name": name, "addresses": addrs}
		if err != nil {
			out["error"] = err.Error()
		}
		_ = json.NewEncoder(w).Encode(out)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]string{"service": name})
	})
	addr := env("LISTEN", ":8080")
	log.Printf(`{"service":%q,"listen":%q}`, name, addr)
	srv := &http.Server{Addr: addr, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	log.Fatal(srv.ListenAndServe())
}
