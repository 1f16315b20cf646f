// render: the part of `helm template` the chart's tests need, for machines without Helm (Debian 12 has
// no package of it). It follows Helm 3's engine: Go's text/template with sprig's functions (less env and
// expandenv) plus Helm's include, tpl, required, toYaml, fromYaml, toJson, fromJson and lookup (empty, as
// `helm template` has no cluster, unless -cluster FILE gives the objects an install or upgrade would find:
// a YAML stream, looked up by apiVersion, kind, namespace and name as Helm's lookup does); values are read as Helm reads them (YAML through JSON: numbers are
// float64) and merged over values.yaml as Helm coalesces them (maps merge, null deletes a key); every
// template not starting with "_" is rendered with missingkey=zero and "<no value>" removed; .Files reads
// the chart's files (following symlinks, as `helm package` does) with Get, Glob, AsConfig and Lines.
//
// Usage: render -chart DIR -name RELEASE -namespace NS [-kube-version v1.31.0] [-cluster objects.yaml] [-f values.yaml]...
// Prints the manifests as `helm template` does: "---\n# Source: CHART/templates/FILE\n" + the text.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	yaml "gopkg.in/yaml.v2"
)

type valueFiles []string

func (v *valueFiles) String() string     { return strings.Join(*v, ",") }
func (v *valueFiles) Set(s string) error { *v = append(*v, s); return nil }

// fromYAMLText reads YAML the way sigs.k8s.io/yaml does for Helm: YAML -> JSON -> Go values.
func fromYAMLText(text []byte) (map[string]interface{}, error) {
	var raw interface{}
	if err := yaml.Unmarshal(text, &raw); err != nil {
		return nil, err
	}
	encoded, err := json.Marshal(jsonable(raw))
	if err != nil {
		return nil, err
	}
	out := map[string]interface{}{}
	if string(encoded) == "null" {
		return out, nil
	}
	if err := json.Unmarshal(encoded, &out); err != nil {
		return nil, err
	}
	return out, nil
}

func jsonable(v interface{}) interface{} {
	switch t := v.(type) {
	case map[interface{}]interface{}:
		m := map[string]interface{}{}
		for k, val := range t {
			m[fmt.Sprint(k)] = jsonable(val)
		}
		return m
	case []interface{}:
		for i := range t {
			t[i] = jsonable(t[i])
		}
	}
	return v
}

// toYAML is sigs.k8s.io/yaml.Marshal: JSON first, then YAML of the JSON.
func toYAML(v interface{}) string {
	encoded, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	var obj interface{}
	if err := yaml.Unmarshal(encoded, &obj); err != nil {
		return ""
	}
	out, err := yaml.Marshal(obj)
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(string(out), "\n")
}

// coalesce merges over onto base as Helm merges user values onto the chart's defaults.
func coalesce(base, over map[string]interface{}) map[string]interface{} {
	out := map[string]interface{}{}
	for k, v := range base {
		out[k] = v
	}
	for k, v := range over {
		if v == nil {
			delete(out, k)
			continue
		}
		overMap, isMap := v.(map[string]interface{})
		baseMap, baseIsMap := out[k].(map[string]interface{})
		if isMap && baseIsMap {
			out[k] = coalesce(baseMap, overMap)
		} else {
			out[k] = v
		}
	}
	return out
}

type files map[string][]byte

func (f files) Get(name string) string { return string(f[name]) }

func (f files) Glob(pattern string) files {
	expr := regexp.QuoteMeta(pattern)
	expr = strings.ReplaceAll(expr, `\*\*`, "\x00")
	expr = strings.ReplaceAll(expr, `\*`, `[^/]*`)
	expr = strings.ReplaceAll(expr, `\?`, `[^/]`)
	expr = strings.ReplaceAll(expr, "\x00", `.*`)
	re := regexp.MustCompile("^" + expr + "$")
	out := files{}
	for name, data := range f {
		if re.MatchString(name) {
			out[name] = data
		}
	}
	return out
}

func (f files) AsConfig() string {
	m := map[string]string{}
	for name, data := range f {
		m[path.Base(name)] = string(data)
	}
	return toYAML(m)
}

func (f files) Lines(name string) []string {
	return strings.Split(strings.TrimSuffix(string(f[name]), "\n"), "\n")
}

