// Command istiogen runs Istio's own xDS generation (pilot, as istiod runs it) over a set of
// Kubernetes objects and prints what the gateway's Envoy would receive: its listeners,
// clusters and route configurations, as Envoy JSON.
//
// It exists so that bbr's tests can check what Istio really makes of the chart's objects
// (EnvoyFilter, DestinationRule, ...) next to a Gateway, HTTPRoutes and InferencePools,
// and then run that configuration in a real Envoy. It drives pilot through the
// in-process discovery server that Istio's own tests use (pilot/test/xds), so nothing of
// the translation is re-implemented here.
//
// Usage:
//
//	istiogen -gateway NAME -namespace NS FILE...   (FILE "-" reads standard input)
//
// Pilot reads its feature flags from the environment, as istiod does: for example
// ENABLE_GATEWAY_API_INFERENCE_EXTENSION=true (InferencePool support) or
// PILOT_FILTER_GATEWAY_CLUSTER_CONFIG=true.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"istio.io/api/label"
	"istio.io/istio/pilot/pkg/model"
	"istio.io/istio/pilot/test/xds"
	"istio.io/istio/pkg/config/schema/gvk"
	"istio.io/istio/pkg/config/schema/gvr"
	kubelib "istio.io/istio/pkg/kube"
	"istio.io/istio/pkg/kube/kclient/clienttest"
	istiolog "istio.io/istio/pkg/log"
)

// failer is the test.Failer pilot's fake server wants, for a plain program: a failure
// ends the process with the message on stderr.
type failer struct{ cleanups []func() }

func (f *failer) Fail()    { f.FailNow() }
func (f *failer) FailNow() { f.Fatal("failed") }
func (f *failer) Fatal(args ...any) {
	fmt.Fprintln(os.Stderr, append([]any{"istiogen:"}, args...)...)
	os.Exit(1)
}
func (f *failer) Fatalf(s string, a ...any) { f.Fatal(fmt.Sprintf(s, a...)) }
func (f *failer) Log(args ...any)           { fmt.Fprintln(os.Stderr, args...) }
func (f *failer) Logf(s string, a ...any)   { fmt.Fprintf(os.Stderr, s+"\n", a...) }
func (f *failer) TempDir() string {
	d, err := os.MkdirTemp("", "istiogen")
	if err != nil {
		f.Fatal(err)
	}
	return d
}
func (f *failer) Helper()           {}
func (f *failer) Cleanup(fn func()) { f.cleanups = append(f.cleanups, fn) }
func (f *failer) Skip(args ...any)  { f.Fatal(append([]any{"skip:"}, args...)...) }

var docSeparator = regexp.MustCompile(`(?m)^---[ \t]*$`)

// split returns the YAML documents of the inputs, Istio's own kinds (networking.istio.io,
// security.istio.io, ...: pilot's config store) apart from the Kubernetes ones (Services,
// Pods, Gateway API, InferencePools: pilot's Kubernetes informers).
func split(inputs [][]byte) (istio, kube []string, err error) {
	for _, in := range inputs {
		for _, doc := range docSeparator.Split(string(in), -1) {
			var head struct {
				APIVersion string `json:"apiVersion"`
				Kind       string `json:"kind"`
			}
			if err := yaml.Unmarshal([]byte(doc), &head); err != nil {
				return nil, nil, fmt.Errorf("not YAML: %v", err)
			}
			if head.Kind == "" {
				continue // comments only
			}
			if head.Kind == "HTTPRoute" {
				if doc, err = acceptedByIstio(doc); err != nil {
					return nil, nil, err
				}
			}
			if strings.Contains(strings.SplitN(head.APIVersion, "/", 2)[0], "istio.io") {
				istio = append(istio, doc)
			} else {
				kube = append(kube, doc)
			}
		}
	}
	return istio, kube, nil
}

// acceptedByIstio gives an HTTPRoute the status istiod writes once its Gateways accepted
// it (a parent per Gateway parentRef, controller istio.io/gateway-controller, Accepted and
// ResolvedRefs true). Istio attaches an InferencePool to a Gateway only through that
// status (findGatewayParents); pilot's fake Kubernetes client cannot run istiod's status
// writer faithfully (its status updates replace the whole object), so the status a
// cluster would hold is given here.
func acceptedByIstio(doc string) (string, error) {
	var route map[string]any
	if err := yaml.Unmarshal([]byte(doc), &route); err != nil {
		return "", err
	}
	spec, _ := route["spec"].(map[string]any)
	refs, _ := spec["parentRefs"].([]any)
	var parents []any
	for _, r := range refs {
		ref, _ := r.(map[string]any)
		if kind, ok := ref["kind"]; ok && kind != "Gateway" {
			continue
		}
		conditions := []any{}
		for _, c := range []string{"Accepted", "ResolvedRefs"} {
			conditions = append(conditions, map[string]any{
				"type": c, "status": "True", "reason": c, "message": "",
				"lastTransitionTime": "2026-01-01T00:00:00Z",
			})
		}
		parents = append(parents, map[string]any{
			"parentRef":      ref,
			"controllerName": "istio.io/gateway-controller",
			"conditions":     conditions,
		})
	}
	route["status"] = map[string]any{"parents": parents}
	out, err := yaml.Marshal(route)
	return string(out), err
}

