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
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"sigs.k8s.io/yaml"

	"istio.io/api/label"
	"istio.io/istio/pilot/pkg/model"
	"istio.io/istio/pilot/test/xds"
	"istio.io/istio/pkg/config/schema/gvr"
	kubelib "istio.io/istio/pkg/kube"
	"istio.io/istio/pkg/kube/kclient/clienttest"
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
			if strings.Contains(strings.SplitN(head.APIVersion, "/", 2)[0], "istio.io") {
				istio = append(istio, doc)
			} else {
				kube = append(kube, doc)
			}
		}
	}
	return istio, kube, nil
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

func main() {
	gwName := flag.String("gateway", "inference-gateway", "name of the Gateway (gateway.networking.k8s.io) whose Envoy config to print")
	gwNamespace := flag.String("namespace", "default", "the Gateway's namespace")
	podIP := flag.String("pod-ip", "10.0.0.100", "IP of the synthesized gateway Pod")
	flag.Parse()
	if flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: istiogen [-gateway NAME] [-namespace NS] FILE... (- for stdin)")
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
	if out.Listeners, err = toJSON(lm); err == nil {
		if out.Clusters, err = toJSON(cm); err == nil {
			out.Routes, err = toJSON(rm)
		}
	}
	if err != nil {
		t.Fatal("marshal:", err)
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetIndent("", "  ")
	if err := enc.Encode(out); err != nil {
		t.Fatal(err)
	}
	_, _ = os.Stdout.Write(buf.Bytes())
	for i := len(t.cleanups) - 1; i >= 0; i-- {
		t.cleanups[i]()
	}
}
