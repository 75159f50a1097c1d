"""Validates rendered manifests: Kubernetes kinds with kubernetes-validate (strict),
cert-manager kinds with the JSON schema in manifests/schemas. Usage:
manifests_check.py K8S_VERSION SCHEMA_DIR RENDERED.yaml..."""
import json
import os
import sys

import jsonschema
import kubernetes_validate
import yaml


def main() -> int:
    version, schema_dir, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    with open(os.path.join(schema_dir, "cert-manager.io-v1.json")) as f:
        cert_manager = json.load(f)
    failures = checked = 0
    for path in files:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        if not docs:
            print(f"FAIL {path}: renders no object")
            failures += 1
        for doc in docs:
            what = f"{os.path.basename(path)}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            checked += 1
            try:
                if doc.get("apiVersion", "").startswith("cert-manager.io/"):
                    kind = doc.get("kind")
                    if kind not in cert_manager["definitions"]:
                        raise ValueError(f"no schema for cert-manager kind {kind}")
                    schema = dict(cert_manager, **{"$ref": f"#/definitions/{kind}"})
                    jsonschema.validate(doc, schema)
                else:
                    kubernetes_validate.validate(doc, version, strict=True)
                print(f"ok   {what}")
            except Exception as e:  # every kind of failure is reported the same way
                message = getattr(e, "message", None) or str(e)
                print(f"FAIL {what}: {message.splitlines()[0]}")
                failures += 1
    print(f"manifests-check: {checked - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
