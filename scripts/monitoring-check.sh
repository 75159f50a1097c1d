#!/usr/bin/env bash
# `just monitoring-check`: the monitoring component (manifests/monitoring), offline.
# - renders it with kustomize on manifests/base, every overlay and every example
#   (kubectl from scripts/kubectl.sh);
# - takes the rendered PrometheusRule's `spec` as a plain rule file: `promtool
#   check rules` on it, `promtool test rules` with manifests/monitoring/rules.test.yaml
#   (annotations left out there: promtool compares them word for word);
# - every alert has a severity, a summary, a description and a runbook, and is
#   both fired and not fired by the tests;
# - every metric name in the rules, in the tests' input series and in the
#   dashboard's queries is one the binaries export (read from the Rust sources'
#   registrations, with the names prometheus-client gives each type) or one of
#   the EXTERNAL ones below;
# - the objects fit together: the monitors' job labels are the rules', their
#   ports the Service's and the sidecar's, the webhook name kube-apiserver
#   reports is the MutatingWebhookConfiguration's, the dashboard's ConfigMap
#   carries grafana_dashboard: "1".
# One line per check; the last line says passed or FAILED; exits non-zero on a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "monitoring-check: $*" >&2; }

command -v promtool >/dev/null 2>&1 || {
    say "FAILED: no promtool (Debian: apt-get install prometheus; \`just deps\` does it)"
    exit 1
}
source scripts/kubectl.sh

out=target/monitoring-check
rm -rf "$out"
mkdir -p "$out"
renders=()
for base in manifests/base manifests/overlays/*/ manifests/examples/*/; do
    base=${base%/}
    dir=$out/render-$(echo "${base#manifests/}" | tr '/' '_')
    mkdir -p "$dir"
    cat >"$dir/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../../$base
components:
  - ../../../manifests/monitoring
EOF
    if ! "$kubectl" kustomize "$dir" >"$dir/rendered.yaml"; then
        say "FAILED: kustomize cannot render $base with the monitoring component"
        exit 1
    fi
    renders+=("$dir/rendered.yaml")
done

python=python3
if ! python3 -c 'import yaml' >/dev/null 2>&1; then
    "$venv/bin/python" -c 'import yaml' >/dev/null 2>&1 || venv_install PyYAML || {
        say "FAILED: no PyYAML for python3 (Debian: apt-get install python3-yaml)"
        exit 1
    }
    python=$venv/bin/python
fi

"$python" - "$out" manifests/monitoring/rules.test.yaml manifests/monitoring/dashboard.json "${renders[@]}" <<'PY'
"""Checks the rendered monitoring component; runs promtool on its rules."""
import json
import os
import pathlib
import re
import subprocess
import sys

import yaml

# Metrics the alerts and the dashboard read from other exporters.
EXTERNAL = {
    "up": "Prometheus, per target",
    "apiserver_admission_webhook_fail_open_count": "kube-apiserver (Kubernetes >= 1.24)",
    "kube_pod_container_status_restarts_total": "kube-state-metrics",
    "kube_pod_init_container_status_restarts_total": "kube-state-metrics (--sidecar-mode native)",
    "container_memory_working_set_bytes": "cAdvisor (kubelet)",
}
SOURCES = ["webhook/src", "sidecar/src"]
SEVERITIES = {"critical", "warning"}
ANNOTATIONS = ("summary", "description", "runbook")
WEBHOOK_JOB, SIDECAR_JOB = "snapshot-webhook", "snapshot-sidecar"

failed = passed = 0


def report(ok, what, detail=""):
    global failed, passed
    if ok:
        passed += 1
        print(f"ok   {what}" + (f": {detail}" if detail else ""))
    else:
        failed += 1
        print(f"FAIL {what}: {detail}")


# --- the metric names the binaries export, from their sources -----------------
REGISTER = re.compile(
    r'\.register\(\s*"(?P<name>[^"]+)"\s*,\s*"(?:[^"\\]|\\.)*"\s*,\s*(?P<arg>[^;]*?)\s*,?\s*\)\s*;', re.S)
PREFIX = re.compile(r'Registry::with_prefix\(\s*"([^"]+)"\s*\)')
KINDS = (("Histogram", ("_bucket", "_sum", "_count")), ("Gauge", ("",)), ("Counter", ("_total",)))


def metric_type(text):
    for kind, suffixes in KINDS:
        if re.search(rf"\b{kind}\b", text):
            return kind, suffixes
    return None, None