func readChartFiles(dir string) (files, map[string]string, error) {
	out := files{}
	templates := map[string]string{}
	var walk func(real, rel string) error
	walk = func(real, rel string) error {
		entries, err := os.ReadDir(real)
		if err != nil {
			return err
		}
		for _, e := range entries {
			full := filepath.Join(real, e.Name())
			name := path.Join(rel, e.Name())
			info, err := os.Stat(full) // follows symlinks
			if err != nil {
				return err
			}
			if info.IsDir() {
				if err := walk(full, name); err != nil {
					return err
				}
				continue
			}
			data, err := os.ReadFile(full)
			if err != nil {
				return err
			}
			if strings.HasPrefix(name, "templates/") {
				templates[name] = string(data)
			} else {
				out[name] = data
			}
		}
		return nil
	}
	return out, templates, walk(dir, "")
}

// notesOnly: render templates/NOTES.txt alone, as text (Helm prints it after an install), not the manifests.
var notesOnly bool

func main() {
	chartDir := flag.String("chart", "", "chart directory")
	release := flag.String("name", "flowscope", "release name")
	namespace := flag.String("namespace", "default", "release namespace")
	kubeVersion := flag.String("kube-version", "v1.31.0", "Kubernetes version for .Capabilities")
	apiVersions := flag.String("api-versions", "", "comma-separated extra API versions for .Capabilities")
	clusterFile := flag.String("cluster", "", "YAML stream of the objects lookup finds (default: none)")
	flag.BoolVar(&notesOnly, "notes", false, "print the rendered NOTES.txt (what `helm install` shows) instead")
	var extra valueFiles
	flag.Var(&extra, "f", "values file (repeatable; later ones win)")
	flag.Parse()
	cluster, err := readCluster(*clusterFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, "render:", err)
		os.Exit(1)
	}
	if err := run(*chartDir, *release, *namespace, *kubeVersion, *apiVersions, extra, cluster); err != nil {
		fmt.Fprintln(os.Stderr, "render:", err)
		os.Exit(1)
	}
}

// readCluster reads the objects of a YAML stream (documents separated by "---" lines) as Helm's lookup
// returns them: maps of JSON values.
func readCluster(name string) ([]map[string]interface{}, error) {
	if name == "" {
		return nil, nil
	}
	text, err := os.ReadFile(name)
	if err != nil {
		return nil, err
	}
	var out []map[string]interface{}
	for _, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(string(text), -1) {
		obj, err := fromYAMLText([]byte(doc))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		if len(obj) > 0 {
			out = append(out, obj)
		}
	}
	return out, nil
}

// lookup is Helm's: the object of that apiVersion, kind, namespace ("" for cluster-scoped objects) and name,
// or an empty map; with an empty name, a list of every such object ({"items": [...]}).
func lookup(cluster []map[string]interface{}, apiVersion, kind, namespace, name string) map[string]interface{} {
	var items []interface{}
	for _, obj := range cluster {
		metadata, _ := obj["metadata"].(map[string]interface{})
		if obj["apiVersion"] != apiVersion || obj["kind"] != kind {
			continue
		}
		if namespace != "" && fmt.Sprint(metadata["namespace"]) != namespace {
			continue
		}
		if name == "" {
			items = append(items, obj)
		} else if fmt.Sprint(metadata["name"]) == name {
			return obj
		}
	}
	if name == "" {
		return map[string]interface{}{"apiVersion": apiVersion, "kind": kind + "List", "items": items}
	}
	return map[string]interface{}{}
}

type apiSet []string

func (a apiSet) Has(v string) bool {
	for _, x := range a {
		if x == v {
			return true
		}
	}
	return false
}