// gatewayWorkload is what Istio's gateway deployment controller creates for a managed
// Gateway: its Service (NAME-istio) and one running gateway Pod, which the proxy below is.
func gatewayWorkload(name, ns, ip string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Service
metadata: {name: %[1]s-istio, namespace: %[2]s, labels: {gateway.networking.k8s.io/gateway-name: %[1]s}}
spec:
  selector: {gateway.networking.k8s.io/gateway-name: %[1]s}
  ports: [{name: http, port: 80, targetPort: 80, protocol: TCP}]
---
apiVersion: v1
kind: Pod
metadata:
  name: %[1]s-istio-0
  namespace: %[2]s
  labels: {gateway.networking.k8s.io/gateway-name: %[1]s, gateway.istio.io/managed: istio.io-gateway-controller}
spec: {containers: [{name: istio-proxy, image: proxyv2}]}
status: {phase: Running, podIP: %[3]s, podIPs: [{ip: %[3]s}], conditions: [{type: Ready, status: "True"}]}
`, name, ns, ip)
}

func readInputs(paths []string) ([][]byte, error) {
	var out [][]byte
	for _, p := range paths {
		var b []byte
		var err error
		if p == "-" {
			b, err = io.ReadAll(os.Stdin)
		} else {
			b, err = os.ReadFile(p)
		}
		if err != nil {
			return nil, err
		}
		out = append(out, b)
	}
	return out, nil
}

func toJSON(msgs []proto.Message) ([]json.RawMessage, error) {
	m := protojson.MarshalOptions{UseProtoNames: true}
	out := make([]json.RawMessage, 0, len(msgs))
	for _, msg := range msgs {
		b, err := m.Marshal(msg)
		if err != nil {
			return nil, err
		}
		out = append(out, b)
	}
	return out, nil
}

// generate returns the proxy's listeners, clusters and routes as one JSON document.
func generate(s *xds.FakeDiscoveryServer, proxy *model.Proxy) ([]byte, error) {
	listeners := s.Listeners(proxy)
	clusters := s.Clusters(proxy)
	routes := s.RoutesFromListeners(proxy, listeners)
	var out struct {
		Listeners []json.RawMessage `json:"listeners"`
		Clusters  []json.RawMessage `json:"clusters"`
		Routes    []json.RawMessage `json:"routes"`
	}
	lm := make([]proto.Message, 0, len(listeners))
	for _, l := range listeners {
		lm = append(lm, l)
	}
	cm := make([]proto.Message, 0, len(clusters))
	for _, c := range clusters {
		cm = append(cm, c)
	}
	rm := make([]proto.Message, 0, len(routes))
	for _, r := range routes {
		rm = append(rm, r)
	}
	var err error
	if out.Listeners, err = toJSON(lm); err != nil {
		return nil, err
	}
	if out.Clusters, err = toJSON(cm); err != nil {
		return nil, err
	}
	if out.Routes, err = toJSON(rm); err != nil {
		return nil, err
	}
	return json.Marshal(out)
}

// printStatus writes to stderr what Istio reports on the Gateway API objects (their
// status) and the Services in the cluster (InferencePool shadow Services included).
func printStatus(s *xds.FakeDiscoveryServer) {
	ctx := context.Background()
	c := s.KubeClient()
	var objects []any
	if l, err := c.GatewayAPI().GatewayV1().Gateways("").List(ctx, metav1.ListOptions{}); err == nil {
		for _, o := range l.Items {
			objects = append(objects, map[string]any{"gateway": o.Namespace + "/" + o.Name, "status": o.Status})
		}
	}
	if l, err := c.GatewayAPI().GatewayV1().HTTPRoutes("").List(ctx, metav1.ListOptions{}); err == nil {
		for _, o := range l.Items {
			objects = append(objects, map[string]any{"httproute": o.Namespace + "/" + o.Name, "status": o.Status})
		}
	}
	if l, err := c.GatewayAPIInference().InferenceV1().InferencePools("").List(ctx, metav1.ListOptions{}); err == nil {
		for _, o := range l.Items {
			objects = append(objects, map[string]any{"inferencepool": o.Namespace + "/" + o.Name, "status": o.Status})
		}
	}
	if l, err := c.Kube().CoreV1().Services("").List(ctx, metav1.ListOptions{}); err == nil {
		for _, o := range l.Items {
			objects = append(objects, map[string]any{"service": o.Namespace + "/" + o.Name, "labels": o.Labels})
		}
	}
	for _, vs := range s.Discovery.Env.ConfigStore.List(gvk.VirtualService, "") {
		objects = append(objects, map[string]any{"virtualservice": vs.Namespace + "/" + vs.Name, "spec": vs.Spec})
	}
	b, err := yaml.Marshal(objects)
	if err != nil {
		fmt.Fprintln(os.Stderr, "istiogen: status:", err)
		return
	}
	fmt.Fprintf(os.Stderr, "--- status\n%s", b)
}

func main() {
	gwName := flag.String("gateway", "inference-gateway", "name of the Gateway (gateway.networking.k8s.io) whose Envoy config to print")
	gwNamespace := flag.String("namespace", "default", "the Gateway's namespace")
	podIP := flag.String("pod-ip", "10.0.0.100", "IP of the synthesized gateway Pod")
	showStatus := flag.Bool("status", false, "also print, to stderr, the status Istio wrote on the Gateway API objects and the Services it created")
	debug := flag.String("debug", "", "comma-separated pilot log scopes to log at debug level (e.g. gateway,controllers)")
	quiet := flag.Duration("quiet", time.Second, "the generated config must stay unchanged this long before it is printed")
	settle := flag.Duration("timeout", 30*time.Second, "how long to wait for the generated config to settle")
	flag.Parse()
	if flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: istiogen [-gateway NAME] [-namespace NS] FILE... (- for stdin)")
		os.Exit(2)
	}
	// Pilot logs as istiod does, but to stderr: stdout carries only the result.
	logOptions := istiolog.DefaultOptions()
	logOptions.OutputPaths = []string{"stderr"}
	logOptions.ErrorOutputPaths = []string{"stderr"}
	for _, scope := range strings.Split(*debug, ",") {
		if scope != "" {
			logOptions.SetDefaultOutputLevel(scope, istiolog.DebugLevel)
		}
	}
	if err := istiolog.Configure(logOptions); err != nil {
		fmt.Fprintln(os.Stderr, "istiogen: logging:", err)
		os.Exit(2)
	}
	inputs, err := readInputs(flag.Args())
	if err != nil {
		fmt.Fprintln(os.Stderr, "istiogen:", err)
		os.Exit(2)
	}
	istio, kube, err := split(inputs)
	if err != nil {
		fmt.Fprintln(os.Stderr, "istiogen:", err)
		os.Exit(2)
	}
	kube = append(kube, gatewayWorkload(*gwName, *gwNamespace, *podIP))

	t := &failer{}
	s := xds.NewFakeDiscoveryServer(t, xds.FakeOptions{
		ConfigString:           strings.Join(istio, "\n---\n"),
		KubernetesObjectString: strings.Join(kube, "\n---\n"),
		KubeClientModifier: func(c kubelib.Client) {
			// The Inference Extension's CRD, as a cluster with it installed has.
			clienttest.MakeCRD(t, c, gvr.InferencePool)
		},
	})
	proxy := s.SetupProxy(&model.Proxy{
		Type:            model.Router,
		ID:              fmt.Sprintf("%s-istio-0.%s", *gwName, *gwNamespace),
		ConfigNamespace: *gwNamespace,
		IPAddresses:     []string{*podIP},
		Labels: map[string]string{
			label.IoK8sNetworkingGatewayGatewayName.Name: *gwName,
			label.GatewayManaged.Name:                    "istio.io-gateway-controller",
		},
		Metadata: &model.NodeMetadata{
			Namespace: *gwNamespace,
			Labels: map[string]string{
				label.IoK8sNetworkingGatewayGatewayName.Name: *gwName,
				label.GatewayManaged.Name:                    "istio.io-gateway-controller",
			},
		},
	})

	// Istio's controllers work asynchronously (an InferencePool's shadow Service is
	// created, then seen by the registry, then pushed): print once the generated config
	// has stopped changing for a second.
	var out []byte
	deadline := time.Now().Add(*settle)
	stableSince := time.Now()
	for {
		s.EnsureSynced(t)
		proxy = s.SetupProxy(proxy)
		next, err := generate(s, proxy)
		if err != nil {
			t.Fatal("marshal:", err)
		}
		if !bytes.Equal(next, out) {
			if *debug != "" {
				fmt.Fprintf(os.Stderr, "istiogen: generated config changed (%d bytes)\n", len(next))
			}
			out, stableSince = next, time.Now()
		} else if time.Since(stableSince) >= *quiet {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the generated config kept changing for %v", *settle)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if *showStatus {
		printStatus(s)
	}
	var buf bytes.Buffer
	if err := json.Indent(&buf, out, "", "  "); err != nil {
		t.Fatal(err)
	}
	buf.WriteByte('\n')
	_, _ = os.Stdout.Write(buf.Bytes())
	for i := len(t.cleanups) - 1; i >= 0; i-- {
		t.cleanups[i]()
	}
}