def exported():
    """{sample name: "file: type"} of every metric registered in SOURCES."""
    names, problems = {}, []
    for root in SOURCES:
        for path in sorted(pathlib.Path(root).rglob("*.rs")):
            text = path.read_text()
            registers = list(REGISTER.finditer(text))
            prefixes = PREFIX.findall(text)
            if not registers:
                continue
            if len(prefixes) != 1:
                problems.append(f"{path}: {len(prefixes)} Registry::with_prefix, expected one")
                continue
            for m in registers:
                arg = m.group("arg")
                kind, suffixes = metric_type(arg)
                if kind is None:
                    var = re.match(r"[A-Za-z_]\w*", arg)
                    decl = var and re.search(rf"\b{var.group(0)}\s*[:=]\s*([^;{{\n]*)", text)
                    if decl:
                        kind, suffixes = metric_type(decl.group(1))
                if kind is None:
                    problems.append(f"{path}: cannot tell the type of metric {m.group('name')} ({arg})")
                    continue
                base = f"{prefixes[0]}_{m.group('name')}"
                for suffix in suffixes:
                    names[base + suffix] = f"{path}: {kind.lower()}"
    return names, problems


# --- the metric names a PromQL expression reads --------------------------------
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
            "group_right", "bool", "offset", "inf", "nan"}


def metric_names(expr):
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    e = re.sub(r"\$\{?\w+\}?", "", e)                       # Grafana variables
    e = re.sub(r"\{[^}]*\}", "", e)                          # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                         # ranges, subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"(?<![\w:])\d+(\.\d+)?([eE][+-]?\d+)?[smhdwy]?\b", "", e)
    return {m.group(1) for m in re.finditer(r"(?<![\w:])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()", e)
            if m.group(1).lower() not in KEYWORDS}


def series_name(series):
    return re.match(r"\s*([A-Za-z_:][\w:]*)", series).group(1)