func run(
	chartDir, release, namespace, kubeVersion, apiVersions string, valueFiles []string, cluster []map[string]interface{},
) error {
	chartFiles, templates, err := readChartFiles(chartDir)
	if err != nil {
		return err
	}
	chartMeta, err := fromYAMLText(chartFiles["Chart.yaml"])
	if err != nil {
		return fmt.Errorf("Chart.yaml: %w", err)
	}
	chart := map[string]interface{}{}
	for k, v := range chartMeta {
		chart[strings.ToUpper(k[:1])+k[1:]] = v
	}
	chartName := fmt.Sprint(chart["Name"])
	values, err := fromYAMLText(chartFiles["values.yaml"])
	if err != nil {
		return fmt.Errorf("values.yaml: %w", err)
	}
	for _, name := range valueFiles {
		text, err := os.ReadFile(name)
		if err != nil {
			return err
		}
		over, err := fromYAMLText(text)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		values = coalesce(values, over)
	}
	delete(chartFiles, "Chart.yaml")
	delete(chartFiles, "values.yaml")
	versions := apiSet{"v1", "apps/v1", "batch/v1", "rbac.authorization.k8s.io/v1", "policy/v1"}
	if apiVersions != "" {
		versions = append(versions, strings.Split(apiVersions, ",")...)
	}
	major, minor := "1", "31"
	if parts := strings.Split(strings.TrimPrefix(kubeVersion, "v"), "."); len(parts) >= 2 {
		major, minor = parts[0], parts[1]
	}
	top := map[string]interface{}{
		"Values":  values,
		"Chart":   chart,
		"Files":   chartFiles,
		"Release": map[string]interface{}{"Name": release, "Namespace": namespace, "Service": "Helm", "IsInstall": true, "IsUpgrade": false, "Revision": 1},
		"Capabilities": map[string]interface{}{
			"KubeVersion": map[string]interface{}{"Version": kubeVersion, "GitVersion": kubeVersion, "Major": major, "Minor": minor},
			"APIVersions": versions,
		},
	}

	root := template.New("gotpl")
	funcs := sprig.TxtFuncMap()
	delete(funcs, "env")
	delete(funcs, "expandenv")
	includedNames := map[string]int{}
	funcs["include"] = func(name string, data interface{}) (string, error) {
		if includedNames[name] > 1000 {
			return "", fmt.Errorf("rendering template has a nested reference name: %s", name)
		}
		includedNames[name]++
		defer func() { includedNames[name]-- }()
		var buf bytes.Buffer
		err := root.ExecuteTemplate(&buf, name, data)
		return buf.String(), err
	}
	funcs["tpl"] = func(text string, data interface{}) (string, error) {
		t, err := root.Clone()
		if err != nil {
			return "", err
		}
		t, err = t.New("tpl").Option("missingkey=zero").Parse(text)
		if err != nil {
			return "", err
		}
		var buf bytes.Buffer
		err = t.Execute(&buf, data)
		return strings.ReplaceAll(buf.String(), "<no value>", ""), err
	}
	funcs["required"] = func(message string, value interface{}) (interface{}, error) {
		if value == nil || value == "" {
			return nil, fmt.Errorf("%s", message)
		}
		return value, nil
	}
	funcs["toYaml"] = toYAML
	funcs["fromYaml"] = func(text string) map[string]interface{} {
		m, err := fromYAMLText([]byte(text))
		if err != nil {
			return map[string]interface{}{"Error": err.Error()}
		}
		return m
	}
	funcs["toJson"] = func(v interface{}) string {
		out, err := json.Marshal(v)
		if err != nil {
			return ""
		}
		return string(out)
	}
	funcs["fromJson"] = func(text string) map[string]interface{} {
		m := map[string]interface{}{}
		if err := json.Unmarshal([]byte(text), &m); err != nil {
			m["Error"] = err.Error()
		}
		return m
	}
	funcs["lookup"] = func(apiVersion, kind, namespace, name string) (map[string]interface{}, error) {
		return lookup(cluster, apiVersion, kind, namespace, name), nil
	}
	root.Funcs(funcs).Option("missingkey=zero")

	names := make([]string, 0, len(templates))
	for name := range templates {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if _, err := root.New(chartName + "/" + name).Parse(templates[name]); err != nil {
			return err
		}
	}
	var out strings.Builder
	for _, name := range names {
		base := path.Base(name)
		if strings.HasPrefix(base, "_") || (base == "NOTES.txt") != notesOnly {
			continue
		}
		full := chartName + "/" + name
		scope := map[string]interface{}{}
		for k, v := range top {
			scope[k] = v
		}
		scope["Template"] = map[string]interface{}{"Name": full, "BasePath": chartName + "/templates"}
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, full, scope); err != nil {
			return err
		}
		text := strings.ReplaceAll(buf.String(), "<no value>", "")
		if strings.TrimSpace(text) == "" {
			continue
		}
		if notesOnly {
			out.WriteString(text)
			continue
		}
		fmt.Fprintf(&out, "---\n# Source: %s\n%s\n", full, strings.TrimRight(text, "\n"))
	}
	fmt.Print(out.String())
	return nil
}