def main():
    out, test_path, dashboard_path, renders = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    docs_by_render = {}
    for path in renders:
        with open(path) as f:
            docs_by_render[path] = [d for d in yaml.safe_load_all(f) if d]
    first = docs_by_render[renders[0]]

    def the(docs, kind):
        found = [d for d in docs if d.get("kind") == kind]
        return found[0] if len(found) == 1 else None

    for path, docs in docs_by_render.items():
        kinds = {k: sum(d.get("kind") == k for d in docs)
                 for k in ("PrometheusRule", "ServiceMonitor", "PodMonitor")}
        report(all(n == 1 for n in kinds.values()),
               f"render {pathlib.Path(path).parent.name.removeprefix('render-')}", ", ".join(f"{n} {k}" for k, n in kinds.items()))

    rule = the(first, "PrometheusRule")
    if rule is None:
        report(False, "PrometheusRule", "none rendered")
        print("monitoring-check: FAILED")
        return 1
    spec = rule["spec"]
    rules_path = os.path.join(out, "desktop-snapshot.rules.yaml")
    with open(rules_path, "w") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    check = subprocess.run(["promtool", "check", "rules", rules_path], capture_output=True, text=True)
    report(check.returncode == 0, "promtool check rules",
           (check.stdout + check.stderr).strip().splitlines()[-1] if check.returncode == 0
           else (check.stdout + check.stderr).strip())

    # promtool test rules: the rules without annotations, beside a copy of the tests.
    bare = {"groups": [dict(g, rules=[{k: v for k, v in r.items() if k != "annotations"}
                                      for r in g["rules"]]) for g in spec["groups"]]}
    unit = os.path.join(out, "unit")
    os.makedirs(unit, exist_ok=True)
    with open(os.path.join(unit, "rules.yaml"), "w") as f:
        yaml.safe_dump(bare, f, sort_keys=False)
    with open(test_path) as f:
        tests_text = f.read()
    with open(os.path.join(unit, "rules.test.yaml"), "w") as f:
        f.write(tests_text)
    run = subprocess.run(["promtool", "test", "rules", "rules.test.yaml"], cwd=unit,
                         capture_output=True, text=True)
    tests = yaml.safe_load(tests_text)["tests"]
    report(run.returncode == 0, "promtool test rules", f"{len(tests)} tests" if run.returncode == 0
           else (run.stdout + run.stderr).strip())

    # Each alert: labels and annotations; fired and not fired by the tests.
    fired, quiet = set(), set()
    for t in tests:
        for a in t.get("alert_rule_test", []):
            (fired if a.get("exp_alerts") else quiet).add(a["alertname"])
    alerts = [r for g in spec["groups"] for r in g["rules"] if "alert" in r]
    for r in alerts:
        missing = [a for a in ANNOTATIONS if not str(r.get("annotations", {}).get(a, "")).strip()]
        severity = r.get("labels", {}).get("severity")
        problems = ([f"severity {severity!r} not one of {sorted(SEVERITIES)}"] if severity not in SEVERITIES else []) \
            + ([f"no {', '.join(missing)}"] if missing else []) \
            + ([] if r["alert"] in fired else ["never fired by a test"]) \
            + ([] if r["alert"] in quiet else ["never tested quiet"])
        report(not problems, f"alert {r['alert']}", "; ".join(problems) or f"{severity}, fired and not fired")

    # Metric names against the binaries' registrations.
    names, problems = exported()
    for p in problems:
        report(False, "metric registrations", p)
    report(bool(names), "metrics the binaries export",
           f"{len(names)} sample names from {', '.join(SOURCES)}")
    with open(dashboard_path) as f:
        dashboard = json.load(f)
    queries = [(f"dashboard panel {p.get('title')!r}", t["expr"])
               for p in dashboard.get("panels", []) for t in p.get("targets", []) if "expr" in t]
    report(bool(queries), "dashboard queries", f"{len(queries)} queries")
    used = [(f"alert {r['alert']}", r["expr"]) for r in alerts] + queries
    used += [(f"test {t.get('name')!r}", series_name(s["series"]))
             for t in tests for s in t.get("input_series", [])]
    unknown, seen = {}, set()
    for where, expr in used:
        for name in metric_names(expr):
            seen.add(name)
            if name not in names and name not in EXTERNAL:
                unknown.setdefault(name, []).append(where)
    report(not unknown, "metric names used", "; ".join(
        f"{n} is not exported (used by {', '.join(sorted(set(w)))})" for n, w in sorted(unknown.items()))
           if unknown else
           f"{len(seen & set(names))} exported, {len(seen - set(names))} external "
           f"({', '.join(sorted(seen - set(names)))})")

    # How the objects fit together.
    for path, docs in docs_by_render.items():
        render = pathlib.Path(path).parent.name.removeprefix("render-")
        sm, pm = the(docs, "ServiceMonitor"), the(docs, "PodMonitor")
        svc = next((d for d in docs if d.get("kind") == "Service"
                    and d["metadata"]["name"] == "snapshot-webhook"), None)
        mwc = the(docs, "MutatingWebhookConfiguration")
        cms = [d for d in docs if d.get("kind") == "ConfigMap"
               and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
        problems = []

        def job_of(endpoint):
            return {r.get("replacement") for r in endpoint.get("relabelings", [])
                    if r.get("targetLabel") == "job"}
        if sm and svc:
            ports = {p.get("name") for p in svc["spec"]["ports"]}
            for ep in sm["spec"]["endpoints"]:
                if ep.get("port") not in ports:
                    problems.append(f"ServiceMonitor port {ep.get('port')} is no port of Service snapshot-webhook {sorted(ports)}")
                if job_of(ep) != {WEBHOOK_JOB}:
                    problems.append(f"ServiceMonitor sets job {job_of(ep)}, the rules read {WEBHOOK_JOB}")
            labels = svc["metadata"].get("labels", {})
            if not sm["spec"]["selector"]["matchLabels"].items() <= labels.items():
                problems.append("ServiceMonitor selects no label set of Service snapshot-webhook")
        else:
            problems.append("no ServiceMonitor or no Service snapshot-webhook")
        if pm:
            sidecar_port = re.search(r'ContainerPort\s*\{\s*name:\s*Some\("([^"]+)"',
                                     pathlib.Path("webhook/src/sidecar.rs").read_text())
            for ep in pm["spec"]["podMetricsEndpoints"]:
                if not sidecar_port or ep.get("port") != sidecar_port.group(1):
                    problems.append(f"PodMonitor port {ep.get('port')} is not the sidecar's port name "
                                    f"{sidecar_port and sidecar_port.group(1)} (webhook/src/sidecar.rs)")
                if job_of(ep) != {SIDECAR_JOB}:
                    problems.append(f"PodMonitor sets job {job_of(ep)}, the rules read {SIDECAR_JOB}")
        hooks = {h["name"] for h in (mwc or {}).get("webhooks", [])}
        for r in alerts:
            for name in re.findall(r'apiserver_admission_webhook_\w+\{[^}]*\bname="([^"]+)"', r["expr"]):
                if name not in hooks:
                    problems.append(f"alert {r['alert']} reads webhook {name}, the configuration names {sorted(hooks)}")
        if len(cms) != 1:
            problems.append(f"{len(cms)} ConfigMaps labelled grafana_dashboard: \"1\", expected one")
        else:
            data = cms[0].get("data", {})
            try:
                if [json.loads(v) for v in data.values()] != [dashboard]:
                    problems.append("the dashboard ConfigMap does not hold dashboard.json")
            except json.JSONDecodeError as e:
                problems.append(f"the dashboard ConfigMap's data is not JSON: {e}")
        report(not problems, f"{render}: objects fit together", "; ".join(problems) or
               f"jobs {WEBHOOK_JOB} and {SIDECAR_JOB}, ports, webhook name, dashboard ConfigMap")

    print(f"monitoring-check: {'passed' if not failed else 'FAILED'}: {passed} checks passed, {failed} failed"
          f" ({len(alerts)} alerts, {len(tests)} promtool tests, {len(queries)} dashboard queries)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
PY
